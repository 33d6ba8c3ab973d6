"""The large-model verification job: each (mesh, rule table, weight storage) in a process of its own,
each estimated against the host's memory first, all compared with 1x1 references kept on disk.

  python main.py --config=configs/verify_7b.py [--config.report=verify_7b.json]

For the whole Qwen2.5-7B on a host that holds one copy of it. A 1x1 reference is computed once per
weight storage the combinations use (bf16, int8), its float32 logits saved with np.save; each
combination's process saves its logits too, and this process compares the two through memory
maps (np.load(mmap_mode='r'), a chunk of positions at a time): no logits stay in memory.

Why a process per run rather than resetting the peak in one process (writing 5 to
/proc/self/clear_refs): weights a run frees go back to malloc's arenas and JAX's queues (see
verify.suite.release_weights), not necessarily to the operating system, so a second 15 GiB run
in the same process would start with the first one's pages and its peak would measure both;
a fresh process starts empty, simulates exactly its mesh's devices (one for the reference), and
the kernel measures its whole life (wait4's ru_maxrss). A run the kernel kills for memory ends
its own process, and the job reports it. Each process costs a few seconds of JAX start-up.

Before initialising, each process compiles its forward and estimates its host memory
(host_memory.py); a run that would not fit --config.verify.host_memory_fraction of the
memory available when it starts is skipped with the figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from absl import logging
from ml_collections import ConfigDict

import qwen_logical
from qwen_logical.jobs.common import build, host_memory
from qwen_logical.jobs.verify.verdict import compare_logits
from qwen_logical.jobs.verify_large import worker
from qwen_logical.jobs.verify_large.plan import Combination, Plan
from qwen_logical.jobs.verify_large.report import format_run, header, summary_table, tolerances_text

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(qwen_logical.__file__)))


def devices_needed(config: ConfigDict) -> int:
  """This process runs nothing on devices; each run's process simulates its own."""
  return 1


def compare_files(candidate: str, reference: str, tolerances) -> dict[str, Any]:
  """The verdict's numbers for two saved [B, L, V] logits, read through memory maps."""
  comparison = compare_logits(np.load(candidate, mmap_mode="r"), np.load(reference, mmap_mode="r"), tolerances)
  return {**dataclasses.asdict(comparison), "failures": comparison.failures(tolerances)}


