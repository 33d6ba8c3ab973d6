"""The verification suite on tiny models, asserted from its report, and its verdict: it passes a model
whose logits look like a real checkpoint's on every mesh and every table, and fails genuinely wrong models.

The job does the same for each combination however many run, so the real-looking run takes a set that
has every mesh and every table (test_meshes.py runs every mesh x every table against the single device,
test_generate.py greedy tokens on six of them)."""

import copy
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import MESHES, mesh_of
from hf_reference import hf_logits, real_looking_model
from qwen_logical.checkpoints.loader import load_checkpoint
from qwen_logical.jobs.common.build import JobError
from qwen_logical.jobs.verify.job import verify
from qwen_logical.sharding.report import compact_paths
from qwen_logical.jobs.verify.suite import Settings, Suite
from qwen_logical.jobs.verify.verdict import compare_logits, kl_rows, pearson_rows, top_k_overlap, unclaimed_replication
from qwen_logical.sharding.rules import get_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import verify as verify_config  # noqa: E402

LAYERS = 2  # the tiny preset and the test checkpoint
NO_EXPERTS = "the model has no experts: expert_parallel shards it exactly as tensor_parallel"
BROKEN_TP = "heads=None,kv_heads=None,activation_heads=None,activation_kv_heads=None,cache_kv_heads=None"
# Every mesh and table, each collective case of each table (tp_fsdp: all-reduces only, gathers only, both),
# the head layout padded at 8 and 4 shards (14 query / 2 KV heads), one device under two tables.
COMBINATIONS = (("1x1", "tensor_parallel"), ("1x1", "fsdp"), ("1x8", "tensor_parallel"), ("1x8", "tp_fsdp"),
                ("2x4", "tp_fsdp"), ("4x2", "fsdp"), ("8x1", "data_parallel"), ("8x1", "tp_fsdp"))
DENSE_TABLES = tuple(t for t in verify_config.get_config().verify.tables.split(",") if t != "expert_parallel")


def tiny_config(**verify_settings):
  config = verify_config.get_config()
  config.model.preset = "tiny"
  config.verify.seq_len = 16  # greedy prompts of 8..16 tokens
  config.verify.new_tokens = 3
  for key, value in verify_settings.items():
    config.verify[key] = value
  return config



@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("real_looking")
  model = real_looking_model()
  model.save_pretrained(str(directory))
  return str(directory), model


@pytest.fixture(scope="module")
def full_run(real_checkpoint):
  """The suite on COMBINATIONS with the default verdict on the real-looking checkpoint: (report, suite)."""
  config = tiny_config(combinations=",".join(f"{m}:{t}" for m, t in COMBINATIONS))
  config.checkpoint = real_checkpoint[0]
  suite = Suite(config, Settings.from_config(config.verify))
  return verify(config, suite), suite


def _by_combination(report):
  return {(e["mesh"], e["rules"]): e for e in report["combinations"]}


def test_every_mesh_and_table_agrees_with_single_device_on_real_looking_logits(real_checkpoint, full_run):
  report, suite = full_run
  assert report["ok"], report["verdict"]
  logits = suite.reference.logits
  assert logits.std() >= 3 and np.abs(logits).max() >= 25, (logits.std(), np.abs(logits).max())
  # The single-device run every combination matched is itself transformers' model.
  np.testing.assert_allclose(logits, hf_logits(real_checkpoint[1], suite.tokens), atol=1e-4, rtol=0)
  entries = _by_combination(report)
  assert list(entries) == list(COMBINATIONS)
  assert {m for m, _ in entries} == set(MESHES) and {t for _, t in entries} == set(DENSE_TABLES)
  for key, e in entries.items():
    assert e["status"] == "ok" and e["weights"] == "loaded from the checkpoint", (key, e.get("failures"))
    # Float32 summed in another order: far inside every tolerance (measured: <= 0.001 of the
    # logit tolerance, 1-PCC <= 2e-12, KL <= 2e-14).
    assert e["tolerance_used"] < 0.01 and 1 - e["pcc_min"] < 1e-9 and e["kl_mean"] < 1e-10, key
    assert e["top_k_overlap_min"] == 1.0 and e["greedy_tokens_agree"], key
    assert len(e["pictures"]) == 6, key  # embedding, q, k, o, up, down kernels (tied: no lm_head)
    assert all(t >= 0 for t in e["timings"].values())
  assert entries[("1x1", "fsdp")]["max_abs_logit_diff"] == 0  # one device: the same program
  # The greedy tokens themselves are what every combination matched.
  assert len(report["reference"]["tokens"]) == 8
  assert all(len(t) == 3 for t in report["reference"]["tokens"])


