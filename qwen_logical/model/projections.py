"""Products with weight kernels as stored: float, or int8 with a float32 scale per output channel.

A kernel is `(weights, scale)` (`layers.kernel_param`): weights [out..., in...] in param_dtype
with scale None, or int8 with scale f32[out...]. Weights are converted to the compute dtype
where the product happens and the scale multiplies the product's output channels, never the
weights (exact: a per-output-channel scale factors out of the sum).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_logical.model import axes as ax

Kernel = tuple  # (weights, per-output-channel float32 scale or None)


def dense(spec: str, x: jax.Array, kernel: Kernel, dtype) -> jax.Array:
  """einsum(spec, x, kernel) in `dtype`, then times the int8 scale over the output's last dimension.

  `kernel` as from kernel_param, possibly reshaped: the output's last dimension holds the kernel's
  output channels flattened (exact: a per-output-channel scale factors out of the sum).
  """
  weights, scale = kernel
  y = jnp.einsum(spec, x, weights.astype(dtype))
  return y if scale is None else y * scale.reshape(-1).astype(dtype)


_BLOCK_BYTES = 16 * 2**20  # per device, one converted block of the vocab projection
_MAX_BLOCKS = 64


def mesh_shards(names: Sequence[str]) -> tuple[int, ...]:
  """How many devices split each dimension of logical `names` under the bound rule table and mesh
  (1 each when none is bound)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (1,) * len(names)
  spec = tuple(nn.logical_to_mesh_axes(tuple(names)))
  spec += (None,) * (len(names) - len(spec))
  axes = [() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in spec]
  return tuple(math.prod(mesh.shape[a] for a in entry) for entry in axes)


def _zero_after(y: jax.Array) -> jax.Array:
  """A float32 +-0 that exists only once `y` [B, L, ...] does (w + zero == w exactly).

  From a reduction over row [0, 0], not one element: an element of a sharded dimension lives on
  one device and GSPMD gathered all of `y` for it; the reduction costs one scalar all-reduce.
  """
  value = jnp.max(y[:1, :1]).astype(jnp.float32)
  return jnp.where(jnp.isfinite(value), value, 0.0) * 0.0


def _num_blocks(rows: int, nbytes: int) -> int:
  """The fewest blocks (a divisor of `rows`, at most _MAX_BLOCKS) of at most _BLOCK_BYTES each."""
  divisors = [d for d in range(1, min(rows, _MAX_BLOCKS) + 1) if rows % d == 0]
  return next((d for d in divisors if nbytes // d <= _BLOCK_BYTES), divisors[-1])


def vocab_projection(x: jax.Array, kernel: Kernel, dtype) -> jax.Array:
  """x [B, L, E] -> logits [B, L, V] with a (vocab, embed) kernel: the lm_head or the tied embedding.

  A kernel stored in another dtype (bf16, int8) is converted one block of rows at a time, each
  block once the previous block's logits exist. Converted whole, its float32 copy (0.5B: 520 MiB,
  7B: 2.1 GiB) is fresh memory on every XLA:CPU call, and faulting it in cost more than the
  projection itself (0.5B shape, 2026-11-25: 150 ms against 20 ms in float32; in blocks 60 ms).
  Blocks are rows of each device's own vocab shard ([T, n, V/(T n), E]), so none crosses devices.
  """
  weights, scale = kernel
  if weights.dtype == dtype:
    return dense("ble,ve->blv", x, kernel, dtype)
  vocab, embed = weights.shape
  vocab_shards, embed_shards = mesh_shards((ax.VOCAB, ax.EMBED))
  rows = vocab // vocab_shards
  n = _num_blocks(rows, rows * embed * jnp.dtype(dtype).itemsize // embed_shards)
  blocks = nn.with_logical_constraint(weights.reshape(vocab_shards, n, rows // n, embed),
                                     (ax.VOCAB, None, None, ax.EMBED))
  parts, zero = [], _zero_after(x)
  for k in range(n):  # each block as one [T * rows/n, E] matrix: a 3-D one is transposed by XLA:CPU
    block = blocks[:, k].reshape(vocab // n, embed).astype(dtype) + zero.astype(dtype)
    part = jnp.einsum("ble,ke->blk", x, block)
    zero = _zero_after(part)
    parts.append(part.reshape(*x.shape[:2], vocab_shards, rows // n))
  logits = jnp.stack(parts, axis=3).reshape(*x.shape[:2], vocab)  # [B, L, T, n, rows/n] -> V
  return logits if scale is None else logits * scale.astype(dtype)
