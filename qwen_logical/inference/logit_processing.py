"""What the server's requests ask of each next token beyond the sampler: logit bias, presence,
frequency and repetition penalties, min_tokens, a grammar's token mask, and the log-probabilities
of what was drawn. Every setting is a per-row runtime array (`RowExtras`), so one compiled program
serves every mix of requests, and what no row asks for costs a skipped branch.

Order, for row r at a step (all in float32 over the vocabulary V):
  raw logits -> repetition penalty (tokens seen in the prompt or output: positive logits / p,
  negative x p, as transformers) -> frequency and presence penalties (output tokens: count x f +
  [count > 0] x p, as OpenAI) -> logit bias (added) -> min_tokens (stop ids at -inf until the row
  has drawn that many) -> grammar mask (disallowed ids at -inf) -> the sampler (temperature, top-k,
  top-p). Log-probabilities are of the raw logits (log-softmax before any of this, as OpenAI and
  vLLM report them).

Token occurrences live on the device beside the KV cache: `occurrences` i32[R, V] holds, per cache
row, each token's count in the output so far plus PROMPT_FLAG if it is in the prompt.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MAX_LOGIT_BIAS = 300  # logit_bias entries per request
TOP_LOGPROBS = 20  # most top_logprobs / logprobs a request may ask for (OpenAI's limit)
PROMPT_FLAG = 1 << 24  # occurrences: added once for a token of the prompt; the count is below it
_DROPPED = 1 << 30  # a padding token id: scatters drop it


def mask_words(vocab_size: int) -> int:
  """int32 words of a token bitmask over `vocab_size` ids (bit j of word w: token 32 w + j)."""
  return -(-vocab_size // 32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowExtras:
  """Per-row settings of n rows (host numpy or device arrays): [n] unless shown."""

  presence: np.ndarray  # f32: presence_penalty (0: off)
  frequency: np.ndarray  # f32: frequency_penalty (0: off)
  repetition: np.ndarray  # f32: repetition_penalty (1: off)
  min_tokens: np.ndarray  # i32: stop ids are banned while the row has drawn fewer tokens than this
  bias_ids: np.ndarray  # i32[n, MAX_LOGIT_BIAS]: token ids (padding: a dropped id)
  bias_values: np.ndarray  # f32[n, MAX_LOGIT_BIAS]
  top: np.ndarray  # i32: top log-probabilities wanted (0: the drawn token's only; -1: none)
  constrained: np.ndarray  # i32: 1 if `mask` applies to the row's next token
  mask: np.ndarray  # i32[n, W]: allowed token bits (`mask_words`)

  @classmethod
  def empty(cls, rows: int, vocab_size: int) -> "RowExtras":
    f32, i32 = (lambda v: np.full(rows, v, np.float32)), (lambda v: np.full(rows, v, np.int32))
    return cls(f32(0.0), f32(0.0), f32(1.0), i32(0), np.full((rows, MAX_LOGIT_BIAS), _DROPPED, np.int32),
               np.zeros((rows, MAX_LOGIT_BIAS), np.float32), i32(-1), i32(0),
               np.full((rows, mask_words(vocab_size)), -1, np.int32))

  def head(self, rows: int) -> "RowExtras":
    return jax.tree_util.tree_map(lambda a: np.array(a[:rows]), self)

  def set_row(self, row: int, presence=0.0, frequency=0.0, repetition=1.0, min_tokens=0, logit_bias=(),
              top=-1) -> None:
    """Row `row`'s settings (host arrays); logit_bias: (token id, bias) pairs."""
    self.presence[row], self.frequency[row], self.repetition[row] = presence, frequency, repetition
    self.min_tokens[row], self.top[row], self.constrained[row] = min_tokens, top, 0
    self.bias_ids[row], self.bias_values[row], self.mask[row] = _DROPPED, 0.0, -1
    for i, (token, value) in enumerate(logit_bias):
      self.bias_ids[row, i], self.bias_values[row, i] = token, value