def snapshot_package(directory: str) -> str:
  """A copy of the qwen_logical package in `directory`; the directory to put first on the runs' path.

  Every run then executes the code the job started with, even when the source tree is edited
  during the job's minutes (a half-edited module would otherwise fail the runs that start later).
  """
  root = os.path.join(directory, "code")
  shutil.copytree(os.path.join(_PACKAGE_ROOT, "qwen_logical"), os.path.join(root, "qwen_logical"),
                  ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
  return root


def _spawn(spec: dict[str, Any], spec_path: str, code_root: str) -> tuple[int, int]:
  """Runs one worker process on `spec` with the package from `code_root`; (exit status, its peak
  resident bytes measured by the kernel)."""
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  # `python -m` would put the working directory (often the source tree) first on the path.
  start = (f"import sys; sys.path.insert(0, {code_root!r}); from absl import app; "
           f"from {worker.__name__} import main; app.run(main)")
  process = subprocess.Popen([sys.executable, "-c", start, spec_path])
  _, status, usage = os.wait4(process.pid, 0)
  process.returncode = os.waitstatus_to_exitcode(status)
  return process.returncode, host_memory.maxrss_bytes(usage.ru_maxrss)


class LargeSuite:
  """Runs a Plan's references and combinations, one process each, in `directory`."""

  def __init__(self, config: ConfigDict, plan: Plan, directory: str):
    self.config, self.plan, self.directory = config, plan, directory
    self.model_config = build.model_config_from(config)
    rng = np.random.RandomState(config.seed)
    tokens = rng.randint(0, self.model_config.vocab_size, (plan.batch_size, plan.seq_len)).astype(np.int32)
    self.tokens_path = os.path.join(directory, "tokens.npy")
    np.save(self.tokens_path, tokens)
    self.references: dict[str, dict[str, Any]] = {}  # weight storage -> the reference's entry
    self.code_root = snapshot_package(directory)
    self.runs = 0

  def weights_name(self, combination: Combination) -> str:
    return combination.quantization or np.dtype(self.model_config.param_dtype).name

  def run(self, combination: Combination, name: str, allowance: int | None = None) -> dict[str, Any]:
    """One combination in its own process: its entry (status, estimate, peak, timings, logits path)."""
    paths = {kind: os.path.join(self.directory, f"{name}.{ext}")
             for kind, ext in (("logits", "npy"), ("result", "json"), ("spec", "spec.json"))}
    allowance = host_memory.allowance_bytes(self.plan.host_memory_fraction) if allowance is None else allowance
    spec = worker.spec_for(
        self.config, combination, tokens=self.tokens_path, logits=paths["logits"], result=paths["result"],
        allowance_bytes=allowance, host_memory_fraction=self.plan.host_memory_fraction)
    logging.info("Starting %s (allowance %s)", combination.label, host_memory.size_text(allowance))
    start = time.perf_counter()
    status, peak = _spawn(spec, paths["spec"], self.code_root)
    self.runs += 1
    entry = {"mesh": combination.mesh, "rules": combination.rules_label, "weights": self.weights_name(combination),
             "allowance_bytes": allowance, "process_s": time.perf_counter() - start}
    if os.path.exists(paths["result"]):
      with open(paths["result"]) as f:
        entry.update(json.load(f))
    else:  # the process died before writing its result (a signal: -9 is the kernel's out-of-memory killer)
      entry.update(status="fail", failures=[f"the run's process ended with status {status} and no result"])
    entry["peak_rss_bytes"] = peak  # the kernel's figure for the whole process (the worker's VmHWM agrees)
    if entry["status"] == "ok":
      entry["logits_path"] = paths["logits"]
      entry["estimate_covers_peak"] = entry["estimate"]["total"] >= peak
    return entry

  def reference(self, combination: Combination) -> dict[str, Any]:
    entry = self.run(combination, f"reference_{self.weights_name(combination)}")
    self.references[combination.quantization] = entry
    return entry

  def combination(self, combination: Combination, index: int) -> dict[str, Any]:
    """One combination against its reference (skipped, without a process, when the reference did not run)."""
    reference = self.references[combination.quantization]
    if reference["status"] != "ok":
      return {"mesh": combination.mesh, "rules": combination.rules_label, "weights": self.weights_name(combination),
              "status": "skipped", "reason": f"its 1x1 {reference['weights']} reference did not run "
                                             f"({reference['status']}: {reference.get('reason', '')})"}
    entry = self.run(combination, f"run{index}")
    if entry["status"] == "ok":
      start = time.perf_counter()
      entry.update(compare_files(entry["logits_path"], reference["logits_path"], self.plan.tolerances))
      entry["timings"]["compare_s"] = time.perf_counter() - start
      entry["status"] = "fail" if entry["failures"] else "ok"
      if not self.plan.keep_dir:
        os.remove(entry.pop("logits_path"))
    return entry


def verify_large(config: ConfigDict) -> dict[str, Any]:
  """Runs the job; prints each run and the summary; returns the JSON-able report (report['ok'])."""
  if config.checkpoint:
    raise build.JobError("The large verification builds its weights with the hash init in every process; "
                         "drop --config.checkpoint, or verify a checkpoint with configs/verify.py.")
  say = lambda *a: print(*a, flush=True)
  plan, started = Plan.from_config(config), time.perf_counter()
  directory = plan.keep_dir or tempfile.mkdtemp(prefix="qwen_logical_verify_large_")
  os.makedirs(directory, exist_ok=True)
  try:
    suite = LargeSuite(config, plan, directory)
    say(header(suite.model_config, plan))
    references = []
    for combination in plan.references:
      references.append(suite.reference(combination))
      say(format_run(references[-1], plan.tolerances, "reference"))
    entries = []
    for i, combination in enumerate(plan.combinations):
      entries.append(suite.combination(combination, i))
      say(format_run(entries[-1], plan.tolerances))
  finally:
    if not plan.keep_dir:
      shutil.rmtree(directory, ignore_errors=True)
  failed = [e for e in references + entries if e["status"] == "fail"]
  skipped = [e for e in entries if e["status"] == "skipped"]
  agreed = sum(e["status"] == "ok" for e in entries)
  say(f"\nSummary (vs the 1x1 reference of the same weights; {tolerances_text(plan.tolerances)})")
  say(summary_table(references, entries))
  for e in references + entries:
    if e["status"] == "skipped":
      say(f"skipped {e['mesh']} {e['rules']} ({e['weights']}): {e['reason']}")
  elapsed = time.perf_counter() - started
  verdict = (f"{agreed} agree, {len(failed)} FAILED, {len(skipped)} skipped of {len(entries)} combinations "
             f"({suite.runs} process{'es' * (suite.runs != 1)}) in {elapsed:.0f} s")
  # A job that verified nothing (every run skipped) has not passed.
  ok = not failed and agreed > 0
  say(("Verification passed: " if ok else "VERIFICATION FAILED: " if failed else "NOTHING VERIFIED: ") + verdict)
  cfg = suite.model_config
  return {"ok": ok, "verdict": verdict, "elapsed_s": elapsed, "model": cfg.name,
          "num_layers": cfg.num_layers, "param_dtype": np.dtype(cfg.param_dtype).name,
          "dtype": np.dtype(cfg.dtype).name, "batch": [plan.batch_size, plan.seq_len],
          "settings": dataclasses.asdict(plan), "rule_overrides": config.rule_overrides,
          "peak_measurement": "one process per run; the kernel's peak resident memory of it (wait4 ru_maxrss)",
          "references": references, "combinations": entries}


def main(config: ConfigDict) -> dict[str, Any]:
  return verify_large(config)
