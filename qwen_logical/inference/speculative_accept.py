"""The arithmetic of exact speculative decoding, inside the compiled programs: drafting by prompt
lookup, and checking drafts against the target model's distributions.

A round feeds the row's last token and K drafted tokens d_1..d_K to the target model at once
(logits [B, K+1, V]: position j predicts the token after d_j, d_0 being the last token), then:

* greedy rows accept the longest prefix of drafts that equals the target's argmax, and add the
  target's own token at the first mismatch (or after the last draft): the output is token for
  token what plain greedy decoding gives;
* sampled rows use speculative sampling: draft d_j (drawn from q_j, a point mass for prompt
  lookup) is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the
  token is drawn from the normalised residual max(p_j - q_j, 0), and after K acceptances from
  p_K. The tokens are then distributed exactly as the target's sampler draws them (p is the
  sampler's own distribution: temperature, top-k and top-p applied; one-hot at temperature 0).

Shapes: B rows, K drafts, L = K + 1 checked positions, V vocabulary, S cache slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_logical.inference.sampling import GREEDY, gumbel_noise, scaled_logits

# Key streams within a round's key (sampling.stream_keys(seed, stream, step)): drafts, acceptance, residual.
DRAFT_STREAM, ACCEPT_STREAM, RESIDUAL_STREAM = 1 << 20, 2 << 20, 3 << 20


def lookup_drafts(history: jax.Array, index: jax.Array, num_tokens: int, ngram: int):
  """Prompt lookup: the K tokens that followed the latest earlier occurrence of each row's last
  `ngram` tokens.

  history i32[B, S]: the row's tokens at slots [0, index] (the prompt, then what it generated;
  history[index] is the last token), index i32[B] -> (drafts i32[B, K], count i32[B]): count is K
  where an occurrence ends at slot e < index, else 0. The copy runs on past the last token as
  copying does: draft i is history[e + 1 + i mod (index - e)] (a repeating stretch repeats).
  """
  batch, slots = history.shape
  at = jnp.arange(slots)
  tail = jnp.take_along_axis(history, jnp.clip(index[:, None] - ngram + 1 + jnp.arange(ngram), 0, slots - 1), 1)
  # An earlier occurrence ends at slot e < index, e >= ngram - 1: history[e - ngram + 1 + j] == tail[j].
  match = (at[None] >= ngram - 1) & (at[None] < index[:, None]) & (index[:, None] >= ngram)
  for j in range(ngram):
    match &= jnp.roll(history, ngram - 1 - j, axis=1) == tail[:, j:j + 1]
  end = jnp.max(jnp.where(match, at[None], -1), axis=1)
  found = end >= 0
  period = jnp.where(found, index - end, 1)
  source = end[:, None] + 1 + jnp.arange(num_tokens)[None] % period[:, None]
  drafts = jnp.take_along_axis(history, jnp.clip(source, 0, slots - 1), 1)
  return drafts, jnp.where(found, num_tokens, 0).astype(jnp.int32)


def sampler_probs(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  kind: str) -> jax.Array:
  """f32[B, V] (or [B, L, V]): the distribution each row's sampler (`sampling.sample_rows`, the
  same kind) draws from; one-hot on the argmax for rows with temperature 0."""
  shape = logits.shape
  logits = logits.astype(jnp.float32).reshape(-1, shape[-1])
  repeat = logits.shape[0] // temperature.shape[0]
  temperature, top_k, top_p = (jnp.repeat(a, repeat) for a in (temperature, top_k, top_p))
  best = jax.nn.one_hot(jnp.argmax(logits, axis=-1), shape[-1], dtype=jnp.float32)
  if kind == GREEDY:
    return best.reshape(shape)
  scaled = scaled_logits(logits, temperature, top_k, top_p, kind)
  return jnp.where((temperature > 0)[:, None], jax.nn.softmax(scaled, axis=-1), best).reshape(shape)


def draw(probs: jax.Array, keys: jax.Array) -> jax.Array:
  """A token from each row's distribution probs f32[B, V] (Gumbel-max on log probs; zero
  probabilities are never drawn) -> int32[B]."""
  noisy = jnp.where(probs > 0, jnp.log(probs) + gumbel_noise(keys, probs.shape[-1]), -jnp.inf)
  return jnp.argmax(noisy, axis=-1).astype(jnp.int32)


def fold(keys: jax.Array, stream: int) -> jax.Array:
  return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


def _leading(ok: jax.Array) -> jax.Array:
  """i32[B]: how many leading entries of bool[B, K] are true."""
  return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)


def accept_greedy(logits: jax.Array, drafts: jax.Array, count: jax.Array):
  """Greedy check: logits [B, L, V], drafts i32[B, K], count i32[B] -> (tokens i32[B, L],
  accepted i32[B]): the row's new tokens are tokens[:, :accepted + 1]."""
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  k = drafts.shape[1]
  ok = (drafts == best[:, :k]) & (jnp.arange(k)[None] < count[:, None])
  return best, _leading(ok)


def accept_sampled(probs: jax.Array, drafts: jax.Array, count: jax.Array, draft_probs: jax.Array | None,
                   keys: jax.Array):
  """Speculative sampling: probs f32[B, L, V] (the target sampler's), drafts i32[B, K], count
  i32[B], draft_probs f32[B, K, V] (None: each draft a point mass, as prompt lookup's), keys [B]
  (the round's) -> (tokens i32[B, L], accepted i32[B]) as `accept_greedy`."""
  batch, k = drafts.shape
  p_draft = jnp.take_along_axis(probs[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, K]
  q_draft = 1.0 if draft_probs is None else jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
  uniform = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(fold(keys, ACCEPT_STREAM))
  ok = (uniform * q_draft < p_draft) & (jnp.arange(k)[None] < count[:, None])
  accepted = _leading(ok)
  rows = jnp.arange(batch)
  p_next = probs[rows, accepted]  # [B, V]: the first rejected (or the bonus) position
  rejected = accepted < count
  at = jnp.minimum(accepted, k - 1)
  if draft_probs is None:
    q_next = jax.nn.one_hot(drafts[rows, at], probs.shape[-1], dtype=jnp.float32)
  else:
    q_next = draft_probs[rows, at]
  residual = jnp.maximum(p_next - jnp.where(rejected[:, None], q_next, 0.0), 0.0)
  residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_next)  # rounding guard
  extra = draw(residual, fold(keys, RESIDUAL_STREAM))
  tokens = jnp.concatenate([drafts, jnp.zeros((batch, 1), jnp.int32)], axis=1)
  tokens = tokens.at[rows, accepted].set(extra)
  return tokens, accepted


def finish(tokens: jax.Array, made: jax.Array, budget: jax.Array, stops: jax.Array):
  """Cuts each row's new tokens i32[B, L] (the first `made` i32[B] are its) at its budget and at
  its first stop id (kept) -> (made i32[B], stopped bool[B])."""
  made = jnp.minimum(made, budget)
  valid = jnp.arange(tokens.shape[1])[None] < made[:, None]
  hit = jnp.any(tokens[..., None] == stops[:, None, :], axis=-1) & valid
  stopped = jnp.any(hit, axis=1)
  return jnp.where(stopped, jnp.argmax(hit, axis=1) + 1, made).astype(jnp.int32), stopped
