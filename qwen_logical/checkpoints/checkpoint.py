"""HF Qwen2 checkpoint directories: validate, load straight into shards, export.

A directory holds `config.json` and either `model.safetensors` or
`model.safetensors.index.json` with the shards it names. Everything is checked
(config, index, every file header, every tensor name and shape) before a byte of
tensor data is read; then each device's slice of each parameter is read from a
memory map of its tensor (`jax.make_array_from_callback`), through the HF name
map and the head layout plan (`hf_params.py`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import mmap
import os
import re
import shutil
from collections import defaultdict
from typing import Sequence

import jax
import numpy as np
from absl import logging

from qwen_logical.checkpoints import safetensors_io
from qwen_logical.model.config import ModelConfig, from_hf_config, to_hf_config
from qwen_logical.checkpoints.hf_names import CheckpointError, TensorSpec, get_path, hf_tensor_from_flax, tensor_specs
from qwen_logical.sharding.partitioner import Partitioner, path_str
from qwen_logical.common.progress import Progress

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write that are not parameters.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab.json",
               "merges.txt", "special_tokens_map.json")


@dataclasses.dataclass
class Checkpoint:
  """A validated checkpoint: its config and where every tensor the model needs lives."""

  directory: str
  config: ModelConfig
  entries: dict[str, safetensors_io.TensorEntry]
  files: list[str]

  @property
  def nbytes(self) -> int:
    return sum(e.nbytes for e in self.entries.values())

  @property
  def dtypes(self) -> set[str]:
    return {str(e.dtype) for e in self.entries.values()}


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{what} {path} is not valid JSON: {e}") from e


def _tensor_files(directory: str) -> tuple[list[str], dict[str, str] | None]:
  index_path = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index_path):
    index = _read_json(index_path, "index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f"index {index_path} has no 'weight_map'.")
    files = sorted(set(weight_map.values()))
    for name in files:
      if not os.path.exists(os.path.join(directory, name)):
        owners = [t for t, f in weight_map.items() if f == name]
        raise CheckpointError(f"index {index_path} names shard {name}, which is missing from {directory} "
                              f"(it should hold {len(owners)} tensors, e.g. {owners[0]}). Copy the "
                              "complete checkpoint.")
    return [os.path.join(directory, f) for f in files], weight_map
  single = os.path.join(directory, SINGLE_FILE)
  if os.path.exists(single):
    return [single], None
  raise CheckpointError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; point "
                        "--config.checkpoint at a Hugging Face model directory.")


def open_checkpoint(directory: str, **config_overrides) -> Checkpoint:
  """Validates a checkpoint directory against its config.json; reads headers only."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory} does not exist.")
  config = from_hf_config(directory, **config_overrides)
  files, weight_map = _tensor_files(directory)
  entries: dict[str, safetensors_io.TensorEntry] = {}
  for path in files:
    for name, entry in safetensors_io.read_header(path).items():
      if name in entries:
        raise CheckpointError(f"tensor {name} appears in both {entries[name].path} and {path}.")
      entries[name] = entry
  if weight_map is not None:
    for name, file in weight_map.items():
      if name not in entries or os.path.basename(entries[name].path) != file:
        raise CheckpointError(f"index {INDEX_FILE} places tensor {name} in {file}, but that file "
                              "does not contain it: the checkpoint is incomplete or mixed up.")
  specs = tensor_specs(config)
  needed = {s.hf_name for s in specs}
  missing = [s.hf_name for s in specs if s.hf_name not in entries]
  if missing:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise CheckpointError(f"{directory} lacks {len(missing)} tensor(s) the config needs: {shown}.")
  extra = sorted(n for n in entries if n not in needed and not _IGNORED.match(n))
  if config.tie_word_embeddings and "lm_head.weight" in extra:
    logging.warning("%s: ignoring lm_head.weight: config.json ties it to the embedding.", directory)
    extra.remove("lm_head.weight")
  if extra:
    raise CheckpointError(f"{directory} has {len(extra)} tensor(s) this Qwen2 model does not use: "
                          f"{', '.join(extra[:5])}. Is config.json from the same model?")
  for spec in specs:
    entry = entries[spec.hf_name]
    if entry.shape != spec.hf_shape:
      raise CheckpointError(f"tensor {spec.hf_name} in {os.path.basename(entry.path)} has shape "
                            f"{entry.shape}, expected {spec.hf_shape} from config.json.")
  return Checkpoint(directory, config, {n: entries[n] for n in needed}, files)


