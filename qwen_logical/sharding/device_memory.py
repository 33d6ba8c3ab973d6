"""Bytes per device of one (model, mesh, rule table): parameters, KV cache, the largest activation.

All from the global shardings (`devices_indices_map`), so every process computes every device's
figures and a split that loads some devices more than others shows at once:

* parameters: every parameter's block on the device, in its stored dtype (int8 scales included);
* KV cache: keys and values of every layer, each one array of `cache_shape` (`axes.KV_CACHE` order)
  in the cache's dtype (an int8 cache adds its scales)
  in the compute dtype;
* activation: the largest single activation the model constrains (hidden states, queries, keys or
  values, the MLP's hidden layer, the logits) for a [batch, length] token batch, in the compute
  dtype: an estimate of the biggest buffer a forward pass holds at once beside the weights, not
  XLA's buffer assignment (jobs/common/host_memory.py reads that from a compiled program, for the
  host-memory bound of a whole run).

Beside them, the *even share* of each: the HF model's parameter bytes (`storage_bytes`: no head
padding or repetition) and the cache with the canonical KV heads, divided by the device count.
A device holding twice its even share holds replicas (data parallelism over `batch`) or repeated
KV heads; the ratio says how much.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Sequence

import jax
import numpy as np

from qwen_logical.model import axes as ax
from qwen_logical.model.cached_attention import SCALE_DTYPE, storage_dtype
from qwen_logical.model.quantization import storage_bytes
from qwen_logical.sharding import validation


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
  """One device's bytes: parameters, KV cache and the largest activation."""

  device: int
  params: int
  kv_cache: int
  activation: int

  @property
  def total(self) -> int:
    return self.params + self.kv_cache + self.activation

  def to_dict(self) -> dict[str, int]:
    return {**dataclasses.asdict(self), "total": self.total}


def block_bytes(shape: Sequence[int], dtype, sharding) -> dict[int, int]:
  """Device id -> bytes of the block of an array of `shape` and `dtype` that `sharding` puts there."""
  itemsize = np.dtype(dtype).itemsize
  return {device.id: itemsize * math.prod(len(range(*s.indices(size))) for s, size in zip(index, shape))
          for device, index in sharding.devices_indices_map(tuple(shape)).items()}


def activation_shapes(partitioner, batch: int, length: int) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """The activations the model constrains, for a [batch, length] batch: label -> (shape, logical names)."""
  cfg, lay = partitioner.config, partitioner.layout
  return {
      "hidden states": ((batch, length, cfg.hidden_size), ax.EMBED_ACTIVATION),
      "queries": ((batch, length, lay.layout_num_heads, cfg.head_dim), ax.QUERY_ACTIVATION),
      "keys/values": ((batch, length, lay.layout_num_kv_heads, cfg.head_dim), ax.KV_ACTIVATION),
      "MLP hidden": ((batch, length, cfg.intermediate_size), ax.MLP_ACTIVATION),
      "logits": ((batch, length, cfg.vocab_size), ax.LOGITS_ACTIVATION),
  }


def even_share(partitioner, cache_shape: Sequence[int] | None = None) -> dict[str, int]:
  """Per device, the HF model's parameter bytes and (with `cache_shape`) the KV cache's bytes with the
  canonical KV heads, each divided evenly over the mesh's devices."""
  p = partitioner
  devices = p.mesh.devices.size
  share = {"params": storage_bytes(p.config) // devices, "kv_cache": 0}
  if cache_shape is not None:
    canonical = [p.config.num_kv_heads if name == ax.CACHE_KV_HEADS else size
                 for name, size in zip(ax.KV_CACHE, cache_shape)]
    per_element = storage_dtype(p.config).itemsize
    if p.config.kv_cache_dtype == "int8":  # plus one scale per head_dim elements
      per_element += np.dtype(SCALE_DTYPE).itemsize / canonical[-1]
    share["kv_cache"] = int(2 * p.config.num_layers * math.prod(canonical) * per_element) // devices
  return share


def device_memory(partitioner, batch: int, length: int, cache_shape: Sequence[int] | None = None
                  ) -> tuple[list[DeviceMemory], str]:
  """(per device, in mesh order; the label of the largest activation, e.g. 'logits [8, 16, 151936]')."""
  p = partitioner
  devices = [d.id for d in p.mesh.devices.flat]
  params: dict[int, int] = defaultdict(int)
  for shape, sharding in zip(jax.tree_util.tree_leaves(p.param_shapes), jax.tree_util.tree_leaves(p.param_shardings)):
    for device, nbytes in block_bytes(shape.shape, shape.dtype, sharding).items():
      params[device] += nbytes
  cache: dict[int, int] = defaultdict(int)
  if cache_shape is not None and not validation.check_array("kv cache", cache_shape, ax.KV_CACHE, p.table,
                                                            p.mesh_shape):
    arrays = [(cache_shape, storage_dtype(p.config), ax.KV_CACHE)]
    if p.config.kv_cache_dtype == "int8":
      arrays.append((tuple(cache_shape[:-1]), np.dtype(SCALE_DTYPE), ax.KV_CACHE_SCALE))
    for shape, dtype, names in arrays:
      for device, nbytes in block_bytes(shape, dtype, p.sharding(names)).items():
        cache[device] += 2 * p.config.num_layers * nbytes
  activation: dict[int, int] = defaultdict(int)
  largest, label = -1, "none"
  for name, (shape, logical) in activation_shapes(p, batch, length).items():
    if validation.check_array(name, shape, logical, p.table, p.mesh_shape):
      continue  # the table cannot split it for this batch; the run says so where it matters
    per_device = block_bytes(shape, p.config.dtype, p.sharding(logical))
    for device, nbytes in per_device.items():
      activation[device] = max(activation[device], nbytes)
    if max(per_device.values()) > largest:
      largest, label = max(per_device.values()), f"{name} {list(shape)}"
  return [DeviceMemory(d, params[d], cache[d], activation[d]) for d in devices], label
