"""One run of the large-model verification, in a process of its own (verify_large.py starts it,
from its snapshot of the package; by hand: python -m qwen_logical.jobs.verify_large.worker SPEC.json).

SPEC.json: {"config": the run config as a dict, "combination": {mesh, table, quantization, overrides},
"tokens": int32[B, L] .npy to read, "logits": .npy to write, "allowance_bytes", "host_memory_fraction",
"result": .json to write}.

The process simulates exactly the devices of its mesh, builds the Partitioner, compiles the
forward, and estimates its host memory (host_memory.py) before any weight exists: a run
that would not fit writes 'skipped' with the figures and ends. Otherwise it initialises the
weights (the hash init: the same model on every mesh and table), runs the forward on the
tokens and saves the float32 [B, L, V] logits for the parent to compare. The result JSON
holds the status, the estimate, the timings and this process's peak resident memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from typing import Any

import numpy as np
from absl import app, logging
from ml_collections import ConfigDict

import qwen_logical
from qwen_logical.jobs.common import build, host_memory
from qwen_logical.jobs.common.devices import setup_devices
from qwen_logical.jobs.verify.suite import SKIPPABLE
from qwen_logical.jobs.verify_large.plan import Combination
from qwen_logical.model import axes as ax

BATCH_FLAG = "--config.verify.batch_size"


def _build(config: ConfigDict, combination: Combination):
  """(Source, Partitioner) of the combination; the layer form follows the table (build.scan_layers_for)."""
  import jax
  from qwen_logical.sharding.mesh import make_mesh
  from qwen_logical.sharding.rules import get_table
  mesh = make_mesh(combination.mesh, devices=jax.devices()[:combination.devices])
  table = get_table(combination.table, combination.rule_overrides(config.rule_overrides))
  cfg = build.model_config_from(config, build.gathers_weights(table, dict(mesh.shape)))
  source = build.Source(cfg.replace(quantization=combination.quantization), seed=config.seed, label="sharded init")
  return source, build.make_partitioner(source, mesh, table)


def _compile(partitioner, shape: tuple[int, int]) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = partitioner.lower_forward(*shape).compile()
  return compiled, time.perf_counter() - start


def _forward(partitioner, compiled, params, tokens: np.ndarray) -> tuple[np.ndarray, float]:
  """(float32 host logits [B, L, V], seconds) of the compiled forward on int32[B, L] `tokens`."""
  import jax
  from qwen_logical.sharding import distributed
  sharding = partitioner.sharding(ax.TOKENS)
  start = time.perf_counter()
  logits = jax.block_until_ready(compiled(params, distributed.global_array(tokens, sharding),
                                          distributed.global_array(np.ones_like(tokens), sharding)))
  seconds = time.perf_counter() - start
  return np.asarray(distributed.to_host(logits), np.float32), seconds


def run(spec: dict[str, Any]) -> dict[str, Any]:
  """The run SPEC describes; its result (status 'ok' or 'skipped'); raises on anything unexpected."""
  from qwen_logical.sharding.collectives import count_collectives
  config, combination = ConfigDict(spec["config"]), Combination(**spec["combination"])
  tokens = np.load(spec["tokens"])
  result: dict[str, Any] = {"status": "skipped"}
  try:
    source, partitioner = _build(config, combination)
    partitioner.check_batch(*tokens.shape, flag=BATCH_FLAG)
  except SKIPPABLE as e:  # the table does not fit the mesh or the batch
    return {**result, "reason": str(e)}
  cfg = source.config
  result.update(head_plan=partitioner.layout.describe(), scan_layers=cfg.scan_layers)
  compiled, compile_s = _compile(partitioner, tokens.shape)
  start = time.perf_counter()
  estimate = host_memory.estimate(partitioner, compiled, (*tokens.shape, cfg.vocab_size))
  timings = {"compile_s": compile_s, "estimate_s": time.perf_counter() - start}
  result.update(estimate=estimate.to_dict(), timings=timings)
  logging.info("%s: host memory estimate %s = %s", combination.label, estimate.describe(),
               host_memory.size_text(estimate.total))
  reason = host_memory.over_allowance(estimate, spec["allowance_bytes"], spec["host_memory_fraction"])
  if reason:
    logging.warning("%s skipped: %s", combination.label, reason)
    return {**result, "reason": reason}
  params, timings["weights_s"] = source.weights(partitioner, progress=False)
  result["peak_after_init_bytes"] = host_memory.peak_rss_bytes()
  logits, timings["run_s"] = _forward(partitioner, compiled, params, tokens)
  logging.info("Forward %s on %s: %.2f s", tokens.shape, partitioner.name, timings["run_s"])
  np.save(spec["logits"], logits)
  return {**result, "status": "ok", "devices": combination.devices, "logits_std": float(logits.std()),
          "logits_max": float(np.abs(logits).max()), "collectives": count_collectives(compiled.as_text())}


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    raise app.UsageError("usage: python -m qwen_logical.jobs.verify_large.worker SPEC.json")
  logging.set_verbosity(logging.INFO)
  with open(argv[1]) as f:
    spec = json.load(f)
  combination = Combination(**spec["combination"])
  setup_devices(ConfigDict(spec["config"]), combination.devices)
  try:
    result, status = run(spec), 0
  except Exception as e:  # reported as the combination's failure; the parent goes on with the next
    logging.error("%s crashed:\n%s", combination.label, traceback.format_exc())
    result, status = {"status": "fail", "failures": [f"crashed: {type(e).__name__}: {e}"]}, 1
  result["peak_rss_bytes"] = host_memory.peak_rss_bytes()
  result["package"] = os.path.dirname(os.path.abspath(qwen_logical.__file__))
  with open(spec["result"], "w") as f:
    json.dump(result, f, indent=1)
  return status


def spec_for(config: ConfigDict, combination: Combination, **paths_and_limits: Any) -> dict[str, Any]:
  """The SPEC of one run (the parent writes it as JSON)."""
  return {"config": config.to_dict(), "combination": dataclasses.asdict(combination), **paths_and_limits}


if __name__ == "__main__":
  app.run(main)