def _leaf_specs(config: ModelConfig) -> dict[tuple[str, ...], list[TensorSpec]]:
  groups: dict[tuple[str, ...], list[TensorSpec]] = defaultdict(list)
  for spec in tensor_specs(config):
    groups[spec.flax_path].append(spec)
  return groups


@functools.lru_cache(maxsize=1)
def _readers() -> concurrent.futures.ThreadPoolExecutor:
  """Threads that read and convert slices (numpy releases the GIL while copying/converting)."""
  return concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                               thread_name_prefix="qwen_logical_load")


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  """An uninitialised, page-aligned array of `shape` that XLA:CPU can adopt without a copy.

  Large buffers are anonymous maps advised to use transparent huge pages (as numpy
  does for its own large arrays): one fault per 2 MiB instead of per 4 KiB. Pages are
  not populated here but faulted in by whichever reader thread writes them first, so
  the cost of fresh memory is spread over the reader threads.
  """
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  if nbytes < 2**21:
    raw = np.empty(nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)
  buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
  if hasattr(mmap, "MADV_HUGEPAGE"):
    buffer.madvise(mmap.MADV_HUGEPAGE)
  return np.frombuffer(buffer, dtype=dtype).reshape(shape)


_CHUNK_BYTES = 32 * 2**20


def _read_tasks(checkpoint: Checkpoint, specs: list[TensorSpec], layout, stacked: bool,
                slices: list[tuple[tuple[slice, ...], np.ndarray]]) -> list:
  """Independent pieces of reading one parameter's distinct device slices `(index, out)`.

  A piece maps one tensor (one layer of a stacked parameter) once and reads every slice
  that needs it; a slice larger than _CHUNK_BYTES of an unstacked parameter is split into
  row chunks so that both reader threads share it.
  """
  def task(spec: TensorSpec, reads):
    def run():
      hf_array = checkpoint.entries[spec.hf_name].memmap()
      for sub_index, target in reads:
        spec.read_into(hf_array, layout, sub_index, target)
    return run

  if stacked:
    by_layer: dict[int, list] = defaultdict(list)
    for index, out in slices:
      for position, layer in enumerate(range(len(specs))[index[0]]):
        by_layer[layer].append((index[1:], out[position]))
    return [task(specs[layer], reads) for layer, reads in sorted(by_layer.items())]
  small = [(index, out) for index, out in slices if out.ndim == 0 or out.nbytes <= _CHUNK_BYTES]
  tasks = [task(specs[0], small)] if small else []
  for index, out in slices:
    if out.ndim == 0 or out.nbytes <= _CHUNK_BYTES:
      continue
    first = index[0].start or 0
    rows = max(1, _CHUNK_BYTES // (out.nbytes // out.shape[0]))
    tasks += [task(specs[0], [((slice(first + a, first + min(a + rows, out.shape[0])),) + tuple(index[1:]),
                               out[a:a + rows])]) for a in range(0, out.shape[0], rows)]
  return tasks


@dataclasses.dataclass
class _PendingLeaf:
  """One parameter being read: its distinct slices' buffers and which device gets which."""

  shape: tuple[int, ...]
  sharding: jax.sharding.Sharding
  buffers: dict
  placement: list
  futures: list
  num_tensors: int
  nbytes: int


def load_params(checkpoint: Checkpoint, partitioner: Partitioner, progress: bool = True):
  """Sharded params: each device's slice read from the files, nothing full-size built first.

  Each distinct slice is read once into a 64-byte-aligned buffer that the device
  adopts without copying (CPU); each tensor's memory map lives only while it is read.
  Every parameter's reads are queued up front, so the reader threads stay busy across
  parameters while finished ones are handed to the devices in order.
  """
  config, layout = partitioner.config, partitioner.layout
  groups = _leaf_specs(config)
  shapes = jax.tree_util.tree_leaves_with_path(partitioner.param_shapes)
  shardings = jax.tree_util.tree_leaves(partitioner.param_shardings)
  bar = Progress(f"Loading {os.path.basename(checkpoint.directory.rstrip('/'))}", len(checkpoint.entries),
                 checkpoint.nbytes, enabled=progress)
  pending = []
  try:
    for (path, shape), sharding in zip(shapes, shardings):
      specs = groups[tuple(str(getattr(k, "key", k)) for k in path)]
      stacked = specs[0].layer is not None and config.scan_layers
      global_shape = tuple(shape.shape)
      shard_shape = sharding.shard_shape(global_shape)
      leaf = _PendingLeaf(global_shape, sharding, {}, [], [], len(specs),
                          sum(checkpoint.entries[s.hf_name].nbytes for s in specs))
      slices = []
      for device, index in sharding.addressable_devices_indices_map(global_shape).items():
        key = tuple((s.start, s.stop) for s in index)
        if key not in leaf.buffers:
          leaf.buffers[key] = aligned_empty(shard_shape, shape.dtype)
          slices.append((index, leaf.buffers[key]))
        leaf.placement.append((device, key))
      leaf.futures = [_readers().submit(t) for t in _read_tasks(checkpoint, specs, layout, stacked, slices)]
      pending.append(leaf)
    leaves = []
    for leaf in pending:
      for future in leaf.futures:
        future.result()
      adopted: set = set()
      arrays = []
      for device, key in leaf.placement:  # the first device of each slice adopts its buffer; replicas copy
        arrays.append(jax.device_put(leaf.buffers[key], device, may_alias=key not in adopted))
        adopted.add(key)
      leaves.append(jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, arrays))
      leaf.buffers = {}
      bar.update(leaf.num_tensors, leaf.nbytes)
  finally:  # on an error, queued reads need not run
    for leaf in pending:
      for future in leaf.futures:
        future.cancel()
  elapsed = bar.close()
  logging.info("Loaded %d tensors (%.1f MiB) in %.2f s onto %s", len(checkpoint.entries),
               checkpoint.nbytes / 2**20, elapsed, partitioner.name)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(partitioner.param_shapes), leaves)


