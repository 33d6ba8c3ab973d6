"""The verification job: every mesh x every rule table against the single-device run.

For each (mesh, rule table) combination the suite (suite.py) builds a Partitioner (or
records, as skipped, the validation message that says why the table does not fit the mesh, or
that the model has no experts for expert_parallel to split),
puts the same weights on the mesh, compiles and runs the forward pass on a [B, L] token batch,
generates greedy tokens with the KV cache, and the verdict (verdict.py) compares with
the 1x1 run:

* per position, max |logit diff| against atol + rtol * max |logit| (scales with the logits),
  the Pearson correlation (PCC), the KL divergence of the softmaxes, and the overlap of the
  top-k token sets;
* whether every greedy token agrees;
* whether every parameter axis the table *claims* to shard (RuleTable.claims) really is split
  on this mesh: an override that silently replicates it is a failure.

It also records per-device parameter bytes, weights / compile / run / generate times, the
collectives in the compiled forward, and a picture of how key parameters lie over the devices.
`verify(config)` prints each combination as it finishes, then a summary table, and returns the
JSON-able report; `report["ok"]` is False when any combination failed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from qwen_logical.jobs.common.build import JobError
from qwen_logical.jobs.verify.report import LEGEND, format_combination, summary_table
from qwen_logical.jobs.verify.suite import Settings, Suite
from qwen_logical.sharding import distributed
from qwen_logical.sharding.layout_draw import draw
from qwen_logical.sharding.mesh import parse_mesh_shape


def devices_needed(config: ConfigDict) -> int:
  """The largest mesh of the suite: its combinations take the first devices."""
  return max(b * m for b, m in map(parse_mesh_shape, Settings.from_config(config.verify).meshes))


def _combinations_text(settings: Settings) -> str:
  every = tuple((mesh, table) for mesh in settings.meshes for table in settings.tables)
  if settings.combinations == every:
    return f"meshes {', '.join(settings.meshes)} x tables {', '.join(settings.tables)}"
  return "combinations " + ", ".join(f"{mesh} x {table}" for mesh, table in settings.combinations)


def _header(config: ConfigDict, suite: Suite) -> str:
  import jax
  settings, cfg = suite.settings, suite.model_config
  return (f"Verifying {cfg.name} ({cfg.num_layers} {'scanned' if cfg.scan_layers else 'unrolled'} layers, "
          f"{cfg.num_parameters / 1e9:.2f}B parameters, {np.dtype(cfg.param_dtype).name}) on "
          f"{len(jax.devices())} {jax.default_backend()} devices: " + _combinations_text(settings)
          + (f" (overrides: {config.rule_overrides})" if config.rule_overrides else ""))


def _reference_text(reference: dict[str, Any]) -> str:
  t = reference["timings"]
  return (f"== reference 1x1: weights {t['weights_s']:.2f} s ({reference['weights']}), compile "
          f"{t['compile_s']:.2f} s, forward {t['run_s']:.3f} s, logits std {reference['logits_std']:.3f}, "
          f"max |logit| {reference['logits_max']:.2f}")


def verify(config: ConfigDict, suite: Suite | None = None) -> dict[str, Any]:
  """Runs the suite; prints progress and the summary; returns the report (report['ok']).

  `suite` (built from the same config) lets a caller inspect the reference run afterwards.
  """
  import jax
  if jax.process_count() > 1:
    raise JobError("The verification suite runs in one process (its 1x1 reference lives on one device); "
                   "drop --config.distributed.* and simulate the devices on one host instead.")
  say = distributed.printer()
  started = time.perf_counter()
  suite = suite or Suite(config, Settings.from_config(config.verify))
  settings, cfg = suite.settings, suite.model_config
  say(_header(config, suite))
  entries = []
  try:
    reference = suite.run_reference()
    say(_reference_text(reference))
    for mesh_shape, table_name in settings.combinations:
      entries.append(suite.run_combination(mesh_shape, table_name))
      say(format_combination(entries[-1], settings.tolerances))
      if config.show_sharding and "layouts" in entries[-1]:
        say(draw(entries[-1]["layouts"]))
  finally:
    suite.close()
  failed = [e for e in entries if e["status"] == "fail"]
  skipped = [e for e in entries if e["status"] == "skipped"]
  say(f"\nSummary (vs the single-device run; {LEGEND})")
  say(summary_table(entries))
  for e in skipped:
    say(f"skipped {e['mesh']} x {e['rules']}: {e['reason']}")
  elapsed = time.perf_counter() - started
  verdict = (f"{len(entries) - len(failed) - len(skipped)} agree, {len(failed)} FAILED, {len(skipped)} skipped "
             f"of {len(entries)} combinations in {elapsed:.0f} s")
  say(("VERIFICATION FAILED: " if failed else "Verification passed: ") + verdict)
  if suite.source.note:
    say(f"NOTE: {suite.source.note}")
  return {"ok": not failed, "verdict": verdict, "elapsed_s": elapsed, "model": cfg.name,
          "num_layers": cfg.num_layers, "scan_layers": cfg.scan_layers, "param_dtype": np.dtype(cfg.param_dtype).name,
          "note": suite.source.note, "settings": dataclasses.asdict(settings),
          "rule_overrides": config.rule_overrides, "reference": reference, "combinations": entries}


def main(config: ConfigDict) -> dict[str, Any]:
  return verify(config)
