"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling.

`SamplingParams` is static (hashable): each distinct setting compiles its own
decode step once. Logits are f32[B, V] (activation_batch, activation_vocab);
tokens come back as int32[B].
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
from qwen_logical.common.errors import QwenLogicalError


class SamplingError(QwenLogicalError):
  """A sampling parameter outside its valid range."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How the next token is chosen.

  temperature: 0 picks the most likely token (greedy); > 0 samples from
    softmax(logits / temperature).
  top_k: keep only the k most likely tokens before sampling (0: all).
  top_p: keep the smallest set of most likely tokens whose probability reaches
    top_p (1.0: all). Applied after top_k, as transformers does.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    t, k, p = self.temperature, self.top_k, self.top_p
    self._validate(t, k, p)
    # Plain Python numbers, so equal settings hash alike and share compiled programs.
    object.__setattr__(self, "temperature", float(t))
    object.__setattr__(self, "top_k", int(k))
    object.__setattr__(self, "top_p", float(p))

  @staticmethod
  def _validate(t, k, p) -> None:
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
      raise SamplingError(f"temperature={t!r} is invalid: use 0 for greedy decoding or a positive "
                          "finite number to sample (e.g. 0.7).")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
      raise SamplingError(f"top_k={k!r} is invalid: use a non-negative integer (0 turns top-k off).")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 < p <= 1.0):
      raise SamplingError(f"top_p={p!r} is invalid: it must be in (0, 1] (1.0 turns top-p off).")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def check_vocab(self, vocab_size: int) -> None:
    if self.top_k > vocab_size:
      raise SamplingError(f"top_k={self.top_k} exceeds the vocabulary size {vocab_size}; use at most "
                          f"{vocab_size} (or 0 to turn top-k off).")


def sample(logits: jax.Array, keys: jax.Array, params: SamplingParams) -> jax.Array:
  """logits f32[B, V], keys (one PRNG key per row) [B] -> tokens int32[B]."""
  logits = logits.astype(jnp.float32)
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / params.temperature
  vocab = logits.shape[-1]
  if params.top_k or params.top_p < 1.0:
    # Candidates in descending order: the top k, or the whole vocabulary sorted for top-p.
    values, indices = jax.lax.top_k(logits, params.top_k or vocab)
    if params.top_p < 1.0:
      probs = jax.nn.softmax(values, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely candidates
      values = jnp.where(before < params.top_p, values, -jnp.inf)  # the first candidate always stays
    choice = jax.vmap(jax.random.categorical)(keys, values)
    return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def row_keys(seed_key: jax.Array, rows: jax.Array, step: jax.Array) -> jax.Array:
  """One key per row and step: depends on (seed, row, step) only, so a prompt sampled alone
  as row r draws what it draws as row r of a batch."""
  per_row = jax.vmap(lambda r: jax.random.fold_in(seed_key, r))(rows)
  return jax.vmap(lambda k: jax.random.fold_in(k, step))(per_row)
