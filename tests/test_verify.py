"""The verification suite on the tiny config: every mesh x every table, asserted from its report."""

import functools
import json
import os
import subprocess
import sys

import numpy as np

from hf_reference import hf_logits, tiny_hf_model
from qwen_logical.sharding.rules import get_table
from qwen_logical.jobs.verify import Settings, Suite, top_k_overlap, unclaimed_replication, verify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import verify as verify_config  # noqa: E402

LAYERS = 2  # the tiny preset
BROKEN_TP = "heads=None,kv_heads=None,activation_heads=None,activation_kv_heads=None,cache_kv_heads=None"


def tiny_config(**verify_settings):
  config = verify_config.get_config()
  config.model.preset = "tiny"
  config.model.initializer_range = 0.1  # logits with std ~1, so the tolerance is meaningful
  config.verify.max_logit_diff = 1e-5
  config.verify.seq_len = 16  # greedy prompts of 8..16 tokens
  config.verify.new_tokens = 3
  for key, value in verify_settings.items():
    config.verify[key] = value
  return config


@functools.lru_cache(maxsize=None)
def full_report():
  return verify(tiny_config())


def _by_combination(report):
  return {(e["mesh"], e["rules"]): e for e in report["combinations"]}


def test_every_mesh_and_table_agrees_with_single_device():
  report = full_report()
  assert report["ok"], report["verdict"]
  entries = _by_combination(report)
  assert set(entries) == {(m, t) for m in ("1x1", "1x8", "2x4", "4x2", "8x1")
                          for t in ("tensor_parallel", "data_parallel", "fsdp", "tp_fsdp")}
  assert report["reference"]["logits_std"] > 0.5
  for key, e in entries.items():
    assert e["status"] == "ok", (key, e.get("failures"))
    assert 0 <= e["max_abs_logit_diff"] <= 1e-5, key
    assert e["top_k_overlap_min"] == 1.0 and e["greedy_tokens_agree"], key
    assert len(e["pictures"]) == 7, key  # embedding, q, k, o, up, down kernels and lm_head
    assert all(t >= 0 for t in e["timings"].values())
  # The greedy tokens themselves are what every combination matched.
  assert len(report["reference"]["tokens"]) == 8
  assert all(len(t) == 3 for t in report["reference"]["tokens"])


def _counts(entry):
  return {kind: c["count"] for kind, c in entry["collectives"].items() if c["count"]}


def test_collectives_are_those_each_table_implies():
  entries = _by_combination(full_report())
  for mesh in ("1x1", "1x8", "2x4", "4x2", "8x1"):
    batch, model = map(int, mesh.split("x"))
    # Data parallel: no communication in the forward pass, on any mesh.
    assert _counts(entries[(mesh, "data_parallel")]) == {}, mesh
    # Tensor parallel: one all-reduce after attention and one after the MLP per layer, plus
    # one for the vocab-parallel embedding lookup; nothing when the model axis is 1.
    tp = _counts(entries[(mesh, "tensor_parallel")])
    assert tp == ({"all-reduce": 2 * LAYERS + 1} if model > 1 else {}), (mesh, tp)
    # FSDP: every layer's 7 kernels gathered (scanned layers count once per layer), no all-reduce.
    fsdp = _counts(entries[(mesh, "fsdp")])
    if batch * model > 1:
      assert fsdp.get("all-gather", 0) >= 7 * LAYERS and "all-reduce" not in fsdp, (mesh, fsdp)
    else:
      assert fsdp == {}
    # 2-D: tensor parallel's all-reduces over 'model' and FSDP's gathers over 'batch'.
    two_d = _counts(entries[(mesh, "tp_fsdp")])
    assert ("all-reduce" in two_d) == (model > 1), (mesh, two_d)
    assert ("all-gather" in two_d) == (batch > 1), (mesh, two_d)


def test_per_device_bytes_follow_the_table():
  entries = _by_combination(full_report())
  single = max(entries[("1x1", "tensor_parallel")]["bytes_by_device"].values())
  for mesh in ("1x8", "2x4", "4x2", "8x1"):
    dp = entries[(mesh, "data_parallel")]
    assert set(dp["bytes_by_device"].values()) == {single}  # every device holds everything
    assert max(entries[(mesh, "fsdp")]["bytes_by_device"].values()) < single / 6
  assert max(entries[("1x8", "tensor_parallel")]["bytes_by_device"].values()) < single / 4


