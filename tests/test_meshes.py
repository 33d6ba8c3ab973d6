"""Every mesh x every rule table gives the single-device logits, with heads really split."""

import functools

import numpy as np
import pytest

from conftest import MESHES, mesh_of
from qwen_logical.model import axes as ax
from qwen_logical.model.config import preset
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import TABLES, get_table

# The tiny preset has 14 query / 2 KV heads: it needs the head layout plan at 4 and 8 shards.
CONFIG = preset("tiny").replace(initializer_range=0.1, scan_layers=True)
TOKENS = np.random.RandomState(3).randint(0, CONFIG.vocab_size, (8, 12))


@functools.lru_cache(maxsize=None)
def reference_logits(scan: bool) -> np.ndarray:
  part = Partitioner(CONFIG.replace(scan_layers=scan), mesh_of("1x1"), get_table("tensor_parallel"))
  return np.asarray(part.forward(part.init(seed=0), TOKENS))


def _top100(logits):
  return np.sort(np.argsort(-logits, axis=-1)[..., :100], axis=-1)


# expert_parallel differs from tensor_parallel only in experts, which this dense model lacks:
# test_qwen3 runs the mixture of experts on every mesh and table.
@pytest.mark.parametrize("table", sorted(set(TABLES) - {"expert_parallel"}))
@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_and_table_match_single_device(mesh, table):
  part = Partitioner(CONFIG, mesh_of(mesh), get_table(table))
  output = part.forward(part.init(seed=0), TOKENS)
  # Rules are bound per Partitioner: the jit cache never hands back another table's program.
  assert output.sharding.spec == part.sharding(ax.LOGITS_ACTIVATION).spec
  logits = np.asarray(output)
  expected = reference_logits(True)
  assert expected.std() > 0.5
  assert np.abs(logits - expected).max() <= 1e-5
  np.testing.assert_array_equal(_top100(logits), _top100(expected))


@pytest.mark.parametrize("mesh", ["1x8", "2x4"])
def test_unrolled_layers_match_single_device(mesh):
  part = Partitioner(CONFIG.replace(scan_layers=False), mesh_of(mesh), get_table("tp_fsdp"))
  logits = np.asarray(part.forward(part.init(seed=0), TOKENS))
  assert np.abs(logits - reference_logits(False)).max() <= 1e-5


@pytest.mark.parametrize("mesh,shards", [("1x8", 8), ("2x4", 4), ("4x2", 2)])
def test_tensor_parallel_really_splits_attention(mesh, shards):
  """No mesh silently replicates attention: q/k/v/o shards hold 1/T of the (layout) heads."""
  part = Partitioner(CONFIG, mesh_of(mesh), get_table("tensor_parallel"))
  params = part.init(seed=0)
  attention = params["layers"]["attention"]
  layout = part.layout
  assert layout.layout_num_heads % shards == 0 and layout.layout_num_kv_heads % shards == 0
  # Scanned kernels: q/k/v (layers, heads, head_dim, embed), o (layers, embed, heads, head_dim).
  for name, heads, axis in [("q_kernel", layout.layout_num_heads, 1), ("k_kernel", layout.layout_num_kv_heads, 1),
                            ("v_kernel", layout.layout_num_kv_heads, 1), ("o_kernel", layout.layout_num_heads, 2)]:
    for shard in attention[name].addressable_shards:
      assert shard.data.shape[axis] == heads // shards, name
  # Padded query heads are exactly zero in q and o; repeated KV heads are equal copies.
  source = layout.source("query")
  q = np.asarray(attention["q_kernel"])
  assert np.all(q[:, source < 0] == 0) and np.all(np.asarray(attention["o_kernel"])[:, :, source < 0] == 0)
  k = np.asarray(attention["k_kernel"])
  for copy in range(1, layout.kv_repeat):
    np.testing.assert_array_equal(k[:, copy::layout.kv_repeat], k[:, ::layout.kv_repeat])


def test_init_is_the_same_model_on_every_mesh():
  """Random init depends on (seed, canonical head), not on the mesh layout."""
  from qwen_logical.checkpoints.hf_names import hf_from_flax
  single = Partitioner(CONFIG, mesh_of("1x1"), get_table("tensor_parallel"))
  split = Partitioner(CONFIG, mesh_of("1x8"), get_table("tensor_parallel"))
  a = hf_from_flax(single.init(seed=0), CONFIG, single.layout)
  b = hf_from_flax(split.init(seed=0), CONFIG, split.layout)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
