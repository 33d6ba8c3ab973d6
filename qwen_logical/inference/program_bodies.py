"""The traced functions of the inference programs (`programs.CachePrograms` compiles them).

The cache they carry is {"kv": the KV cache tree (`kv_cache`), "seen": i32[R, V] token occurrences
(`logit_processing`)}; every draw goes through `draw`: the request's logit processing, the
sampler, and the raw logits' log-probabilities.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_logical.inference import kv_cache
from qwen_logical.inference import logit_processing as lp
from qwen_logical.inference.row_state import Drawn
from qwen_logical.inference.sampling import stream_keys
from qwen_logical.model import axes as ax
from qwen_logical.model.model import Mode


def draw(programs, raw, seen, steps, stops, extras, keys, temperature, top_k, top_p, kind, masked) -> Drawn:
  """One token per row from raw f32[n, V] logits (occurrences `seen` i32[n, V], the rows' steps,
  stops and extras, keys and sampler settings); `masked`: whether grammar masks apply. Programs
  without processing draw from the raw logits and report zero log-probabilities."""
  if not programs.processing:
    token = programs.sample(raw, keys, temperature, top_k, top_p, kind)
    n = raw.shape[0]
    top = jnp.zeros((n, lp.TOP_LOGPROBS), jnp.int32)
    return Drawn(token, jnp.zeros((n,), jnp.float32), top, top.astype(jnp.float32))
  adjusted = lp.adjust(raw, seen, steps, stops, extras, masked)
  token = programs.sample(adjusted, keys, temperature, top_k, top_p, kind)
  return Drawn(token, *lp.logprobs(raw, token, extras.top))


def prefill(programs, batch: int, bucket: int, echo: bool):
  """prefill[b, P] (see programs); with `echo` it also returns the prompt's own log-probabilities."""
  part, vocab = programs.partitioner, programs.partitioner.config.vocab_size

  def run(params, cache, tokens, lengths, rows, seeds, streams, temperature, top_k, top_p, stops, extras, kind):
    real = jnp.arange(bucket)[None, :] >= bucket - lengths[:, None]
    small = kv_cache.zeros_in_jit(part, batch, bucket)
    logits, small = part.model.apply({"params": params}, tokens, real.astype(jnp.int32), mode=Mode.PREFILL,
                                     cache=small, last_token_only=not echo)
    logits = logits.astype(jnp.float32)
    seen = lp.prompt_occurrences(tokens, real, vocab)
    keys = stream_keys(seeds, streams, jnp.zeros_like(lengths))
    drawn = draw(programs, logits[:, -1], seen, jnp.zeros_like(lengths), stops, extras, keys, temperature, top_k,
                 top_p, kind, jnp.bool_(True))
    kv = jax.tree_util.tree_map(lambda big, new, names: insert(big, new, lengths, rows, names), cache["kv"], small,
                                programs.cache_axes["kv"])
    if programs.processing:
      seen = lp.count(seen, drawn.tokens, jnp.ones_like(lengths, bool))  # the first new token counts too
    cache = {"kv": kv, "seen": _set_rows(cache["seen"], seen, rows) if programs.processing else cache["seen"]}
    return (cache, drawn, prompt_scores(logits, tokens, extras.top)) if echo else (cache, drawn)

  return run