def _counts(entry):
  return {kind: c["count"] for kind, c in entry["collectives"].items() if c["count"]}


def test_collectives_are_those_each_table_implies(full_run):
  for (mesh, table), entry in _by_combination(full_run[0]).items():
    batch, model = map(int, mesh.split("x"))
    counts = _counts(entry)
    if table == "data_parallel":
      # Data parallel: no communication in the forward pass, on any mesh.
      assert counts == {}, mesh
    elif table == "tensor_parallel":
      # Tensor parallel: one all-reduce after attention and one after the MLP per layer, plus
      # one for the vocab-parallel embedding lookup; nothing when the model axis is 1.
      assert counts == ({"all-reduce": 2 * LAYERS + 1} if model > 1 else {}), (mesh, counts)
    elif table == "fsdp":
      # FSDP: every layer's 7 kernels gathered, no all-reduce.
      if batch * model > 1:
        assert counts.get("all-gather", 0) >= 7 * LAYERS and "all-reduce" not in counts, (mesh, counts)
      else:
        assert counts == {}
    else:
      # 2-D: tensor parallel's all-reduces over 'model' and FSDP's gathers over 'batch'.
      assert ("all-reduce" in counts) == (model > 1), (mesh, counts)
      assert ("all-gather" in counts) == (batch > 1), (mesh, counts)


def test_per_device_bytes_follow_the_table(full_run):
  entries = _by_combination(full_run[0])
  single = max(entries[("1x1", "tensor_parallel")]["bytes_by_device"].values())
  for (mesh, table), entry in entries.items():
    if mesh != "1x1" and table == "data_parallel":
      assert set(entry["bytes_by_device"].values()) == {single}  # every device holds everything
    if mesh != "1x1" and table == "fsdp":
      assert max(entry["bytes_by_device"].values()) < single / 6
  assert max(entries[("1x8", "tensor_parallel")]["bytes_by_device"].values()) < single / 4


def _forward_with_positions(partitioner):
  """jit(params, tokens, positions) -> logits of the plain forward pass with explicit positions."""
  def forward(params, tokens, positions):
    with partitioner.bound():
      return partitioner.model.apply({"params": params}, tokens, jax.numpy.ones_like(tokens), positions)
  return jax.jit(forward)


def _kv_head_0_into_group_1(params, layer):
  params = copy.deepcopy(params)
  for name in ("k_kernel", "v_kernel", "k_bias", "v_bias"):
    array = params[layer]["attention"][name]
    array[1] = array[0]  # query heads 7..13 attend with KV head 0's keys and values
  return params


def test_the_verdict_fails_wrong_models_and_passes_an_equivalent_one(real_checkpoint):
  params, _, part = load_checkpoint(real_checkpoint[0], mesh_of("1x1"), get_table("tensor_parallel"),
                                    scan_layers=False, progress=False)
  params = jax.tree_util.tree_map(np.asarray, params)
  tokens = np.random.RandomState(0).randint(0, 256, (8, 32)).astype(np.int32)
  positions = np.broadcast_to(np.arange(32, dtype=np.int32), tokens.shape)
  forward = _forward_with_positions(part)
  run = lambda p, pos=positions: np.asarray(forward(p, tokens, pos))
  right = run(params)
  assert right.std() >= 3 and np.abs(right).max() >= 25
  swapped = {**params, "layers_0": params["layers_1"], "layers_1": params["layers_0"]}
  wrong = {
      "KV head 0 repeated into group 1 (first layer)": run(_kv_head_0_into_group_1(params, "layers_0")),
      "KV head 0 repeated into group 1 (last layer)": run(_kv_head_0_into_group_1(params, "layers_1")),
      "two layers' weights swapped": run(swapped),
      "RoPE positions off by one from the middle on": run(params, positions + (positions >= 16)),
      "RoPE position of the last token off by one": run(params, positions + (positions == 31)),
  }
  tol = Settings.from_config(verify_config.get_config().verify).tolerances
  for what, logits in wrong.items():
    c = compare_logits(logits, right, tol)
    # Each criterion on its own fails every wrong model (measured: >= 550x the logit tolerance,
    # 1-PCC >= 0.26, mean KL >= 1.9e-4, top-100 overlap <= 0.67).
    assert c.tolerance_used > 100 and 1 - c.pcc_min > 100 * (1 - tol.min_pcc), (what, c)
    assert c.kl_mean > 10 * tol.max_kl and c.top_k_overlap_min < tol.min_top_k_overlap, (what, c)
    assert len(c.failures(tol)) == 4, (what, c.failures(tol))
  # Every position shifted by one is the same model (RoPE sees only relative positions): it passes.
  shifted = compare_logits(run(params, positions + 1), right, tol)
  assert shifted.failures(tol) == [] and shifted.max_abs_logit_diff > 0