def adjust(logits: jax.Array, occurrences: jax.Array, steps: jax.Array, stops: jax.Array, x: RowExtras,
           masked: jax.Array) -> jax.Array:
  """f32[n, V] logits -> the logits the sampler draws from (module docstring's order).

  occurrences i32[n, V]; steps i32[n] (tokens drawn so far); stops i32[n, T] (-1 pads);
  masked: bool[] whether the rows' masks apply at this step (the first of a dispatch)."""
  n, vocab = logits.shape
  rows = jnp.arange(n)[:, None]

  def penalise(logits):
    count, seen = occurrences % PROMPT_FLAG, occurrences > 0
    rep = x.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - x.frequency[:, None] * count - x.presence[:, None] * (count > 0)

  penalties = jnp.any((x.presence != 0) | (x.frequency != 0) | (x.repetition != 1))
  logits = jax.lax.cond(penalties, penalise, lambda l: l, logits)
  logits = logits.at[rows, x.bias_ids].add(x.bias_values, mode="drop")
  banned = jnp.where((steps < x.min_tokens)[:, None] & (stops >= 0), stops, _DROPPED)
  logits = logits.at[rows, banned].set(-jnp.inf, mode="drop")

  def constrain(logits):
    bits = (x.mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [n, W, 32]
    allowed = bits.reshape(n, -1)[:, :vocab] > 0
    return jnp.where(allowed | (x.constrained[:, None] == 0), logits, -jnp.inf)

  return jax.lax.cond(masked & jnp.any(x.constrained > 0), constrain, lambda l: l, logits)


def logprobs(raw: jax.Array, tokens: jax.Array, top: jax.Array):
  """raw f32[n, V], drawn tokens i32[n], top i32[n] (-1: none) -> (the tokens' log-probabilities
  f32[n], the TOP_LOGPROBS most likely ids i32[n, T] and their log-probabilities f32[n, T]); zeros
  unless some row wants them (no pass over the vocabulary when none does)."""
  n = raw.shape[0]
  zeros = (jnp.zeros((n,), jnp.float32), jnp.zeros((n, TOP_LOGPROBS), jnp.int32),
           jnp.zeros((n, TOP_LOGPROBS), jnp.float32))

  def wanted(raw):
    lse = jax.nn.logsumexp(raw, axis=-1)
    chosen = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0] - lse

    def best(raw):
      ids, values = top_logits(raw)
      return ids, values - lse[:, None]

    ids, values = jax.lax.cond(jnp.any(top > 0), best, lambda _: zeros[1:], raw)
    return chosen, ids, values

  return jax.lax.cond(jnp.any(top >= 0), wanted, lambda _: zeros, raw)


def top_logits(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The TOP_LOGPROBS largest of logits [..., V]: (ids i32[..., T], values f32[..., T]), padded with
  id 0 at -inf when the vocabulary is smaller."""
  k = min(TOP_LOGPROBS, logits.shape[-1])
  values, ids = jax.lax.top_k(logits, k)
  pad = [(0, 0)] * (logits.ndim - 1) + [(0, TOP_LOGPROBS - k)]
  return jnp.pad(ids.astype(jnp.int32), pad), jnp.pad(values, pad, constant_values=-jnp.inf)


def count(occurrences: jax.Array, tokens: jax.Array, live: jax.Array) -> jax.Array:
  """occurrences i32[n, V] with each live row's new token (i32[n]) counted once more."""
  return occurrences.at[jnp.arange(tokens.shape[0]), jnp.where(live, tokens, _DROPPED)].add(1, mode="drop")


def prompt_occurrences(tokens: jax.Array, real: jax.Array, vocab: int) -> jax.Array:
  """i32[b, V]: PROMPT_FLAG at each token of each row's prompt (tokens i32[b, P]; real bool[b, P]
  marks the prompt's positions), 0 elsewhere."""
  b = tokens.shape[0]
  ids = jnp.where(real, tokens, _DROPPED)
  return jnp.zeros((b, vocab), jnp.int32).at[jnp.arange(b)[:, None], ids].set(PROMPT_FLAG, mode="drop")


@dataclasses.dataclass(frozen=True)
class Processing:
  """One request's logit processing (the defaults change nothing).

  presence_penalty, frequency_penalty: subtracted per output token seen / per occurrence ([-2, 2]);
  repetition_penalty: > 0, 1 off (transformers' rule over prompt and output);
  min_tokens: stop ids are banned until this many tokens are drawn;
  logit_bias: (token id, bias in [-100, 100]) pairs, at most MAX_LOGIT_BIAS.
  """

  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0
  min_tokens: int = 0
  logit_bias: tuple[tuple[int, float], ...] = ()

  def problem(self, vocab_size: int) -> tuple[str, str] | None:
    """(the field at fault, why) or None."""
    for name in ("presence_penalty", "frequency_penalty"):
      value = getattr(self, name)
      if not -2.0 <= value <= 2.0:
        return name, f"{name}={value} is invalid: it must be in [-2, 2] (0 turns it off)."
    if not 0.0 < self.repetition_penalty <= 100.0:
      return "repetition_penalty", (f"repetition_penalty={self.repetition_penalty} is invalid: it must be in (0, 100] "
                                    "(1 turns it off; above 1 discourages repeats).")
    if self.min_tokens < 0:
      return "min_tokens", f"min_tokens={self.min_tokens} is invalid: it must be >= 0."
    if len(self.logit_bias) > MAX_LOGIT_BIAS:
      return "logit_bias", f"logit_bias has {len(self.logit_bias)} entries: at most {MAX_LOGIT_BIAS} are taken."
    for token, value in self.logit_bias:
      if not 0 <= token < vocab_size:
        return "logit_bias", f"logit_bias names token {token}, outside this model's vocabulary [0, {vocab_size})."
      if not -100.0 <= value <= 100.0:
        return "logit_bias", f"logit_bias[{token}]={value} is invalid: biases must be in [-100, 100]."
    return None

  @property
  def penalised(self) -> bool:
    return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