def test_a_table_that_replicates_what_it_claims_fails_with_nonzero_exit(tmp_path):
  report_path = tmp_path / "verify.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "main.py", "--config=configs/verify.py", "--config.model.preset=tiny",
       "--config.verify.meshes=1x1,1x8", "--config.verify.tables=tensor_parallel,data_parallel",
       f"--config.rule_overrides={BROKEN_TP}", f"--config.report={report_path}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "VERIFICATION FAILED" in result.stdout
  report = json.loads(report_path.read_text())
  assert not report["ok"]
  entries = _by_combination(report)
  broken = entries[("1x8", "tensor_parallel+overrides")]
  assert broken["status"] == "fail"
  # The numbers still agree: replication is wrong, not inaccurate, and is caught anyway.
  assert broken["max_abs_logit_diff"] <= 1e-4 and broken["greedy_tokens_agree"]
  flagged = " ".join(broken["failures"])
  for kernel in ("q_kernel", "k_kernel", "v_kernel", "o_kernel"):
    assert f"layers/attention/{kernel}" in flagged
  # On one device nothing can be split, so nothing is claimed; data parallel claims nothing.
  assert entries[("1x1", "tensor_parallel+overrides")]["status"] == "ok"
  assert entries[("1x8", "data_parallel+overrides")]["status"] == "ok"


def test_combinations_that_cannot_fit_are_skipped_with_the_reason():
  report = verify(tiny_config(meshes="1x8,2x8", tables="tensor_parallel,data_parallel", batch_size=4,
                              weights="init"))
  entries = _by_combination(report)
  assert report["ok"], report["verdict"]
  skipped = entries[("1x8", "data_parallel")]
  assert skipped["status"] == "skipped"
  assert "token batch (4, 16)" in skipped["reason"] and "--config.verify.batch_size" in skipped["reason"]
  assert entries[("1x8", "tensor_parallel")]["status"] == "ok"  # sharded init is the same model
  for table in ("tensor_parallel", "data_parallel"):
    assert entries[("2x8", table)]["status"] == "skipped"
    assert "needs 16 devices; 8 available" in entries[("2x8", table)]["reason"]
  assert "1 agree, 0 FAILED, 3 skipped" in report["verdict"]


def test_checkpoint_suite_matches_transformers(tmp_path):
  model = tiny_hf_model(heads=14, kv_heads=2, hidden=112, tied=True)
  model.save_pretrained(str(tmp_path))
  config = tiny_config(meshes="1x8,2x4", tables="tensor_parallel,tp_fsdp", max_logit_diff=1e-4)
  config.checkpoint = str(tmp_path)
  config.model.initializer_range = None
  suite = Suite(config, Settings.from_config(config.verify))
  report = verify(config, suite)
  assert report["ok"], report["verdict"]
  assert all(e["weights"] == "loaded from the checkpoint" for e in report["combinations"])
  # The single-device run every combination matched is itself transformers' model.
  np.testing.assert_allclose(suite.reference.logits, hf_logits(model, suite.tokens), atol=1e-4, rtol=0)


def test_unclaimed_replication_names_parameter_and_axis():
  from conftest import mesh_of
  from qwen_logical.model.config import preset
  from qwen_logical.sharding.partitioner import Partitioner
  part = Partitioner(preset("tiny"), mesh_of("2x4"), get_table("fsdp", "embed=batch"))
  found = unclaimed_replication(part)
  assert found and all("'embed' is claimed sharded over batch+model" in f and "missing model" in f for f in found)
  assert not unclaimed_replication(Partitioner(preset("tiny"), mesh_of("2x4"), get_table("fsdp")))


def test_top_k_overlap():
  ref = np.arange(10.0)[None]
  assert top_k_overlap(ref, ref, 3).tolist() == [1.0]
  swapped = ref.copy()
  swapped[0, [6, 9]] = swapped[0, [9, 6]]  # 9 leaves the top 3, 6 enters
  assert top_k_overlap(swapped, ref, 3).tolist() == [2 / 3]
