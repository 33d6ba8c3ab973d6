"""The head layout plan over every Qwen2.5 head shape: the index map, load/export, init, errors.

Numpy parts cover every (head shape, head shards 1..16); the init part runs the one random init
(Partitioner.init, sharding/init.py) on 1x8 for every head shape and on 1x2 / 1x4 for a few (each
mesh is a set of compiles), against 1x1.
"""

import functools

import jax
import ml_dtypes
import numpy as np
import pytest

from qwen_logical.checkpoints.hf_names import flax_from_hf, get_path, hf_from_flax, tensor_specs
from qwen_logical.inference import kv_cache
from qwen_logical.model.config import ModelConfig
from qwen_logical.model.head_layout import KV, PADDING, QUERY, HeadLayoutError, plan_heads
from qwen_logical.sharding.mesh import make_mesh
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import get_table

HEAD_SHAPES = {  # Qwen2.5 size: (query heads, KV heads)
    "0.5b": (14, 2), "1.5b": (12, 2), "3b": (16, 2), "7b": (28, 4), "14b/32b": (40, 8), "72b": (64, 8)}
SHARDS = (1, 2, 4, 8, 16)
CASES = [(name, t) for name in HEAD_SHAPES for t in SHARDS]


def tiny_config(heads: int, kv_heads: int) -> ModelConfig:
  """The real head counts with everything else tiny (head_dim 2, hidden 6, one unrolled layer)."""
  return ModelConfig(vocab_size=16, hidden_size=6, intermediate_size=8, num_layers=1, num_heads=heads,
                     num_kv_heads=kv_heads, head_dim=2, scan_layers=False)


def head_slice(axis: int, heads) -> tuple:
  return (slice(None),) * axis + (heads,)


@functools.lru_cache(maxsize=None)
def hf_tensors(name: str, dtype) -> dict:
  config = tiny_config(*HEAD_SHAPES[name])
  rng = np.random.default_rng(len(name))
  return {s.hf_name: rng.standard_normal(s.hf_shape).astype(dtype) for s in tensor_specs(config)}


# --- the index map ------------------------------------------------------------------------

def test_the_map_by_hand():
  """7B (28 / 4) on 8 shards: KV heads twice each, query groups of 7 padded to 8."""
  layout = plan_heads(28, 4, 8)
  q = [h for g in range(4) for h in list(range(7 * g, 7 * g + 7)) + [PADDING]]
  np.testing.assert_array_equal(layout.source(QUERY), q)
  np.testing.assert_array_equal(layout.source(KV), [0, 0, 1, 1, 2, 2, 3, 3])
  assert layout.runs(QUERY) == [(0, 7, 0), (7, 8, PADDING), (8, 15, 7), (15, 16, PADDING), (16, 23, 14),
                                (23, 24, PADDING), (24, 31, 21), (31, 32, PADDING)]
  assert layout.runs(QUERY, slice(4, 12)) == [(0, 3, 4), (3, 4, PADDING), (4, 8, 7)]
  assert layout.runs(KV, slice(2, 5)) == [(0, 1, 1), (1, 3, 1)]  # heads 1 | 1, 2
  assert plan_heads(28, 4, 4).is_identity and plan_heads(28, 4, 2).source(KV).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("name,shards", CASES)
