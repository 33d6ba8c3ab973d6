"""Safetensors files: headers and writing through the `safetensors` package, slices through our own maps.

- `read_header(path)`: `safetensors.safe_open` parses and validates the header (valid JSON, known
  dtypes, shapes matching byte sizes, tensors packed back to back in offset order and covering the
  whole file). It gives names, dtypes and shapes but not byte offsets; since it has checked the
  packing, each tensor's offset is the sum of the sizes before it in `offset_keys()` order. A file
  it rejects is explained here in the loader's terms (which tensor a truncated file cuts off).
- `TensorEntry.memmap()`: our own, for what the package cannot do. The loader reads each
  device's slice of a tensor (bf16 through ml_dtypes, f16, f32) straight from a memory map of the
  tensor's bytes into a page-aligned buffer the device adopts, converting the dtype on the way;
  the package's `get_slice` returns a freshly allocated array per slice, one more copy. A map is
  dropped after use, so the pages it touched leave the process's resident set.
- `write_file`: `safetensors.numpy.save_file`, which writes bfloat16 from ml_dtypes arrays bit for
  bit (tested) and streams from the arrays' own buffers (no second copy in memory).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from qwen_logical.common.errors import QwenLogicalError

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(QwenLogicalError):
  """A tensor or file that is missing, unexpected, misshaped or corrupt."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """Where one tensor lives: file, dtype, shape, absolute byte offset and size."""

  name: str
  path: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int
  nbytes: int

  def memmap(self) -> np.ndarray:
    """A read-only memory map of the tensor (nothing is read until sliced)."""
    if self.nbytes == 0:
      return np.zeros(self.shape, self.dtype)
    return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def read_header(path: str) -> dict[str, TensorEntry]:
  """Every tensor of one file, in file order; CheckpointError naming the file (and tensor) otherwise."""
  try:
    with safetensors.safe_open(path, framework="np") as f:
      names = f.offset_keys()
      layout = [(name, f.get_slice(name)) for name in names]
      layout = [(name, s.get_dtype(), tuple(s.get_shape())) for name, s in layout]
    with open(path, "rb") as f:
      (header_len,) = struct.unpack("<Q", f.read(8))
  except safetensors.SafetensorError as e:
    raise _rejected(path, e) from e
  except OSError as e:
    raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
  entries, offset = {}, 8 + header_len
  for name, dtype_name, shape in layout:
    if dtype_name not in DTYPES:
      raise CheckpointError(f"tensor {name} in {path} has dtype {dtype_name}; supported: {', '.join(DTYPES)}.")
    nbytes = math.prod(shape) * DTYPES[dtype_name].itemsize
    entries[name] = TensorEntry(name, path, DTYPES[dtype_name], shape, offset, nbytes)
    offset += nbytes
  return entries


def _rejected(path: str, error: Exception) -> CheckpointError:
  """The error for a file safetensors rejects: a truncated file names the first tensor it cuts off."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
    if header_len is None or header_len > size - 8:
      return CheckpointError(f"{path} is truncated or not a safetensors file: {size} bytes, and the header "
                             f"{'is missing' if header_len is None else f'claims {header_len}'} ({error}).")
    try:
      header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return CheckpointError(f"{path} is corrupt: its header is not valid JSON ({e}).")
  if not isinstance(header, dict):
    return CheckpointError(f"{path} is corrupt: its header is a JSON {type(header).__name__}, not an object.")
  ends = [(8 + header_len + info["data_offsets"][1], name) for name, info in header.items()
          if name != "__metadata__" and isinstance(info, dict) and isinstance(info.get("data_offsets"), list)
          and len(info["data_offsets"]) == 2 and isinstance(info["data_offsets"][1], int)]
  cut = sorted(e for e in ends if e[0] > size)
  if cut:
    return CheckpointError(f"{path} is truncated: tensor {cut[0][1]} ends at byte {cut[0][0]} but the file has "
                           f"{size} bytes. Re-download or re-export the checkpoint.")
  return CheckpointError(f"{path} is corrupt ({error}). Re-download or re-export the checkpoint.")


def write_file(path: str, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
               metadata: Mapping[str, str] | None = None) -> int:
  """Writes a safetensors file (f32, f16, bf16 or f64 arrays); returns the bytes written."""
  arrays = {}
  for name, array in (tensors.items() if isinstance(tensors, Mapping) else tensors):
    if np.dtype(array.dtype) not in DTYPE_NAMES:
      raise CheckpointError(f"cannot write tensor {name} of dtype {array.dtype}; supported: {list(DTYPES)}.")
    arrays[name] = np.ascontiguousarray(array)  # the package writes the buffer as it lies in memory
  safetensors.numpy.save_file(arrays, path, metadata=dict(metadata or {"format": "pt"}))
  return os.path.getsize(path)