def prompt_scores(logits, tokens, top) -> Drawn:
  """Each prompt token's log-probability given the tokens before it: logits f32[b, P, V] of
  prompts tokens i32[b, P] -> Drawn of [b, P] (position 0 scores nothing: 0)."""
  b, p, _ = logits.shape
  lse = jax.nn.logsumexp(logits[:, :-1], axis=-1)  # [b, P-1]: position j predicts token j + 1
  chosen = jnp.take_along_axis(logits[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0] - lse
  pad = lambda a: jnp.concatenate([jnp.zeros_like(a[:, :1]), a], axis=1)

  def best(logits):
    ids, values = lp.top_logits(logits[:, :-1])
    return pad(ids), pad(values - lse[..., None])

  zeros = lambda _: (jnp.zeros((b, p, lp.TOP_LOGPROBS), jnp.int32), jnp.zeros((b, p, lp.TOP_LOGPROBS), jnp.float32))
  ids, values = jax.lax.cond(jnp.any(top > 0), best, zeros, logits)
  return Drawn(tokens, pad(chosen), ids, values)


def decode(programs, rows: int):
  """decode[n] (see programs): up to min(K, limit) steps in one `lax.while_loop`."""
  part, length, steps = programs.partitioner, programs.length, programs.steps

  def step(params, extras, carry, kind):
    t, cache, st, out = carry
    live = st.budget > 0
    mask = jnp.ones((rows, length), jnp.int32)  # the causal rule alone: rows fill slots [0, index]
    logits, kv = part.model.apply({"params": params}, st.tokens[:, None], mask, st.index[:, None], mode=Mode.DECODE,
                                  cache=cache["kv"], cache_index=st.index)
    keys = stream_keys(st.seeds, st.streams, st.steps)
    drawn = draw(programs, logits[:, 0].astype(jnp.float32), cache["seen"][:rows], st.steps, st.stops, extras, keys,
                 st.temperature, st.top_k, st.top_p, kind, t == 0)
    new = drawn.tokens
    drawn = dataclasses.replace(drawn, tokens=jnp.where(live, new, -1))
    out = jax.tree_util.tree_map(lambda o, d: o.at[:, t].set(d), out, drawn)
    stopped = jnp.any(new[:, None] == st.stops, axis=1)
    advance = live.astype(jnp.int32)
    st = dataclasses.replace(st, tokens=jnp.where(live, new, st.tokens), index=st.index + advance,
                             steps=st.steps + advance, budget=jnp.where(live & ~stopped, st.budget - 1, 0))
    seen = lp.count(cache["seen"], new, live) if programs.processing else cache["seen"]
    return t + 1, {"kv": kv, "seen": seen}, st, out

  def run(params, cache, state, extras, kind, limit):
    top = (rows, steps, lp.TOP_LOGPROBS)
    out = Drawn(jnp.full((rows, steps), -1, jnp.int32), jnp.zeros((rows, steps), jnp.float32),
                jnp.zeros(top, jnp.int32), jnp.zeros(top, jnp.float32))
    going = lambda carry: (carry[0] < jnp.minimum(steps, limit)) & jnp.any(carry[2].budget > 0)
    _, cache, state, out = jax.lax.while_loop(going, lambda c: step(params, extras, c, kind),
                                              (jnp.int32(0), cache, state, out))
    return cache, state, out, jnp.sum(out.tokens >= 0, axis=1, dtype=jnp.int32)

  return run


def extend(programs, batch: int, bucket: int):
  """extend[b, P]: each row's whole prompt comes left-padded to the cache's S slots (tokens i32[b, S]);
  its last P tokens run at slots [start, start + P) of its cache row, over the keys already there (a
  cached prefix), and draw its first token. Occurrences restart from the whole prompt."""
  part, names, rows_total, length = programs.partitioner, programs.cache_axes["kv"], programs.rows, programs.length
  ones = jnp.ones((batch, length), jnp.int32)

  def run(params, cache, whole, starts, rows, seeds, streams, temperature, top_k, top_p, stops, extras, kind):
    source = jnp.minimum(rows, rows_total - 1)
    small = jax.tree_util.tree_map(lambda big, n: jnp.take(big, source, axis=n.index(ax.CACHE_BATCH)), cache["kv"],
                                   names)
    logits, small = part.model.apply({"params": params}, whole[:, length - bucket:], ones, mode=Mode.DECODE,
                                     cache=small, cache_index=starts, last_token_only=True)
    real = jnp.arange(length)[None, :] >= length - (starts + bucket)[:, None]
    seen = lp.prompt_occurrences(whole, real, part.config.vocab_size)
    keys = stream_keys(seeds, streams, jnp.zeros_like(starts))
    drawn = draw(programs, logits[:, -1].astype(jnp.float32), seen, jnp.zeros_like(starts), stops, extras, keys,
                 temperature, top_k, top_p, kind, jnp.bool_(True))
    kv = jax.tree_util.tree_map(lambda big, new, n: _put_rows(big, new, rows, n), cache["kv"], small, names)
    seen = lp.count(seen, drawn.tokens, jnp.ones_like(starts, bool))
    return {"kv": kv, "seen": _set_rows(cache["seen"], seen, rows)}, drawn

  return run


def copy_row(programs):
  """copy(cache, src i32[], dst i32[]): cache row dst's keys and values become row src's."""
  names = programs.cache_axes["kv"]

  def run(cache, src, dst):
    def one(big, n):
      axis = n.index(ax.CACHE_BATCH)
      row = jax.lax.dynamic_slice_in_dim(big, src, 1, axis=axis)
      return nn.with_logical_constraint(jax.lax.dynamic_update_slice_in_dim(big, row, dst, axis=axis), n)
    return {"kv": jax.tree_util.tree_map(one, cache["kv"], names), "seen": cache["seen"]}

  return run


def _set_rows(big, small, rows):
  """big [R, ...] with row rows[i] replaced by small[i] (rows >= R: padding, nothing written)."""
  match = rows[None, :] == jnp.arange(big.shape[0])[:, None]  # [R, b]
  moved = jnp.take(small, jnp.argmax(match, axis=1), axis=0)
  return jnp.where(match.any(axis=1).reshape((-1,) + (1,) * (big.ndim - 1)), moved, big)


def _put_rows(big, small, rows, names):
  """The cache array big [.., R, ..] with rows[i] < R replaced by small's row i (along the cache_batch axis)."""
  axis = names.index(ax.CACHE_BATCH)
  for i in range(small.shape[axis]):
    row = jnp.minimum(rows[i], big.shape[axis] - 1)
    old = jax.lax.dynamic_slice_in_dim(big, row, 1, axis=axis)
    new = jax.lax.slice_in_dim(small, i, i + 1, axis=axis).astype(big.dtype)
    big = jax.lax.dynamic_update_slice_in_dim(big, jnp.where(rows[i] < big.shape[axis], new, old), row, axis=axis)
  return nn.with_logical_constraint(big, names)


def insert(big: jax.Array, small: jax.Array, lengths: jax.Array, rows: jax.Array, names) -> jax.Array:
  """Writes prefill row i's keys/values (small [.., b, K, P, ...], its prompt at [P - lengths[i], P))
  into big [.., R, K, S, ...] row rows[i] at slots [0, lengths[i]); other rows keep theirs. The axes
  come from the logical `names` (keys/values and an int8 cache's scales alike)."""
  batch_axis, slot_axis = names.index(ax.CACHE_BATCH), names.index(ax.CACHE_SEQUENCE)
  n, bucket = big.shape[batch_axis], small.shape[slot_axis]
  match = rows[None, :] == jnp.arange(n)[:, None]  # [R, b]
  source = jnp.argmax(match, axis=1)  # the prefill row each cache row takes (if any)

  def shape(**sizes):  # broadcast [R] or [R, P] over the other axes
    return tuple(sizes.get({batch_axis: "rows", slot_axis: "slots"}.get(a, ""), 1) for a in range(big.ndim))

  moved = jnp.take(small, source, axis=batch_axis)  # [.., R, K, P, ...]
  start = bucket - jnp.take(lengths, source)  # each row's left padding
  slots = jnp.minimum(jnp.arange(bucket)[None, :] + start[:, None], bucket - 1)  # [R, P]
  moved = jnp.take_along_axis(moved, slots.reshape(shape(rows=n, slots=bucket)), axis=slot_axis)
  head = jax.lax.slice_in_dim(big, 0, bucket, axis=slot_axis)
  head = jnp.where(match.any(axis=1).reshape(shape(rows=n)), moved.astype(big.dtype), head)
  big = jax.lax.dynamic_update_slice_in_dim(big, head, 0, axis=slot_axis)
  return nn.with_logical_constraint(big, names)
