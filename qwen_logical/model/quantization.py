"""Weight-only int8: symmetric, one scale per output channel.

A kernel stored HF-style as [out..., in] (outputs first, the contracted dimensions last:
q/k/v (heads, head_dim, embed), gate/up (mlp, embed), down (embed, mlp), o (embed, heads,
head_dim), embedding and lm_head (vocab, embed)) keeps int8 values `q` and a float32 scale
per output channel (the kernel's shape without its contracted dimensions), so that

    kernel ~= q * scale[..., None],   scale = max |row| / 127,   |kernel - q * scale| <= scale / 2

Contracted dimensions are named by negative axes, so a scanned kernel's leading `layers`
axis changes nothing. The scale param `<kernel>_scale` carries the output dimensions'
logical axes, so every rule table shards it like the rows it scales. Biases and norm scales
are not quantised. Functions work on numpy and jax arrays alike (`xp`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

INT8 = "int8"
QUANTIZATIONS = ("", INT8)  # "" stores kernels in param_dtype
QMAX = 127.0
SCALE_SUFFIX = "_scale"
# The parameters int8 stores quantised (Flax names); every other parameter stays in param_dtype.
KERNELS = ("q_kernel", "k_kernel", "v_kernel", "o_kernel", "gate_kernel", "up_kernel", "down_kernel",
           "embedding", "lm_head")
_CHUNK_BYTES = 32 * 2**20


def is_quantized(name: str, quantization: str) -> bool:
  """Whether parameter `name` (its last path component) is stored int8 under `quantization`."""
  return quantization == INT8 and name in KERNELS


def scale_name(kernel_name: str) -> str:
  return kernel_name + SCALE_SUFFIX


def contracted_axes(kernel_name: str) -> tuple[int, ...]:
  """The contracted (input) dimensions of a kernel, as negative axes: o's (heads, head_dim), else the last."""
  return (-2, -1) if kernel_name == "o_kernel" else (-1,)


def output_part(names_or_shape: Sequence, contracted: Sequence[int]) -> tuple:
  """A kernel's shape or logical axes without the contracted (trailing) dimensions: its scale's."""
  return tuple(names_or_shape)[:len(names_or_shape) - len(contracted)]


def scales_of(kernel, contracted: Sequence[int], xp=np):
  """float32 scale per output channel: max |kernel| over the contracted axes / 127 (1 for all-zero rows,
  whose values all quantise to 0, and for rows so small that the quotient underflows)."""
  scale = xp.max(xp.abs(kernel.astype(xp.float32)), axis=tuple(contracted)) / np.float32(QMAX)
  return xp.where(scale > 0, scale, np.float32(1.0)).astype(xp.float32)


def row_scales(matrix: np.ndarray, chunk_bytes: int = _CHUNK_BYTES) -> np.ndarray:
  """`scales_of` an HF [out, in] weight (e.g. a memory map), read a block of rows at a time.

  Every quantised HF tensor contracts its last axis, so these are its output channels' scales
  in HF order: f32[out].
  """
  rows = matrix.shape[0]
  step = max(1, chunk_bytes // max(1, matrix[:1].nbytes))
  out = np.empty(rows, np.float32)
  for start in range(0, rows, step):
    out[start:start + step] = scales_of(np.asarray(matrix[start:start + step]), (-1,))
  return out


def _expand(scale, contracted: Sequence[int], xp=np):
  return xp.expand_dims(scale, tuple(contracted))


def quantize(kernel, scale, contracted: Sequence[int], xp=np):
  """int8 values of `kernel` for the given per-output-channel `scale` (round half to even)."""
  q = xp.round(kernel.astype(xp.float32) / _expand(scale, contracted, xp))
  return xp.clip(q, -QMAX, QMAX).astype(xp.int8)


def quantize_into(out: np.ndarray, kernel: np.ndarray, scale: np.ndarray, contracted: Sequence[int]) -> None:
  """out[...] = quantize(kernel, scale) with numpy, using float32 `kernel` as scratch (overwritten).

  The loader's form: one float32 temporary per slice instead of four.
  """
  np.divide(kernel, _expand(scale, contracted), out=kernel)
  np.rint(kernel, out=kernel)
  np.clip(kernel, -QMAX, QMAX, out=kernel)
  np.copyto(out, kernel, casting="unsafe")


def dequantize(q, scale, contracted: Sequence[int], dtype=np.float32, xp=np):
  """q * scale in `dtype` (the float kernel the int8 one stands for)."""
  return (q.astype(xp.float32) * _expand(scale, contracted, xp)).astype(dtype)


def storage_bytes(config) -> int:
  """Bytes of the HF model's parameters as `config` stores them (no head padding or repetition):
  int8 kernels and their float32 scales, everything else in param_dtype."""
  itemsize = np.dtype(config.param_dtype).itemsize
  if config.quantization != INT8:
    return config.num_parameters * itemsize
  e, i, d, v = config.hidden_size, config.intermediate_size, config.head_dim, config.vocab_size
  q, kv = config.num_heads * d, config.num_kv_heads * d
  vocab_kernels = 1 if config.tie_word_embeddings else 2
  kernels = config.num_layers * (2 * e * q + 2 * e * kv + 3 * e * i) + vocab_kernels * v * e
  scales = config.num_layers * (q + 2 * kv + 2 * e + 2 * i) + vocab_kernels * v
  return kernels + 4 * scales + (config.num_parameters - kernels) * itemsize