def test_every_shard_attends_with_its_own_group(name, shards):
  """Each canonical query head appears once, each KV head kv_repeat times; the layout's grouping
  (query head j uses KV head j // (H_layout / K_layout)) pairs every query head with its own
  canonical KV head, on the same shard; the counts are the map's lengths."""
  heads, kv_heads = HEAD_SHAPES[name]
  layout = plan_heads(heads, kv_heads, shards)
  q, kv = layout.source(QUERY), layout.source(KV)
  assert (len(q), len(kv)) == (layout.layout_num_heads, layout.layout_num_kv_heads)
  assert len(q) % shards == 0 and len(kv) % shards == 0
  assert sorted(q[q != PADDING].tolist()) == list(range(heads))
  assert np.bincount(kv).tolist() == [layout.kv_repeat] * kv_heads
  layout_group = np.arange(len(q)) // (len(q) // len(kv))  # the layout KV head of each query head
  real = q != PADDING
  np.testing.assert_array_equal(kv[layout_group[real]], q[real] // (heads // kv_heads))
  np.testing.assert_array_equal(layout_group // (len(kv) // shards), np.arange(len(q)) // (len(q) // shards))


# --- loading and export through the HF name map -------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("name,shards", CASES)
def test_load_then_export_is_bit_exact(name, shards, dtype):
  config = tiny_config(*HEAD_SHAPES[name])
  layout = plan_heads(config.num_heads, config.num_kv_heads, shards)
  tensors = hf_tensors(name, dtype)
  params = flax_from_hf(tensors, config, layout)
  for spec in tensor_specs(config):
    value = get_path(params, spec.flax_path)
    assert value.shape == spec.layout_shape(layout), spec.hf_name
    if spec.head_axis is None:
      continue
    source, canonical = layout.source(spec.head_kind), spec.view(tensors[spec.hf_name])
    for j, head in enumerate(source):  # padded heads zero, every other (repeated ones too) its source
      expected = np.zeros_like(canonical[head_slice(spec.head_axis, 0)]) if head == PADDING else \
          canonical[head_slice(spec.head_axis, head)]
      np.testing.assert_array_equal(value[head_slice(spec.head_axis, j)], expected,
                                    err_msg=f"{spec.hf_name} layout head {j}")
    size = value.shape[spec.head_axis] // shards  # each shard's slice read alone equals its part
    for start in range(0, value.shape[spec.head_axis], size):
      index = head_slice(spec.head_axis, slice(start, start + size))
      np.testing.assert_array_equal(spec.read(tensors[spec.hf_name], layout, index, dtype), value[index])
  exported = hf_from_flax(params, config, layout)
  assert set(exported) == set(tensors)
  for hf_name, original in tensors.items():
    assert exported[hf_name].dtype == original.dtype
    np.testing.assert_array_equal(exported[hf_name].view(np.uint8), original.view(np.uint8), err_msg=hf_name)


# --- random init ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def exported_init(name: str, shards: int) -> tuple:
  """(HF tensors of Partitioner.init on mesh 1xshards, the layout params' attention, Partitioner).

  Each parameter is made in its shards: a device hashes its own heads only, through the head
  layout's index map (tests/test_meshes.py runs the same init for the tiny preset's 14 / 2 heads).
  """
  config = tiny_config(*HEAD_SHAPES[name])
  part = Partitioner(config, make_mesh(f"1x{shards}", devices=jax.devices()[:shards]), get_table("tensor_parallel"))
  assert part.layout.shards == shards
  params = part.init(seed=3, progress=False)
  for array, sharding in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(part.param_shardings)):
    assert array.sharding.is_equivalent_to(sharding, array.ndim)  # made in its shards
  attention = jax.tree_util.tree_map(np.asarray, params["layers_0"]["attention"])
  return hf_from_flax(params, config, part.layout), attention, part


# Every head shape on 1x8 (repeat + pad: 0.5b, 1.5b, 7b; repeat only: 3b; plain split: 14b, 72b)
# and a few of each kind on 1x2, 1x4: each mesh compiles its init programs, and the numpy tests cover every case.
INIT_CASES = [(name, 8) for name in HEAD_SHAPES] + [("0.5b", 4), ("1.5b", 4), ("7b", 2)]

@pytest.mark.parametrize("name,shards", INIT_CASES)
def test_init_on_every_mesh_is_the_single_device_model(name, shards):
  reference, _, _ = exported_init(name, 1)
  exported, attention, part = exported_init(name, shards)
  for hf_name, value in reference.items():
    np.testing.assert_array_equal(exported[hf_name], value, err_msg=hf_name)
  layout = part.layout
  q, kv = layout.source(QUERY), layout.source(KV)
  assert np.all(attention["q_kernel"][q == PADDING] == 0) and np.all(attention["q_bias"][q == PADDING] == 0)
  assert np.all(attention["o_kernel"][:, q == PADDING] == 0)
  assert np.all(attention["q_kernel"][q != PADDING] != 0) and np.all(attention["o_kernel"][:, q != PADDING] != 0)
  for kind in ("k_kernel", "v_kernel", "k_bias", "v_bias"):
    assert np.all(attention[kind] != 0), kind
    for copy in range(1, layout.kv_repeat):  # repeated KV heads are equal copies
      np.testing.assert_array_equal(attention[kind][copy::layout.kv_repeat], attention[kind][::layout.kv_repeat])
  cache = kv_cache.cache_shapes(part.config, layout, 2, 8)["layers_0"]["k"]
  assert cache.shape == (2, len(kv), 8, part.config.head_dim)
  assert kv_cache.cache_shardings(part, 2, 8)["layers_0"]["k"].shard_shape(cache.shape)[1] == len(kv) // shards


# --- where no exact layout exists -------------------------------------------------------------

@pytest.mark.parametrize("kv_heads,shards,options,best", [(4, 3, "[1, 2]", 2), (4, 6, "[1, 2, 4]", 4),
                                                          (8, 12, "[1, 2, 4, 8]", 8), (2, 3, "[1, 2]", 2)])
def test_no_exact_layout_names_the_options(kv_heads, shards, options, best):
  with pytest.raises(HeadLayoutError) as error:
    plan_heads(7 * kv_heads, kv_heads, shards)
  message = str(error.value)
  assert f"{kv_heads} KV heads cannot be split exactly over {shards} shards" in message
  assert f"one of {options} devices" in message and f"--config.mesh=1x{best}" in message
  assert "--config.rules=fsdp" in message


def test_partitioner_on_a_mesh_with_no_layout():
  config = tiny_config(28, 4)
  mesh = make_mesh("1x6", devices=jax.devices()[:6])
  with pytest.raises(HeadLayoutError, match=r"4 KV heads .* over 6 shards.*Options"):
    Partitioner(config, mesh, get_table("tensor_parallel"))
  assert Partitioner(config, mesh, get_table("fsdp")).layout.is_identity


def test_invalid_head_split():
  with pytest.raises(HeadLayoutError, match="multiple of KV heads"):
    plan_heads(14, 4, 2)
  with pytest.raises(HeadLayoutError, match="shards positive"):
    plan_heads(14, 2, 0)
