"""Safetensors files: validated headers, per-tensor memory maps (bf16 via ml_dtypes), and writing.

Reading maps one tensor at a time and drops the map afterwards, so the pages it
touched leave the process's resident set; only the slices asked for are read.
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

from qwen_logical.common.errors import QwenLogicalError

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


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
  """Parses and checks one file's header against its size; CheckpointError naming the file otherwise."""
  try:
    size = os.path.getsize(path)
  except OSError as e:
    raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes, no header).")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > min(_MAX_HEADER, size - 8):
      raise CheckpointError(f"{path} is truncated or corrupt: header claims {header_len} bytes, "
                            f"file has {size}.")
    try:
      header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path} is corrupt: its header is not valid JSON ({e}).") from e
  data_start = 8 + header_len
  entries = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype_name, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(f"{path} is corrupt: bad header entry for tensor {name}: {info!r}") from e
    if dtype_name not in DTYPES:
      raise CheckpointError(f"tensor {name} in {path} has dtype {dtype_name}; supported: "
                            f"{', '.join(DTYPES)}.")
    dtype = DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes or begin < 0:
      raise CheckpointError(f"{path} is corrupt: tensor {name} ({dtype_name}{list(shape)}) should span "
                            f"{nbytes} bytes, header says {begin}..{end}.")
    if data_start + end > size:
      raise CheckpointError(f"{path} is truncated: tensor {name} ends at byte {data_start + end} but the "
                            f"file has {size} bytes. Re-download or re-export the checkpoint.")
    entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, nbytes)
  return entries


def write_file(path: str, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
               metadata: Mapping[str, str] | None = None) -> int:
  """Writes a safetensors file tensor by tensor; returns the bytes written."""
  items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, array in items:
    dtype = np.dtype(array.dtype)
    if dtype not in DTYPE_NAMES:
      raise CheckpointError(f"cannot write tensor {name} of dtype {dtype}; supported: {list(DTYPES)}.")
    header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for _, array in items:
      np.ascontiguousarray(array).tofile(f)
  return 8 + len(encoded) + offset
