"""The preallocated KV cache: its shapes, logical axes and shardings.

Per layer the cache holds keys and values `[B, K, S, D]` with logical axes
(cache_batch, cache_kv_heads, cache_sequence, cache_head_dim) = `axes.KV_CACHE`
(heads before slots: attention reads each head's [S, D] block contiguously), K being
the head layout's KV head count (repeated KV heads included, so the cache splits over
the same mesh axis as the k/v projections). `cache_shape` is the one place that shape
is made. The tree mirrors the parameters: scanned layers stack one array per kind,
`[N, B, K, S, D]` with a leading `layers` axis; unrolled layers keep one [B, K, S, D]
array per layer.

`ModelConfig.kv_cache_dtype` sets what the cache stores: the compute dtype (""), float32,
bfloat16, or int8 with one bfloat16 scale per token and KV head ('k_scale', 'v_scale':
[.., B, K, S], logical `axes.KV_CACHE_SCALE`), a quarter of float32's bytes and the scales'.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_logical.model import axes as ax
from qwen_logical.sharding import validation
from qwen_logical.model.cached_attention import SCALE_DTYPE, storage_dtype
from qwen_logical.model.config import ModelConfig
from qwen_logical.model.head_layout import KV, HeadLayout

Cache = Any


def layer_arrays(config: ModelConfig, layout: HeadLayout, batch: int, length: int) -> dict[str, tuple]:
  """One layer's cache arrays: kind -> (shape, dtype, logical names); 'k' and 'v', plus their scales
  when int8."""
  shape = cache_shape(config, layout, batch, length)
  arrays = {kind: (shape, storage_dtype(config), ax.KV_CACHE) for kind in ("k", "v")}
  if config.kv_cache_dtype == "int8":
    scale = (shape[:-1], np.dtype(SCALE_DTYPE), ax.KV_CACHE_SCALE)
    arrays.update(k_scale=scale, v_scale=scale)
  return arrays


def _tree(config: ModelConfig, leaf_fn) -> Cache:
  """leaf_fn(kind, leading sizes, leading names) per array of every layer."""
  kinds = ("k", "v", "k_scale", "v_scale") if config.kv_cache_dtype == "int8" else ("k", "v")
  if config.scan_layers:
    return {"layers": {kind: leaf_fn(kind, (config.num_layers,), (ax.LAYERS,)) for kind in kinds}}
  return {f"layers_{i}": {kind: leaf_fn(kind, (), ()) for kind in kinds} for i in range(config.num_layers)}


def cache_shape(config: ModelConfig, layout: HeadLayout, batch: int, length: int) -> tuple[int, ...]:
  """One layer's keys (or values): [B, K, S, D] in the order of `axes.KV_CACHE`, K = layout KV heads."""
  sizes = {ax.CACHE_BATCH: batch, ax.CACHE_KV_HEADS: layout.num_layout_heads(KV),
           ax.CACHE_SEQUENCE: length, ax.CACHE_HEAD_DIM: config.head_dim}
  return tuple(sizes[name] for name in ax.KV_CACHE)


def cache_shapes(config: ModelConfig, layout: HeadLayout, batch: int, length: int) -> Cache:
  """Tree of jax.ShapeDtypeStruct for a cache of `batch` rows and `length` slots."""
  arrays = layer_arrays(config, layout, batch, length)
  return _tree(config, lambda kind, lead, _: jax.ShapeDtypeStruct(lead + arrays[kind][0], arrays[kind][1]))


def cache_logical_axes(config: ModelConfig) -> Cache:
  """Tree of logical-name tuples, e.g. ('layers', 'cache_batch', 'cache_sequence', ...)."""
  return _tree(config, lambda kind, _, names: names + (ax.KV_CACHE_SCALE if kind.endswith("_scale") else ax.KV_CACHE))


def cache_shardings(partitioner, batch: int, length: int) -> Cache:
  """Tree of NamedSharding of the cache under the partitioner's rule table and mesh.

  Raises RuleError (`check_cache`) if a cache of these sizes does not split over the mesh.
  """
  check_cache(partitioner, batch, length)
  return jax.tree_util.tree_map(partitioner.sharding, cache_logical_axes(partitioner.config),
                                is_leaf=lambda x: isinstance(x, tuple))


def cache_bytes(config: ModelConfig, layout: HeadLayout, batch: int, length: int) -> int:
  """Bytes of the whole cache (all devices together)."""
  return sum(s.size * s.dtype.itemsize for s in jax.tree_util.tree_leaves(
      cache_shapes(config, layout, batch, length)))


def bytes_per_slot(config: ModelConfig, layout: HeadLayout) -> int:
  """Bytes one token's slot takes in every layer (keys, values and scales; layout KV heads)."""
  return cache_bytes(config, layout, 1, 1)


def check_cache(partitioner, batch: int, length: int) -> None:
  """Raises RuleError if a cache of `batch` rows x `length` slots does not split over the mesh."""
  shape = cache_shape(partitioner.config, partitioner.layout, batch, length)
  problems = validation.check_array(f"kv cache {shape}", shape, ax.KV_CACHE, partitioner.table,
                                    partitioner.mesh_shape)
  validation.raise_if(problems, partitioner.table, partitioner.mesh_shape)


def zeros_in_jit(partitioner, batch: int, length: int) -> Cache:
  """An empty cache built inside a traced function, constrained to its logical axes."""
  shapes = cache_shapes(partitioner.config, partitioner.layout, batch, length)
  names = cache_logical_axes(partitioner.config)
  return jax.tree_util.tree_map(
      lambda s, n: nn.with_logical_constraint(jnp.zeros(s.shape, s.dtype), n), shapes, names,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
