"""Weight-only int8: symmetric, one scale per output channel.

A kernel stored HF-style as [out..., in] (outputs first, the contracted dimension last:
q/k/v (heads, head_dim, embed), gate/up (mlp, embed), down (embed, mlp), embedding and
lm_head (vocab, embed)) keeps int8 values `q` and a float scale per output channel
(the kernel's shape without the contracted dimension, or without the heads and head_dim
of o (embed, heads, head_dim)), so that

    kernel ~= q * scale[..., None],   scale = max |row| / 127,   |kernel - q * scale| <= scale / 2

The scale carries the output dimensions' logical axes, so every rule table shards it like
the rows it scales. Functions work on numpy and jax arrays alike.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

INT8 = "int8"
QUANTIZATIONS = ("", INT8)  # "" stores kernels in param_dtype
QMAX = 127.0
SCALE_SUFFIX = "_scale"


def contracted_axes(kernel_name: str, ndim: int) -> tuple[int, ...]:
  """The input (contracted) dimensions of a kernel: o's (heads, head_dim), every other kernel's last."""
  return (1, 2) if kernel_name == "o_kernel" else (ndim - 1,)


def scale_shape(kernel_shape: Sequence[int], contracted: Sequence[int]) -> tuple[int, ...]:
  return tuple(n for d, n in enumerate(kernel_shape) if d not in contracted)


def scales_of(kernel, contracted: Sequence[int], xp=np):
  """float32 scale per output channel: max |kernel| over the contracted axes / 127 (1 for all-zero rows)."""
  amax = xp.max(xp.abs(kernel.astype(xp.float32)), axis=tuple(contracted))
  return xp.where(amax > 0, amax / QMAX, 1.0).astype(xp.float32)


def _expand(scale, contracted: Sequence[int], xp=np):
  return xp.expand_dims(scale, tuple(contracted))


def quantize(kernel, scale, contracted: Sequence[int], xp=np):
  """int8 values of `kernel` for the given per-output-channel `scale` (round to nearest)."""
  q = xp.round(kernel.astype(xp.float32) / _expand(scale, contracted, xp))
  return xp.clip(q, -QMAX, QMAX).astype(xp.int8)


def dequantize(q, scale, contracted: Sequence[int], dtype, xp=np):
  """q * scale in `dtype` (the float kernel the int8 one stands for)."""
  return (q.astype(xp.float32) * _expand(scale, contracted, xp)).astype(dtype)
