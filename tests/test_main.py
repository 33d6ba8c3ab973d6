"""The main job end to end: configs load, overrides apply, the run reports what it did."""

import json
import os
import subprocess
import sys

import pytest
from ml_collections import config_flags  # noqa: F401  (configs are plain modules)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"tp8": ("1x8", "tensor_parallel"), "tp4_dp2": ("2x4", "tensor_parallel"),
           "tp2_dp4": ("4x2", "tensor_parallel"), "dp8": ("8x1", "data_parallel"),
           "single": ("1x1", "tensor_parallel")}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_files(name):
  sys.path.insert(0, REPO)
  try:
    import importlib
    module = importlib.import_module(f"configs.{name}")
  finally:
    sys.path.remove(REPO)
  config = module.get_config()
  assert (config.mesh, config.rules) == CONFIGS[name]
  assert config.model.preset == "qwen2.5-7b"


def _main(tmp_path, *flags):
  report = tmp_path / "report.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *flags, f"--config.report={report}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result, json.loads(report.read_text())


def test_main_runs_tiny_model_with_overrides(tmp_path):
  result, report = _main(tmp_path, "--config=configs/tp8.py", "--config.mesh=2x4",
                         "--config.model.preset=tiny", "--config.rules=tp_fsdp",
                         "--config.rule_overrides=mlp=None,activation_mlp=None")
  summary = report["summary"]
  assert summary["mesh"] == "2x4" and summary["devices"] == 8
  assert summary["rules"] == "tp_fsdp+overrides"
  assert summary["logits_shape"] == [8, 16, 256]
  assert "padded 7 -> 8" in summary["head_plan"]
  mlp = [p for p in report["sharding"]["params"] if p["path"] == "layers/mlp/gate_kernel"][0]
  assert mlp["mesh_axes"] == [None, "batch", None]  # embed over batch (FSDP), mlp unsharded (override)
  for phrase in ("Sharding of 2x4 tp_fsdp+overrides", "Per-device MiB", "Timings: init"):
    assert phrase in result.stdout
  assert "all-gather" in summary["collectives"]  # FSDP over 'batch' gathers weights


def test_main_says_when_it_runs_a_reduced_model(tmp_path):
  result, report = _main(tmp_path, "--config=configs/single.py", "--config.model.preset=qwen2.5-0.5b",
                         "--config.host_memory_fraction=0.00005", "--config.batch_size=1",
                         "--config.seq_len=4")
  assert report["summary"]["num_layers"] == 1
  assert "RUNNING A REDUCED VARIANT: 1 of 24 layers" in result.stdout


def test_main_device_mismatch_error(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "main.py", "--config=configs/tp8.py", "--config.model.preset=tiny",
                           "--config.num_cpu_devices=4"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode != 0
  assert "Mesh 1x8 needs 8 devices but JAX sees 4" in result.stderr


def test_main_loads_a_checkpoint_and_exports_it(tmp_path):
  from hf_reference import tiny_hf_model
  source = tmp_path / "hf"
  tiny_hf_model(heads=14, kv_heads=2, hidden=112).save_pretrained(source, max_shard_size="60KB")
  exported = tmp_path / "exported"
  result, report = _main(tmp_path, "--config=configs/tp8.py", f"--config.checkpoint={source}",
                         f"--config.export={exported}")
  summary = report["summary"]
  assert summary["num_layers"] == 2 and "load_s" in summary["timings"]
  assert (exported / "model.safetensors").exists() and (exported / "config.json").exists()
  assert "Timings: load" in result.stdout
  from qwen_logical.checkpoint import open_checkpoint
  original, again = open_checkpoint(str(source)), open_checkpoint(str(exported))
  for name, entry in original.entries.items():
    assert (entry.memmap() == again.entries[name].memmap()).all(), name


def test_main_rejects_architecture_overrides_with_a_checkpoint(tmp_path):
  from hf_reference import tiny_hf_model
  source = tmp_path / "hf"
  tiny_hf_model().save_pretrained(source)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "main.py", "--config=configs/single.py", f"--config.checkpoint={source}",
                           "--config.model.num_layers=1"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0
  assert "--config.model.num_layers cannot change a checkpoint's architecture" in result.stderr
