"""The large-model verification job (configs/verify_7b.py) on the tiny model: references once per weight
storage, kept on disk, combinations in processes of their own, host-memory estimates and skips.

The estimate's bound on the measured peak is not asserted here: at tiny sizes the process itself
(tens of MiB of compiler and runtime noise) dominates; the estimate's pieces are checked instead.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import mesh_of
from qwen_logical.jobs.common import host_memory
from qwen_logical.jobs.verify_large import job as verify_large
from qwen_logical.jobs.common.build import JobError
from qwen_logical.jobs.verify_large.plan import Combination, Plan, parse_combinations
from qwen_logical.model.config import preset
from qwen_logical.model.quantization import storage_bytes
from qwen_logical.sharding.mesh import MeshError
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import RuleError, get_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import verify_7b  # noqa: E402

BATCH, LENGTH = 8, 16


def tiny_config(combinations: str, **verify_settings):
  config = verify_7b.get_config()
  config.model.preset = "tiny"
  config.verify.combinations = combinations
  for key, value in verify_settings.items():
    config.verify[key] = value
  return config


def tiny_bf16():
  return preset("tiny").replace(param_dtype="bfloat16", dtype="float32")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  """main.py on two combinations (bf16 and int8), logits kept: (report, stdout, the logits directory)."""
  directory = tmp_path_factory.mktemp("verify_large")
  report_path = directory / "report.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "main.py", "--config=configs/verify_7b.py", "--config.model.preset=tiny",
       "--config.verify.combinations=1x8:tensor_parallel,2x4:tp_fsdp:int8:activation_batch=None",
       f"--config.verify.keep_dir={directory / 'logits'}", f"--config.report={report_path}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(report_path.read_text()), result.stdout, directory / "logits"


def test_each_reference_runs_once_and_every_combination_agrees_with_its_own(job):
  report, stdout, _ = job
  assert report["ok"] and "Verification passed: 2 agree, 0 FAILED, 0 skipped of 2 combinations (4 processes)" \
      in stdout, stdout
  assert [(r["mesh"], r["weights"], r["status"]) for r in report["references"]] == [
      ("1x1", "bfloat16", "ok"), ("1x1", "int8", "ok")]
  entries = {(e["mesh"], e["rules"], e["weights"]): e for e in report["combinations"]}
  assert set(entries) == {("1x8", "tensor_parallel", "bfloat16"), ("2x4", "tp_fsdp[activation_batch=None]", "int8")}
  for entry in report["references"] + list(entries.values()):  # every run on the job's copy of the package
    assert entry["package"] == str(job[2] / "code" / "qwen_logical"), entry["package"]
  for entry in entries.values():
    assert entry["status"] == "ok" and entry["failures"] == [], entry
    assert entry["tolerance_used"] < 0.05 and 1 - entry["pcc_min"] < 1e-9 and entry["kl_mean"] < 1e-9, entry
    assert entry["top_k_overlap_min"] == 1.0
    # The kernel's peak of a process that imported JAX, next to the estimate's pieces.
    assert entry["peak_rss_bytes"] > 100 * 2**20 and entry["peak_after_init_bytes"] <= entry["peak_rss_bytes"]
    e = entry["estimate"]
    assert e["total"] == (e["overhead"] + e["params"] + max(e["forward_temp"] + e["forward_output"], e["init_temp"])
                          + e["host_logits"])
  assert entries[("2x4", "tp_fsdp[activation_batch=None]", "int8")]["estimate"]["init_temp"] > 0
  assert "peak GiB | estimate GiB" in stdout and re.search(r"\n1x1 +\| tensor_parallel +\| int8 +\| reference", stdout)


def test_the_references_on_disk_are_the_1x1_runs_and_differ_by_storage(job):
  report, _, logits = job
  bf16, int8 = (np.load(logits / f"reference_{name}.npy", mmap_mode="r") for name in ("bfloat16", "int8"))
  partitioner = Partitioner(tiny_bf16(), mesh_of("1x1"), get_table("tensor_parallel"))
  tokens = np.random.RandomState(0).randint(0, 256, (BATCH, LENGTH))
  expected = np.asarray(partitioner.forward(partitioner.init(0, progress=False), tokens))
  np.testing.assert_allclose(bf16, expected, rtol=1e-5, atol=1e-6)
  # Each combination was judged against the reference of its own storage: the int8 run agrees with
  # the int8 reference and would fail against the bf16 one.
  tolerances = Plan.from_config(tiny_config("1x8:tensor_parallel")).tolerances
  int8_run = str(logits / "run1.npy")
  assert verify_large.compare_files(int8_run, str(logits / "reference_int8.npy"), tolerances)["failures"] == []
  against_bf16 = verify_large.compare_files(int8_run, str(logits / "reference_bfloat16.npy"), tolerances)
  assert against_bf16["tolerance_used"] > 2 and against_bf16["failures"], against_bf16
  assert np.abs(np.asarray(int8) - bf16).max() > 10 * report["combinations"][1]["max_abs_logit_diff"]


def test_a_run_over_its_allowance_is_skipped_with_the_figures_before_any_weight(tmp_path):
  config = tiny_config("2x4:tensor_parallel")
  suite = verify_large.LargeSuite(config, Plan.from_config(config), str(tmp_path))
  entry = suite.run(Combination("2x4", "tensor_parallel"), "forced", allowance=2**20)
  assert entry["status"] == "skipped", entry
  match = re.fullmatch(r"needs (\d+) MiB \(process [\d.]+ \+ parameters [\d.]+ \+ forward temporaries [\d.]+ \+ "
                       r"outputs [\d.]+ \+ host logits [\d.]+ GiB\), this host allows 1 MiB \(95% of the memory "
                       r"available when it started; --config.verify.host_memory_fraction\)", entry["reason"])
  assert match and int(match[1]) == round(entry["estimate"]["total"] / 2**20), entry["reason"]
  assert "weights_s" not in entry["timings"] and not os.path.exists(tmp_path / "forced.npy")


def test_a_job_whose_references_cannot_fit_skips_everything_and_has_not_passed():
  config = tiny_config("1x8:tensor_parallel,8x1:fsdp", host_memory_fraction=1e-9)
  report = verify_large.main(config)
  assert not report["ok"] and report["verdict"].startswith("0 agree, 0 FAILED, 2 skipped of 2 combinations "
                                                           "(1 process)"), report["verdict"]
  assert report["references"][0]["status"] == "skipped" and "this host allows 0 MiB" in \
      report["references"][0]["reason"]
  for entry in report["combinations"]:
    assert entry["reason"].startswith("its 1x1 bfloat16 reference did not run (skipped: needs "), entry


@pytest.mark.parametrize("quantization", ["", "int8"])
def test_the_estimate_pieces_are_the_arrays_and_programs_they_name(eight_devices, quantization):
  cfg = tiny_bf16().replace(quantization=quantization)
  partitioner = Partitioner(cfg, mesh_of("2x4"), get_table("tensor_parallel"))
  compiled = partitioner.lower_forward(BATCH, LENGTH).compile()
  estimate = host_memory.estimate(partitioner, compiled, (BATCH, LENGTH, cfg.vocab_size))
  assert 50 * 2**20 < estimate.overhead <= host_memory.peak_rss_bytes()
  params = partitioner.init(0, progress=False)
  held = sum(shard.data.nbytes for array in jax.tree_util.tree_leaves(params) for shard in array.addressable_shards)
  assert estimate.params == held >= 2 * storage_bytes(cfg)  # tensor_parallel on 2x4: two replicas, padded heads
  stats = compiled.memory_analysis()
  workspace = host_memory.ynn_workspace_bytes(compiled.as_text())
  assert estimate.forward_temp == 8 * (stats.temp_size_in_bytes + workspace) > 0
  logits_bytes = BATCH * LENGTH * cfg.vocab_size * 4  # split over batch and vocab: one copy over the devices
  assert estimate.forward_output == logits_bytes == estimate.host_logits
  if quantization:  # a kernel's float32 values before its scales: the lm_head's, in its 8 shards of 2 replicas
    assert estimate.init_temp >= 2 * cfg.vocab_size * cfg.hidden_size * 4
  else:  # the bf16 hash init fuses into its output: a few scalars per device
    assert estimate.init_temp <= 8 * 64
  assert estimate.total == (estimate.overhead + held + max(estimate.forward_temp + logits_bytes, estimate.init_temp)
                            + logits_bytes)
  assert host_memory.over_allowance(estimate, estimate.total, 0.5) == ""
  assert host_memory.over_allowance(estimate, estimate.total - 1, 0.5).startswith("needs ")


YNN_MODULE = """HloModule m
%fused (param_0: f32[4,8]) -> f32[4] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  ROOT %r = f32[4]{0} reduce(%param_0), dimensions={1}
}
ENTRY %main (p: f32[4,8], w: bf16[8,16]) -> (f32[4], f32[4,16]) {
  %p = f32[4,8]{1,0} parameter(0)
  %w = bf16[8,16]{1,0} parameter(1)
  %big = f32[100,8]{1,0} fusion(%p), kind=kLoop, calls=%f1
  %ynn_fusion = f32[4]{0} fusion(%big, %p), kind=kCustom, calls=%fused, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %ynn_fusion.1 = f32[4,16]{1,0} fusion(%p, %w), kind=kCustom, calls=%f3, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %loop = f32[400,8]{1,0} fusion(%big), kind=kLoop, calls=%f4
  ROOT %t = (f32[4]{0}, f32[4,16]{1,0}) tuple(%ynn_fusion, %ynn_fusion.1)
}
"""


def test_ynn_workspace_is_the_operands_of_the_largest_ynn_fusion():
  # XLA's own fusions (kLoop) are in memory_analysis(); only YNNPACK fusions' operands are added.
  assert host_memory.ynn_workspace_bytes(YNN_MODULE) == max(100 * 8 * 4 + 4 * 8 * 4, 4 * 8 * 4 + 8 * 16 * 2)
  assert host_memory.ynn_workspace_bytes(YNN_MODULE.replace("__ynn_fusion", "__other")) == 0


def test_combinations_are_config_data():
  parsed = parse_combinations("1x8:tensor_parallel, 2x4:tp_fsdp:int8:activation_batch=None,cache_batch=None,"
                              "8x1:fsdp", quantization="")
  assert parsed == (Combination("1x8", "tensor_parallel"),
                    Combination("2x4", "tp_fsdp", "int8", "activation_batch=None,cache_batch=None"),
                    Combination("8x1", "fsdp"))
  assert parsed[1].rule_overrides("mlp=None,activation_batch=batch") == {
      "mlp": None, "activation_batch": None, "cache_batch": None}
  plan = Plan.from_config(tiny_config("2x4:fsdp:int8,1x8:tensor_parallel,4x2:tp_fsdp:int8"))
  assert [(r.mesh, r.quantization) for r in plan.references] == [("1x1", "int8"), ("1x1", "")]
  for text, error, words in [("2x4", JobError, "MESH:TABLE"), ("2x4:fsdp:int4", JobError, "'int4'"),
                             ("2x4:no_such_table", RuleError, "no_such_table"), ("2x:fsdp", MeshError, "2x"),
                             ("2x4:fsdp:no_such_axis=batch", RuleError, "no_such_axis"), ("", JobError, "empty")]:
    with pytest.raises(error, match=re.escape(words)):
      parse_combinations(text)