def test_a_table_that_replicates_what_it_claims_fails_with_nonzero_exit(tmp_path):
  report_path = tmp_path / "verify.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "main.py", "--config=configs/verify.py", "--config.model.preset=tiny",
       "--config.verify.combinations=1x1:tensor_parallel,1x8:tensor_parallel,1x8:data_parallel",
       "--config.verify.seq_len=16", "--config.verify.new_tokens=1",
       f"--config.rule_overrides={BROKEN_TP}", f"--config.report={report_path}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "VERIFICATION FAILED" in result.stdout
  report = json.loads(report_path.read_text())
  assert not report["ok"]
  entries = _by_combination(report)
  broken = entries[("1x8", "tensor_parallel+overrides")]
  assert broken["status"] == "fail" and broken["weights"] == "the reference's weights, loaded"
  # The numbers still agree: replication is wrong, not inaccurate, and is caught anyway.
  assert broken["tolerance_used"] < 0.01 and broken["greedy_tokens_agree"]
  assert all(f.startswith("replicated parameter axis") for f in broken["failures"]), broken["failures"]
  flagged = " ".join(broken["failures"])
  for kernel in ("q_kernel", "k_kernel", "v_kernel", "o_kernel"):
    assert f"layers_0/attention/{kernel}" in flagged
  # On one device nothing can be split, so nothing is claimed; data parallel claims nothing.
  assert entries[("1x1", "tensor_parallel+overrides")]["status"] == "ok"
  assert entries[("1x8", "data_parallel+overrides")]["status"] == "ok"


def test_combinations_that_cannot_fit_are_skipped_with_the_reason(capsys):
  report = verify(tiny_config(meshes="1x8,2x8", tables="tensor_parallel,data_parallel,expert_parallel", batch_size=4,
                              weights="init"))
  entries = _by_combination(report)
  assert report["ok"], report["verdict"]
  skipped = entries[("1x8", "data_parallel")]
  assert skipped["status"] == "skipped"
  assert "token batch (4, 16)" in skipped["reason"] and "(--config.verify.batch_size)" in skipped["reason"]
  assert entries[("1x8", "tensor_parallel")]["status"] == "ok"  # sharded init is the same model
  assert entries[("1x8", "expert_parallel")] == {"mesh": "1x8", "rules": "expert_parallel", "status": "skipped",
                                                 "reason": NO_EXPERTS}
  for table in ("tensor_parallel", "data_parallel", "expert_parallel"):
    assert entries[("2x8", table)]["status"] == "skipped"
    assert "needs 16 devices; 8 available" in entries[("2x8", table)]["reason"]
  assert "1 agree, 0 FAILED, 5 skipped" in report["verdict"]
  assert f"skipped 1x8 x expert_parallel: {NO_EXPERTS}\n" in capsys.readouterr().out


def test_expert_parallel_is_skipped_for_a_dense_model_and_runs_for_experts():
  config = verify_config.get_config()
  assert config.verify.tables.split(",")[-1] == "expert_parallel" and config.verify.combinations == ""
  config.model.preset = "tiny"
  config.rule_overrides = "mlp=None"
  suite = Suite(config, Settings.from_config(config.verify))
  assert not suite.model_config.is_moe and suite.model_config.scan_layers  # fsdp in the tables: scanned
  for mesh in MESHES:  # nothing built, nothing compiled: no reference needed
    assert suite.run_combination(mesh, "ep") == {"mesh": mesh, "rules": "expert_parallel+overrides",
                                                 "status": "skipped", "reason": NO_EXPERTS}
  config.model.preset = "tiny-qwen3-moe"
  moe = Suite(config, Settings.from_config(config.verify))
  assert moe.model_config.is_moe and moe._partitioner("2x4", "ep", {}).table.name == "expert_parallel+overrides"


