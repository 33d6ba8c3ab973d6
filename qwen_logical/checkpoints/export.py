"""Exporting params as an HF checkpoint directory: safetensors shards, index, config.json.

Each tensor goes back through the HF name map and the head layout plan (padding
dropped, the first copy of each repeated KV head kept), one tensor at a time.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from qwen_logical.checkpoints import safetensors_io
from qwen_logical.checkpoints.directory import INDEX_FILE, SINGLE_FILE
from qwen_logical.checkpoints.hf_names import CheckpointError, HostValues, hf_tensor_from_flax, tensor_specs
from qwen_logical.common.host import is_main_process
from qwen_logical.common.progress import Progress
from qwen_logical.model.config import SUPPORTED_DTYPES
from qwen_logical.model.hf_config import to_hf_config
from qwen_logical.sharding.partitioner import Partitioner

_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab.json",
               "merges.txt", "special_tokens_map.json")


def _export_dtype(dtype, config) -> np.dtype:
  """`dtype`, else the weights' own: param_dtype, or float32 for int8 kernels (their dequantised values)."""
  out = np.dtype(dtype or (np.float32 if config.quantization else config.param_dtype))
  if out.name not in SUPPORTED_DTYPES:
    raise CheckpointError(f"cannot export in dtype {out.name}; use one of {SUPPORTED_DTYPES}.")
  return out


def _group_into_files(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
  """Consecutive tensor indices per file, each file at most max_shard_bytes (or one tensor)."""
  files: list[list[int]] = [[]]
  used = 0
  for i, size in enumerate(sizes):
    if files[-1] and used + size > max_shard_bytes:
      files.append([])
      used = 0
    files[-1].append(i)
    used += size
  return files


def _write_json(path: str, value: dict) -> str:
  with open(path, "w") as f:
    json.dump(value, f, indent=2)
  return path


def export_checkpoint(params, partitioner: Partitioner, directory: str, *, dtype: str | None = None,
                      max_shard_bytes: int = 4 * 2**30, copy_files_from: str | None = None,
                      progress: bool = True) -> list[str]:
  """Writes params as an HF directory (safetensors shards + index + config.json), head plan undone.

  Returns the files written. `dtype` (default the params' dtype; float32 for int8 params, whose
  kernels are written dequantised) is one of float32, bfloat16, float16. `copy_files_from`
  copies tokenizer and generation config files from another checkpoint directory. In a multi-process job every
  process must call it (each tensor is gathered from all of them); process 0 writes.
  """
  writer = is_main_process()
  config, layout = partitioner.config, partitioner.layout
  out_dtype = _export_dtype(dtype, config)
  specs = tensor_specs(config)
  sizes = [int(np.prod(s.hf_shape)) * out_dtype.itemsize for s in specs]
  files = _group_into_files(sizes, max_shard_bytes)
  names = ([SINGLE_FILE] if len(files) == 1 else
           [f"model-{n + 1:05d}-of-{len(files):05d}.safetensors" for n in range(len(files))])
  if writer:
    os.makedirs(directory, exist_ok=True)
  bar = Progress(f"Exporting to {directory}", len(specs), sum(sizes), enabled=progress)
  host = HostValues(params, config)
  for name, members in zip(names, files):
    tensors = []
    for i in members:  # every process gathers every tensor, in the same order
      tensor = hf_tensor_from_flax(params, specs[i], config, layout, host)
      tensors.append((specs[i].hf_name, tensor.astype(out_dtype)))
      bar.update(1, sizes[i])
    if writer:
      safetensors_io.write_file(os.path.join(directory, name), tensors)
    del tensors
  bar.close()
  written = [os.path.join(directory, n) for n in names]
  if not writer:
    return written
  if len(files) > 1:
    weight_map = {specs[i].hf_name: name for name, members in zip(names, files) for i in members}
    written.append(_write_json(os.path.join(directory, INDEX_FILE),
                               {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}))
  hf_config = to_hf_config(config.replace(param_dtype=out_dtype.name))
  written.append(_write_json(os.path.join(directory, "config.json"), hf_config))
  for side in _SIDE_FILES if copy_files_from else ():
    source = os.path.join(copy_files_from, side)
    if os.path.exists(source):
      written.append(shutil.copy(source, os.path.join(directory, side)))
  return written
