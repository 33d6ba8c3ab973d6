"""Products with weight kernels as stored: float, or int8 with a float32 scale per output channel.

A kernel is `(weights, scale)` (`layers.kernel_param`): weights in param_dtype with scale None,
or int8 weights with scale f32[out...]. `dense` takes the weights as one [out, in] matrix (HF's
order: a decode step's matrix-vector product reads rows contiguously) and multiplies the
product's output channels by the scale, never the weights (exact: a per-output-channel scale
factors out of the sum).

Weights stored in another dtype than the compute dtype (bf16 or int8 on CPU) are converted
inside the product, a block of rows at a time (at most 16 MiB in float32 per device where 64
blocks suffice), each block once the previous block's output exists, so XLA can neither hoist
the conversions (it would convert every layer up front and keep them all) nor hold more than a
block. XLA:CPU allocates temporaries afresh on each call, so a larger converted copy is fresh
memory to fault in and zero on every decode step. Measured 2026-11-25, 0.5B shape (24 unrolled
layers), 1x1, decode step on a quiet machine: float32 75 ms; converted a layer at a time (57 MiB
of temporaries) bf16 167 ms, int8 153 ms; in blocks of 4 MiB (9 MiB of temporaries) bf16 136 ms,
int8 122 ms, of 16 MiB 140 / 125 ms. Smaller blocks compile longer (bf16 prefill + decode
programs: 4 MiB 24 s, 16 MiB 15 s, float32 5 s) and 1 MiB ran slower (int8 146 ms). The tied
embedding converted whole took 150 ms for that projection alone, 20 ms in float32. Blocks are
rows of each device's own shard, so none crosses devices; each costs one scalar all-reduce on
a sharded mesh (`zero_after`).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Kernel = tuple  # (weights, per-output-channel float32 scale or None)

_BLOCK_BYTES = 16 * 2**20  # per device, one converted block
_MAX_BLOCKS = 64


def bound_mesh_axes(names: Sequence[str]) -> list[tuple[str, ...]]:
  """The mesh axes each dimension of logical `names` is split over under the bound rule table and mesh
  (every one () when none is bound)."""
  if jax.sharding.get_abstract_mesh().empty:
    return [()] * len(names)
  spec = tuple(nn.logical_to_mesh_axes(tuple(names)))
  spec += (None,) * (len(names) - len(spec))
  return [() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in spec]


def mesh_shards(names: Sequence[str]) -> tuple[int, ...]:
  """How many devices split each dimension of logical `names` under the bound rule table and mesh
  (1 each when none is bound)."""
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(math.prod(mesh.shape[a] for a in entry) for entry in bound_mesh_axes(names))


def zero_after(y: jax.Array) -> jax.Array:
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


def dense(x: jax.Array, kernel: Kernel, dtype, names: tuple[str, str]) -> jax.Array:
  """x [B, L, in] times weights [out, in] -> [B, L, out] in `dtype`, times the scale over out.

  `names`: the logical axes of the weights' out and in dimensions (of the major one where a
  dimension is flattened, e.g. heads for q's heads x head_dim).
  """
  weights, scale = kernel
  if weights.dtype == dtype:
    y = _product(x, weights)
  else:
    y = _in_blocks(x, weights, dtype, names)
  return y if scale is None else y * scale.reshape(-1).astype(dtype)


def _product(x: jax.Array, weights: jax.Array) -> jax.Array:
  """x [B, L, in] . weights [out, in] -> [B, L, out], computed as weights . x^T: with the kernel as
  the left operand XLA:CPU reads it once for all B*L rows. The other order reads it as a library
  gemm's right operand, packed, and is much slower for the few rows of decode and speculative checks
  (2026-12-04, 24 [4864, 896] float32 kernels, 2 cores: 2 rows 37.4 vs 20.5 ms, 6 rows 40.6 vs 26.8,
  16 rows 48.5 vs 25.8, 1024 rows 352 vs 246 for 6 kernels; one row 18 ms either way)."""
  return jnp.moveaxis(jnp.einsum("oi,bli->obl", weights, x), 0, -1)


def _in_blocks(x: jax.Array, weights: jax.Array, dtype, names: tuple[str, str]) -> jax.Array:
  """`dense` of weights stored in another dtype, converted in blocks of rows of each device's shard."""
  out, inp = weights.shape
  out_shards, in_shards = mesh_shards(names)
  rows = out // out_shards
  n = _num_blocks(rows, rows * inp * jnp.dtype(dtype).itemsize // in_shards)
  blocks = nn.with_logical_constraint(weights.reshape(out_shards, n, rows // n, inp),
                                     (names[0], None, None, names[1]))
  parts, zero = [], zero_after(x)
  for k in range(n):  # each block as one [T * rows/n, in] matrix: a 3-D one is transposed by XLA:CPU
    block = blocks[:, k].reshape(out // n, inp).astype(dtype) + zero.astype(dtype)
    part = _product(x, block)
    zero = zero_after(part)
    parts.append(part.reshape(*x.shape[:2], out_shards, rows // n))
  return jnp.stack(parts, axis=3).reshape(*x.shape[:2], out)  # [B, L, T, n, rows/n] -> out