def load_checkpoint(directory: str, mesh, table, *, param_dtype: str = "float32", dtype: str = "float32",
                    scan_layers: bool = True, progress: bool = True):
  """(sharded params, ModelConfig, Partitioner) for an HF directory on `mesh` under rule `table`."""
  checkpoint = open_checkpoint(directory, param_dtype=param_dtype, dtype=dtype, scan_layers=scan_layers)
  partitioner = Partitioner(checkpoint.config, mesh, table)
  return load_params(checkpoint, partitioner, progress), checkpoint.config, partitioner


def export_checkpoint(params, partitioner: Partitioner, directory: str, *, dtype: str | None = None,
                      max_shard_bytes: int = 4 * 2**30, copy_files_from: str | None = None,
                      progress: bool = True) -> list[str]:
  """Writes params as an HF directory (safetensors shards + index + config.json), head plan undone.

  Returns the files written. `copy_files_from` copies tokenizer and generation
  config files from another checkpoint directory. In a multi-process job every
  process must call it (each tensor is gathered from all of them); process 0 writes.
  """
  from qwen_logical.sharding.distributed import is_main_process
  writer = is_main_process()
  config, layout = partitioner.config, partitioner.layout
  out_dtype = np.dtype(safetensors_io.DTYPES[{"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[
      dtype or config.param_dtype]])
  specs = tensor_specs(config)
  sizes = [int(np.prod(s.hf_shape)) * out_dtype.itemsize for s in specs]
  shards: list[list[int]] = [[]]
  used = 0
  for i, size in enumerate(sizes):
    if shards[-1] and used + size > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(i)
    used += size
  if writer:
    os.makedirs(directory, exist_ok=True)
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))])
  bar = Progress(f"Exporting to {directory}", len(specs), sum(sizes), enabled=progress)
  weight_map = {}
  for name, members in zip(names, shards):
    def tensors(members=members):
      for i in members:
        spec = specs[i]
        yield spec.hf_name, hf_tensor_from_flax(params, spec, config, layout).astype(out_dtype)
        bar.update(1, sizes[i])
    shard = list(tensors())
    if writer:
      safetensors_io.write_file(os.path.join(directory, name), shard)
    del shard
    weight_map.update({specs[i].hf_name: name for i in members})
  bar.close()
  written = [os.path.join(directory, n) for n in names]
  if not writer:
    return written
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
    written.append(os.path.join(directory, INDEX_FILE))
  hf_config = to_hf_config(config.replace(param_dtype=dtype or config.param_dtype))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  written.append(os.path.join(directory, "config.json"))
  if copy_files_from:
    for side in _SIDE_FILES:
      source = os.path.join(copy_files_from, side)
      if os.path.exists(source):
        shutil.copy(source, os.path.join(directory, side))
        written.append(os.path.join(directory, side))
  return written

