"""Per-device bytes and the collectives of the compiled forward pass under tensor parallelism."""

import math

import jax
import numpy as np
import pytest

from conftest import mesh_of
from qwen_logical.sharding.collectives import count_collectives
from qwen_logical.model.config import preset
from qwen_logical.sharding.init import init_programs
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.report import sharding_report
from qwen_logical.sharding.rules import get_table

CONFIG = preset("tiny").replace(scan_layers=True)


def test_tensor_parallel_bytes_per_device():
  part = Partitioner(CONFIG, mesh_of("1x8"), get_table("tensor_parallel"))
  params = part.init(seed=0)
  report = sharding_report(part, params)
  # Expectation from first principles: under Megatron TP only norm scales are replicated;
  # everything else is split 8 ways.
  expected_replicated = {"final_norm/scale", "layers/input_norm/scale", "layers/post_attention_norm/scale"}
  assert set(report.replicated) == expected_replicated
  sizes = {"/".join(str(k.key) for k in path): leaf.size * leaf.dtype.itemsize
           for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  replicated = sum(b for name, b in sizes.items() if name in expected_replicated)
  sharded = sum(b for name, b in sizes.items() if name not in expected_replicated)
  expected = sharded // 8 + replicated
  assert len(report.bytes_by_device) == 8
  for device, measured in report.bytes_by_device.items():
    assert measured == expected, device
  assert sharded / 8 / (sharded / 8 + replicated) > 0.95
  text = report.format()
  for name in expected_replicated:
    assert name in text
  assert "Per-device MiB" in text and "query groups padded 7 -> 8" in text


def test_fsdp_bytes_are_spread_over_every_device():
  part = Partitioner(CONFIG, mesh_of("2x4"), get_table("fsdp"))
  report = sharding_report(part, part.init(seed=0))
  total = report.total_bytes
  replicated = sum(r.bytes_total for r in report.rows if r.replicated)
  assert all(b == (total - replicated) // 8 + replicated for b in report.bytes_by_device.values())


def _collectives(table, mesh, layers=3):
  cfg = CONFIG.replace(num_layers=layers, scan_layers=False)
  part = Partitioner(cfg, mesh_of(mesh), get_table(table))
  return count_collectives(part.lower_forward(8, 12).compile().as_text())


def test_tensor_parallel_forward_has_only_the_designed_collectives():
  """Per layer one all-reduce after attention and one after the MLP, plus one for the
  vocab-parallel embedding lookup; the logits stay vocab-sharded. Any all-gather fails."""
  layers = 3
  counts = _collectives("tensor_parallel", "1x8", layers)
  assert counts["all-reduce"]["count"] == 2 * layers + 1
  activation_bytes = 8 * 12 * CONFIG.hidden_size * 4
  assert counts["all-reduce"]["bytes"] == (2 * layers + 1) * activation_bytes
  for kind in ("all-gather", "reduce-scatter", "all-to-all", "collective-permute"):
    assert counts[kind]["count"] == 0, (kind, counts)


def test_data_parallel_forward_has_no_collectives():
  counts = _collectives("data_parallel", "1x8")
  assert all(v["count"] == 0 for v in counts.values()), counts


def test_fsdp_forward_gathers_weights():
  counts = _collectives("fsdp", "1x8")
  assert counts["all-gather"]["count"] >= 7 * 3  # every layer's kernels are gathered
  assert counts["all-reduce"]["count"] == 0


def test_count_collectives_parses_async_and_tuples():
  text = """
  %ar = f32[4,8]{1,0} all-reduce(%x), replica_groups={}
  %ag-start = (f32[2]{0}, f32[8]{0}) all-gather-start(%y)
  %z = bf16[16]{0} add(%a, %b)
  """
  counts = count_collectives(text)
  assert counts["all-reduce"] == {"count": 1, "bytes": 128}
  assert counts["all-gather"] == {"count": 1, "bytes": 40}


def test_sharded_init_never_builds_a_full_parameter():
  """The compiled init holds only shard-sized arrays of every sharded parameter (per device)."""
  import re
  part = Partitioner(CONFIG, mesh_of("1x8"), get_table("tensor_parallel"))
  hlo = "\n".join(fn.lower(np.uint32(0), np.int32(0)).compile().as_text()
                  for fn in init_programs(part).values())
  shapes = {tuple(int(d) for d in m.split(",") if d) for m in re.findall(r"[a-z]+\d*\[([\d,]*)\]", hlo)}
  largest = max(math.prod(s) for s in shapes)
  sharded = [r for r in sharding_report(part).rows if not r.replicated]
  smallest_full = min(math.prod(r.shape) for r in sharded if math.prod(r.shape) >= 8 * 1024)
  # Every big parameter (embedding, lm_head, q/o/mlp kernels) exists only as its 1/8 shards.
  assert largest < smallest_full, (largest, smallest_full)
  assert largest == max(math.prod(r.shard_shape) for r in sharded)


@pytest.mark.parametrize("table", ["tensor_parallel", "fsdp"])
def test_scanned_layers_count_collectives_per_layer(table):
  """A collective in the scanned layer loop counts once per iteration, as if unrolled."""
  cfg = CONFIG.replace(num_layers=3)
  unrolled = _collectives(table, "1x8", layers=3)
  part = Partitioner(cfg.replace(scan_layers=True), mesh_of("1x8"), get_table(table))
  scanned = count_collectives(part.lower_forward(8, 12).compile().as_text())
  for kind in ("all-reduce", "all-gather"):
    assert scanned[kind]["count"] == unrolled[kind]["count"], (kind, scanned, unrolled)


def test_init_is_the_same_model_for_scanned_and_unrolled_layers_and_every_table():
  """Init values depend on (seed, parameter, layer, canonical position) only: the layer form and the
  table do not change the model, a seed does, and values have the configured spread."""
  from qwen_logical.checkpoints.hf_names import hf_from_flax
  exported = {}
  for scan, table, seed in ((True, "tensor_parallel", 0), (False, "fsdp", 0), (False, "tp_fsdp", 1)):
    cfg = CONFIG.replace(scan_layers=scan, num_layers=3)
    part = Partitioner(cfg, mesh_of("2x4"), get_table(table))
    exported[(scan, table, seed)] = hf_from_flax(part.init(seed=seed), cfg, part.layout)
  a, b, c = exported.values()
  assert all(np.array_equal(a[name], b[name]) for name in a)
  q = a["model.layers.1.self_attn.q_proj.weight"]
  assert not np.array_equal(q, c["model.layers.1.self_attn.q_proj.weight"])
  assert not np.array_equal(q, a["model.layers.2.self_attn.q_proj.weight"])
  assert abs(q.std() / CONFIG.initializer_range - 1) < 0.05 and abs(q.mean()) < 0.1 * CONFIG.initializer_range
  assert np.array_equal(a["model.norm.weight"], np.ones(CONFIG.hidden_size, np.float32))
