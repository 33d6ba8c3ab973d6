"""The KV cache side of attention: writing a call's keys/values into cache slots, and one query
per row attending over the cache.

A call may run fewer rows than the cache holds: B token rows use cache rows [0, B) of a cache of
R >= B rows (the serving engine decodes only the prefix of rows that run requests). The cache is
then written by a scatter into those rows, in place in a donated cache, and read through a static
slice: rows [B, R) are never touched (XLA:CPU copies the B rows' slice once before attention's
reduction, as much data as attention reads anyway).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_slots(slots: jax.Array, new: jax.Array, index: jax.Array | int) -> jax.Array:
  """Keys or values `new` [B, L, K, D] into `slots` [R, K, S, D] (R >= B: rows [0, B)) at slots
  [index, index + L): `index` a scalar (every row) or int[B] (each row its own). Returns [R, K, S, D]."""
  rows, length = new.shape[:2]
  new = new.astype(slots.dtype)
  if slots.shape[0] == rows:
    at = lambda s, n, i: jax.lax.dynamic_update_slice(s, n, (0,) * (s.ndim - 2) + (i, 0))  # [.., S, D] at i
    at = at if jnp.ndim(index) == 0 else jax.vmap(at)
    return at(slots, jnp.swapaxes(new, 1, 2), index)
  starts = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (rows,))
  if rows == 1:  # XLA rewrites a scatter of one row as an update it then also fuses into the
    # reads of that row, which keeps the old cache alive (a copy of it): the row goes in twice.
    starts, new = jnp.concatenate([starts, starts]), jnp.concatenate([new, new])
  row = jnp.zeros((1, 1), jnp.int32) if rows == 1 else jnp.arange(rows)[:, None]
  slot = starts[:, None] + jnp.arange(length)[None, :]  # with `row`: [B', L] index pairs; update [B', L, K, D]
  return slots.at[row, :, slot, :].set(new, mode="clip")


def rows_of(slots: jax.Array, rows: int) -> jax.Array:
  """Cache rows [0, rows) of `slots` [R, K, S, D] (a static slice; the array itself if R == rows)."""
  return slots if slots.shape[0] == rows else jax.lax.slice_in_dim(slots, 0, rows, axis=0)


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, bias: jax.Array,
                     scale: float) -> jax.Array:
  """One query per row over the cache. q [B, K, G, D] (G query heads per KV head), keys/values
  [B, K, S, D] (ax.KV_CACHE), bias f32[B, 1, S] -> [B, K, G, D].

  Written as broadcast multiplies and reductions rather than dot_generals: with a single query
  XLA:CPU then fuses each product into one loop over the cache, where batched dots would go to
  a library call that wants the cache transposed (a copy of every layer's cache every step).
  """
  dtype = q.dtype
  scores = jnp.sum(q[:, :, :, None, :] * keys[:, :, None, :, :], axis=-1, dtype=jnp.float32)
  scores = scores * scale + bias[:, :, None, :]  # [B, K, G, S]
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  return jnp.sum(probs[..., None] * values[:, :, None, :, :], axis=3)
