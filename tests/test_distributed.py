"""Two processes x 4 simulated CPU devices on 127.0.0.1 (gloo) act as one 8-device machine."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import free_port, mesh_of
from hf_reference import hf_logits, tiny_hf_model
from qwen_logical.checkpoints.loader import load_checkpoint
from qwen_logical.inference.generate import generate
from qwen_logical.sharding.rules import get_table

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import distributed_worker as worker  # noqa: E402

TIMEOUT_S = 240


def _env():
  return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


class Processes:
  """Started processes that are always killed on exit, whatever happened."""

  def __init__(self, commands, cwd=REPO):
    self.procs = [subprocess.Popen(c, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True) for c in commands]

  def wait(self, timeout=TIMEOUT_S):
    deadline = time.monotonic() + timeout
    outputs = []
    for p in self.procs:
      out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
      outputs.append((p.returncode, out, err))
    return outputs

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for p in self.procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("dist_ckpt")
  model = tiny_hf_model(heads=14, kv_heads=2, hidden=112, tied=True)
  model.save_pretrained(str(directory))
  return str(directory), model


@pytest.fixture(scope="module")
def single_process(checkpoint):
  """The single-process run on one device: logits and greedy tokens."""
  params, _, part = load_checkpoint(checkpoint[0], mesh_of("1x1"), get_table("tensor_parallel"), progress=False)
  logits = np.asarray(part.forward(params, worker.TOKENS))
  tokens = generate(part, params, worker.PROMPTS, max_new_tokens=worker.NEW_TOKENS).tokens
  total_bytes = sum(a.nbytes for a in __import__("jax").tree_util.tree_leaves(params))
  return logits, tokens, total_bytes


@pytest.fixture(scope="module")
def two_process_run(checkpoint, tmp_path_factory):
  """Runs the worker job in 2 processes; the prefix of the .npz files they wrote."""
  port, prefix = free_port(), str(tmp_path_factory.mktemp("dist_out") / "out")
  command = lambda pid: [sys.executable, os.path.join(HERE, "distributed_worker.py"), str(port), "2", str(pid),
                         checkpoint[0], prefix, "run"]
  with Processes([command(0), command(1)]) as procs:
    for rc, _, err in procs.wait():
      assert rc == 0, err[-3000:]
  return prefix


def test_two_processes_match_the_single_process_run(checkpoint, single_process, two_process_run):
  expected_logits, expected_tokens, _ = single_process
  np.testing.assert_allclose(expected_logits, hf_logits(checkpoint[1], worker.TOKENS), atol=1e-4, rtol=0)
  for mesh in worker.MESHES:
    results = [np.load(f"{two_process_run}-{mesh}-{pid}.npz") for pid in (0, 1)]
    for pid, r in enumerate(results):
      assert int(r["devices"]) == 8 and int(r["local_devices"]) == 4, (mesh, pid)
      assert np.abs(r["logits"] - expected_logits).max() <= 1e-5, (mesh, pid)
      assert r["tokens"].tolist() == expected_tokens, (mesh, pid)
    # Every process ends with the same logits and tokens.
    np.testing.assert_array_equal(results[0]["tokens"], results[1]["tokens"])
    np.testing.assert_array_equal(results[0]["logits"], results[1]["logits"])


def test_each_process_holds_only_its_devices_shards(single_process, two_process_run):
  """Tensor parallel on 1x8 over 2 processes: each holds half the sharded bytes (+ replicated norms)."""
  _, _, total_bytes = single_process
  for pid in (0, 1):
    local = int(np.load(f"{two_process_run}-1x8-{pid}.npz")["local_bytes"])
    # The 1x8 layout is bigger than the 1x1 one (repeated KV heads, padded query heads).
    assert local < 0.65 * total_bytes, (local, total_bytes)


def test_export_across_two_processes_is_bit_exact(checkpoint, two_process_run):
  from qwen_logical.checkpoints.directory import open_checkpoint
  original, exported = open_checkpoint(checkpoint[0]), open_checkpoint(f"{two_process_run}-export")
  assert set(original.entries) == set(exported.entries)
  for name, entry in original.entries.items():
    np.testing.assert_array_equal(np.asarray(exported.entries[name].memmap()), np.asarray(entry.memmap()),
                                  err_msg=name)


def test_main_across_two_processes_prints_and_reports_once(checkpoint, tmp_path):
  directory, _ = checkpoint
  port = free_port()
  reports = [tmp_path / f"report{pid}.json" for pid in (0, 1)]
  command = lambda pid: [
      sys.executable, "main.py", "--config=configs/tp8.py", f"--config.checkpoint={directory}",
      "--config.mesh=2x4", f"--config.distributed.coordinator=127.0.0.1:{port}",
      "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}",
      f"--config.report={reports[pid]}"]
  with Processes([command(0), command(1)]) as procs:
    (rc0, out0, err0), (rc1, out1, err1) = procs.wait()
  assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
  assert "Sharding of 2x4 tensor_parallel" in out0 and "Forward pass on a [8, 16] batch" in out0
  # Only process 0 prints. (Gloo's C++ connection notes also reach stdout, sometimes split mid-line,
  # so the check is that none of the job's own output appears.)
  for marker in ("Sharding of", "Head layout", "Forward pass", "Collectives in", "Timings:"):
    assert marker in out0 and marker not in out1, marker
  assert reports[0].exists() and not reports[1].exists()
  summary = json.loads(reports[0].read_text())["summary"]
  assert summary["devices"] == 8 and summary["mesh"] == "2x4"
  # The same sample on one process gives the same next tokens.
  params, _, part = load_checkpoint(directory, mesh_of("1x1"), get_table("tensor_parallel"), progress=False)
  tokens = np.random.RandomState(0).randint(0, 160, (8, 16))
  assert summary["next_tokens"] == np.asarray(part.forward(params, tokens))[:, -1].argmax(-1).tolist()


def test_a_killed_peer_ends_the_survivor_with_a_clear_error(checkpoint, tmp_path):
  port = free_port()
  command = lambda pid: [sys.executable, "-u", os.path.join(HERE, "distributed_worker.py"), str(port), "2",
                         str(pid), checkpoint[0], str(tmp_path / "out"), "loop"]
  with Processes([command(0), command(1)]) as procs:
    survivor, victim = procs.procs
    for p in (survivor, victim):  # each prints READY once its first run is done, then loops
      line = "-"
      while line and "READY" not in line:
        line = p.stdout.readline()
      assert line, f"a worker exited before it was ready: {p.stderr.read()[-3000:]}"
    os.killpg(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = survivor.communicate(timeout=120)
    took = time.monotonic() - killed_at
  assert survivor.returncode == 3, err[-3000:]
  assert "another process of this job failed or was killed" in err
  assert took < 60, took  # an error, not a hang


@pytest.mark.parametrize("coordinator,processes,pid,message", [
    ("127.0.0.1", 2, 0, "is not HOST:PORT"),
    ("127.0.0.1:1234", 0, 0, "give the number of processes"),
    ("127.0.0.1:1234", 2, 2, "must be in [0, 2)"),
    ("127.0.0.1:1234", 2, -1, "must be in [0, 2)"),
])
def test_bad_distributed_settings_are_named(coordinator, processes, pid, message):
  from qwen_logical.sharding.distributed import DistributedError, check_settings
  with pytest.raises(DistributedError, match=message.replace("[", r"\[").replace(")", r"\)")):
    check_settings(coordinator, processes, pid)


def test_a_mesh_that_does_not_split_over_the_processes_is_refused():
  sys.path.insert(0, REPO)
  from configs import tp8
  from qwen_logical.sharding.distributed import DistributedError
  from qwen_logical.jobs import run
  from qwen_logical.jobs.common.devices import setup_devices
  config = tp8.get_config()
  config.distributed.coordinator, config.distributed.num_processes = "127.0.0.1:1", 3
  with pytest.raises(DistributedError, match="needs 8 devices, which do not split evenly over "
                     "--config.distributed.num_processes=3"):
    setup_devices(config, run.devices_needed(config))
