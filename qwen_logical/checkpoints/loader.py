"""Loading a validated checkpoint straight into shards.

Each device's slice of each parameter is read from a memory map of its tensor,
through the HF name map and the head layout plan (`hf_names.TensorSpec.read_into`),
into a buffer the device adopts; nothing full-size is built first. With int8
quantization each quantised tensor's per-output-channel scales are computed once per
load (a streaming pass over its rows, `_Scales`) before the first slice that needs them;
each slice is then quantised from a float32 temporary of its own size.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import mmap
import os
import threading
from collections import defaultdict

import jax
import numpy as np
from absl import logging

from qwen_logical.checkpoints.directory import Checkpoint, open_checkpoint
from qwen_logical.checkpoints.hf_names import TensorSpec, stack_shape, tensor_specs
from qwen_logical.common.progress import Progress
from qwen_logical.model import quantization as quant
from qwen_logical.model.config import ModelConfig
from qwen_logical.sharding.partitioner import Partitioner, path_keys


def _leaf_specs(config: ModelConfig) -> dict[tuple[str, ...], list[TensorSpec]]:
  groups: dict[tuple[str, ...], list[TensorSpec]] = defaultdict(list)
  for spec in tensor_specs(config):
    groups[spec.flax_path].append(spec)
    if spec.scale is not None:
      groups[spec.scale.flax_path].append(spec.scale)
  return groups


class _Scales:
  """Each quantised tensor's row scales (f32[out], HF order), computed on first use, once per load.

  A reader that needs a tensor's scales while another computes them waits for that one.
  """

  def __init__(self):
    self._guard = threading.Lock()
    self._locks: dict[str, threading.Lock] = {}
    self._values: dict[str, np.ndarray] = {}

  def get(self, spec: TensorSpec, hf_array: np.ndarray) -> np.ndarray | None:
    if spec.scale is None and not spec.of_scales:
      return None
    with self._guard:
      lock = self._locks.setdefault(spec.hf_name, threading.Lock())
    with lock:
      if spec.hf_name not in self._values:
        self._values[spec.hf_name] = quant.row_scales(hf_array)
      return self._values[spec.hf_name]


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
                slices: list[tuple[tuple[slice, ...], np.ndarray]], scales: _Scales) -> list:
  """Independent pieces of reading one parameter's distinct device slices `(index, out)`.

  A piece maps one tensor (one layer or expert of a stacked parameter) once and reads every slice
  that needs it; a slice larger than _CHUNK_BYTES of an unstacked parameter is split into
  row chunks so that both reader threads share it.
  """
  def task(spec: TensorSpec, reads):
    def run():
      hf_array = checkpoint.entries[spec.hf_name].memmap()
      hf_scales = scales.get(spec, hf_array)
      for sub_index, target in reads:
        spec.read_into(hf_array, layout, sub_index, target, hf_scales)
    return run

  if stacked:  # one task per tensor: its place in the leading (layers, expert) axes of each slice
    by_stack = {spec.stack: spec for spec in specs}
    depth = len(specs[0].stack)
    lead = stack_shape(by_stack)
    reads_of: dict[tuple, list] = defaultdict(list)
    for index, out in slices:
      ranges = [range(n)[i] for n, i in zip(lead, index[:depth])]
      for position in itertools.product(*(range(len(r)) for r in ranges)):
        stack = tuple(r[p] for r, p in zip(ranges, position))
        reads_of[stack].append((index[depth:], out[position]))
    return [task(by_stack[stack], reads) for stack, reads in sorted(reads_of.items())]
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

  def finish(self) -> jax.Array:
    """Waits for the reads; the first device of each slice adopts its buffer, replicas copy."""
    for future in self.futures:
      future.result()
    adopted: set = set()
    arrays = []
    for device, key in self.placement:
      arrays.append(jax.device_put(self.buffers[key], device, may_alias=key not in adopted))
      adopted.add(key)
    self.buffers = {}
    return jax.make_array_from_single_device_arrays(self.shape, self.sharding, arrays)


def _start_leaf(checkpoint: Checkpoint, specs: list[TensorSpec], partitioner: Partitioner,
                shape: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding, scales: _Scales) -> _PendingLeaf:
  """Allocates one parameter's distinct device slices and queues their reads."""
  stacked = bool(specs[0].stack)
  global_shape = tuple(shape.shape)
  shard_shape = sharding.shard_shape(global_shape)
  tensors = [s for s in specs if not s.of_scales]  # a scale parameter reads no tensor of its own
  leaf = _PendingLeaf(global_shape, sharding, {}, [], [], len(tensors),
                      sum(checkpoint.entries[s.hf_name].nbytes for s in tensors))
  slices = []
  for device, index in sharding.addressable_devices_indices_map(global_shape).items():
    key = tuple((s.start, s.stop) for s in index)
    if key not in leaf.buffers:
      leaf.buffers[key] = aligned_empty(shard_shape, shape.dtype)
      slices.append((index, leaf.buffers[key]))
    leaf.placement.append((device, key))
  tasks = _read_tasks(checkpoint, specs, partitioner.layout, stacked, slices, scales)
  leaf.futures = [_readers().submit(t) for t in tasks]
  return leaf


def load_params(checkpoint: Checkpoint, partitioner: Partitioner, progress: bool = True):
  """Sharded params: each device's slice read from the files, nothing full-size built first.

  Each distinct slice is read once into a 64-byte-aligned buffer that the device
  adopts without copying (CPU); each tensor's memory map lives only while it is read.
  Every parameter's reads are queued up front, so the reader threads stay busy across
  parameters while finished ones are handed to the devices in order.
  """
  groups = _leaf_specs(partitioner.config)
  shapes = jax.tree_util.tree_leaves_with_path(partitioner.param_shapes)
  shardings = jax.tree_util.tree_leaves(partitioner.param_shardings)
  bar = Progress(f"Loading {os.path.basename(checkpoint.directory.rstrip('/'))}", len(checkpoint.entries),
                 checkpoint.nbytes, enabled=progress)
  pending, scales = [], _Scales()
  try:
    for (path, shape), sharding in zip(shapes, shardings):
      pending.append(_start_leaf(checkpoint, groups[path_keys(path)], partitioner, shape, sharding, scales))
    leaves = []
    for leaf in pending:
      leaves.append(leaf.finish())
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
                    scan_layers: bool = False, quantization: str = "", progress: bool = True):
  """(sharded params, ModelConfig, Partitioner) for an HF directory on `mesh` under rule `table`.

  `quantization="int8"` stores the kernels int8 with per-output-channel scales, quantised on load
  from the files' bf16 / f16 / f32 values."""
  checkpoint = open_checkpoint(directory, param_dtype=param_dtype, dtype=dtype, scan_layers=scan_layers,
                               quantization=quantization)
  partitioner = Partitioner(checkpoint.config, mesh, table)
  return load_params(checkpoint, partitioner, progress), checkpoint.config, partitioner
