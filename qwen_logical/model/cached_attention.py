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
import numpy as np

from qwen_logical.model.config import as_dtype


SCALE_DTYPE = jnp.float16  # an int8 cache's scales (one per token and KV head): bfloat16's 8 bits lost 2 of 4 rows' agreement


def storage_dtype(config) -> np.dtype:
  """The dtype the cache stores keys and values in (ModelConfig.kv_cache_dtype; "" = the compute dtype)."""
  name = config.kv_cache_dtype
  return np.dtype(np.int8) if name == "int8" else as_dtype(name) if name else np.dtype(config.dtype)


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Keys or values [B, L, K, D] -> (int8 [B, L, K, D], scale [B, L, K] in SCALE_DTYPE): each token
  and head by its largest magnitude. The scale is rounded up to SCALE_DTYPE before dividing, so
  nothing clips and int8 * scale is the value to within half a step."""
  x32 = x.astype(jnp.float32)
  exact = jnp.max(jnp.abs(x32), axis=-1) / 127.0
  scale = exact.astype(SCALE_DTYPE)
  scale = jnp.where(scale.astype(jnp.float32) < exact, jnp.nextafter(scale, jnp.asarray(jnp.inf, SCALE_DTYPE)), scale)
  safe = jnp.where(scale > 0, scale.astype(jnp.float32), 1.0)
  return jnp.clip(jnp.round(x32 / safe[..., None]), -127, 127).astype(jnp.int8), scale


def stored(cache: dict, name: str, rows: int, dtype) -> jax.Array:
  """Cache rows [0, rows) of keys or values (`name` 'k' or 'v') in `dtype`, int8 ones times their scales:
  [rows, K, S, D]. The product fuses into attention's reads (XLA:CPU reads the int8 bytes)."""
  values = rows_of(cache[name], rows).astype(dtype)
  if f"{name}_scale" in cache:
    values = values * rows_of(cache[f"{name}_scale"], rows).astype(dtype)[..., None]
  return values


def write_slots(slots: jax.Array, new: jax.Array, index: jax.Array | int) -> jax.Array:
  """Keys or values `new` [B, L, K, D] into `slots` [R, K, S, D] (R >= B: rows [0, B)) at slots
  [index, index + L): `index` a scalar (every row) or int[B] (each row its own). Returns [R, K, S, D].
  An int8 cache's scales go the same way: new [B, L, K] into slots [R, K, S]."""
  rows, length = new.shape[:2]
  new = new.astype(slots.dtype)
  if slots.shape[0] == rows:
    moved = jnp.swapaxes(new, 1, 2)  # [B, K, L, ...]
    if jnp.ndim(index) == 0:
      return jax.lax.dynamic_update_slice(slots, moved, (0, 0, index) + (0,) * (slots.ndim - 3))
    at = lambda s, n, i: jax.lax.dynamic_update_slice(s, n, (0, i) + (0,) * (s.ndim - 2))  # one row's [K, S, ..]
    return jax.vmap(at)(slots, moved, index)
  starts = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (rows,))
  if rows == 1:  # XLA rewrites a scatter of one row as an update it then also fuses into the
    # reads of that row, which keeps the old cache alive (a copy of it): the row goes in twice.
    starts, new = jnp.concatenate([starts, starts]), jnp.concatenate([new, new])
  row = jnp.zeros((1, 1), jnp.int32) if rows == 1 else jnp.arange(rows)[:, None]
  slot = starts[:, None] + jnp.arange(length)[None, :]  # with `row`: [B', L] index pairs; update [B', L, K, D]
  return slots.at[(row, slice(None), slot) + (slice(None),) * (slots.ndim - 3)].set(new, mode="clip")


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