def test_combinations_are_every_mesh_x_every_table_or_the_listed_ones():
  v = verify_config.get_config().verify
  every = Settings.from_config(v)
  assert every.combinations == tuple((m, t) for m in MESHES for t in every.tables)
  v.combinations = " 2x4:tp_fsdp, 1x8:ep,2x4:fsdp "
  listed = Settings.from_config(v)
  assert listed.combinations == (("2x4", "tp_fsdp"), ("1x8", "ep"), ("2x4", "fsdp"))
  assert listed.meshes == ("2x4", "1x8") and listed.tables == ("tp_fsdp", "ep", "fsdp")
  v.combinations = "2x4"
  with pytest.raises(JobError, match="list MESH:TABLE items"):
    Settings.from_config(v)


def test_unclaimed_replication_names_parameter_and_axis():
  from qwen_logical.model.config import preset
  from qwen_logical.sharding.partitioner import Partitioner
  part = Partitioner(preset("tiny"), mesh_of("2x4"), get_table("fsdp", "embed=batch"))
  found = unclaimed_replication(part)
  assert found and all("'embed' is claimed sharded over batch+model" in f and "missing model" in f for f in found)
  assert not unclaimed_replication(Partitioner(preset("tiny"), mesh_of("2x4"), get_table("fsdp")))


def test_the_logit_tolerance_scales_with_each_position():
  tol = Settings.from_config(verify_config.get_config().verify).tolerances  # atol 1e-4, rtol 1e-3
  reference = np.zeros((2, 4))
  reference[0, 0], reference[1, 0] = 30.0, 0.5  # a real-sized position and a small one
  noisy = reference + 2e-3  # within 1e-4 + 1e-3 * 30 = 0.0301, beyond 1e-4 + 1e-3 * 0.5 = 0.0006
  c = compare_logits(noisy, reference, tol)
  assert c.tolerance_used == pytest.approx(2e-3 / 6e-4)
  assert c.max_rel_logit_diff == pytest.approx(2e-3 / 0.5)
  assert compare_logits(noisy[:1], reference[:1], tol).tolerance_used == pytest.approx(2e-3 / 0.0301)
  # Positions are compared a chunk at a time; the chunk size changes nothing.
  rng = np.random.RandomState(0)
  reference = 3 * rng.randn(3, 5, 40)
  candidate = reference + 1e-3 * rng.randn(*reference.shape)
  assert compare_logits(candidate, reference, tol, rows_per_chunk=4) == compare_logits(candidate, reference, tol)


def test_pcc_kl_and_top_k_overlap():
  x = np.array([[1.0, 2.0, 4.0], [0.0, 1.0, -1.0]])
  np.testing.assert_allclose(pearson_rows(2 * x + 1, x), [1.0, 1.0])
  np.testing.assert_allclose(pearson_rows(-x, x), [-1.0, -1.0])
  # KL([.5, .5] || [.25, .75]) = .5 ln 2 + .5 ln(2/3)
  np.testing.assert_allclose(kl_rows(np.log([[0.25, 0.75]]), np.zeros((1, 2))),
                             [0.5 * np.log(2) + 0.5 * np.log(2 / 3)])
  assert kl_rows(x + 5, x).max() < 1e-15  # a constant shift is the same distribution
  ref = np.arange(10.0)[None]
  assert top_k_overlap(ref, ref, 3).tolist() == [1.0]
  swapped = ref.copy()
  swapped[0, [6, 9]] = swapped[0, [9, 6]]  # 9 leaves the top 3, 6 enters
  assert top_k_overlap(swapped, ref, 3).tolist() == [2 / 3]


def test_replicated_paths_of_unrolled_layers_are_folded():
  paths = ["final_norm/scale", "layers_0/input_norm/scale", "layers_1/input_norm/scale", "layers_10/mlp/up_kernel"]
  assert compact_paths(paths) == "final_norm/scale, layers_*/input_norm/scale (2 layers), layers_*/mlp/up_kernel (1 layer)"
