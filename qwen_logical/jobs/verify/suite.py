"""The verification suite's runs: the 1x1 reference, then one (mesh, rule table) combination at a time.

Every run goes through the jobs' build path (common/build.py): the same Source, a Partitioner for the
mesh and table, the weights (the reference's, loaded, or a sharded init), the timed forward on
one [B, L] token batch, and greedy generation with the KV cache on prompts cut from its rows.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import tempfile
import time
import traceback
from typing import Any

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from qwen_logical.jobs.common import build
from qwen_logical.jobs.verify.report import pictures
from qwen_logical.jobs.verify.verdict import (Tolerances, compare_logits, greedy_failures,
                                              unclaimed_replication)
from qwen_logical.model.head_layout import HeadLayoutError
from qwen_logical.sharding.mesh import MeshError, make_mesh, parse_mesh_shape
from qwen_logical.inference.kv_cache import cache_shape
from qwen_logical.sharding.layout_view import sharding_view
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.report import sharding_report
from qwen_logical.sharding.rules import RuleError, get_table

SKIPPABLE = (RuleError, HeadLayoutError, MeshError)
BATCH_FLAG = "--config.verify.batch_size"


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to verify and the verdict's tolerances (from `config.verify`)."""

  meshes: tuple[str, ...]
  tables: tuple[str, ...]
  combinations: tuple[tuple[str, str], ...]  # (mesh, table) in the order they run
  weights: str  # "reference": the 1x1 run's weights loaded onto each mesh | "init": sharded init per mesh
  batch_size: int
  seq_len: int
  new_tokens: int
  tolerances: Tolerances
  key_params: tuple[str, ...]

  @classmethod
  def from_config(cls, v: ConfigDict) -> "Settings":
    split = lambda text: tuple(s.strip() for s in text.split(",") if s.strip())
    if v.weights not in ("reference", "init"):
      raise build.JobError(f"--config.verify.weights={v.weights!r}: use 'reference' (the 1x1 run's weights "
                           "loaded onto each mesh) or 'init' (sharded random init on each mesh).")
    tolerances = Tolerances(rtol=v.rtol, atol=v.atol, min_pcc=v.min_pcc, max_kl=v.max_kl, top_k=v.top_k,
                            min_top_k_overlap=v.min_top_k_overlap)
    meshes, tables = split(v.meshes), split(v.tables)
    chosen = split(v.get("combinations", ""))
    if chosen:
      if any(item.count(":") != 1 for item in chosen):
        raise build.JobError(f"--config.verify.combinations={v.combinations!r}: list MESH:TABLE items, "
                             "e.g. '1x8:tensor_parallel,2x4:tp_fsdp' (empty: every mesh x every table).")
      combinations = tuple(tuple(s.strip() for s in item.split(":")) for item in chosen)
      meshes, tables = (tuple(dict.fromkeys(c[i] for c in combinations)) for i in (0, 1))
    else:
      combinations = tuple((mesh, table) for mesh in meshes for table in tables)
    return cls(meshes, tables, combinations, v.weights, v.batch_size, v.seq_len, v.new_tokens,
               tolerances, split(v.key_params))


@dataclasses.dataclass
class Reference:
  """The single-device run every combination is compared with."""

  logits: np.ndarray  # float32[B, L, V]
  tokens: list[list[int]]  # greedy tokens per prompt


def release_weights() -> None:
  """Frees the host memory of weights that are gone: buffers the loader's devices adopted without a
  copy go back through a queue JAX drains only when Python's cycle collector runs (jax's gc
  callback), so without this every combination's weights stay until a collection happens to run."""
  gc.collect()


class Suite:
  """Runs the combinations of `settings` for one model source and one set of inputs."""

  def __init__(self, config: ConfigDict, settings: Settings):
    self.config, self.settings = config, settings
    self.source = build.model_source(config, gathers=any(map(build.gathers_weights, self._tables())))
    self.scratch: str | None = None  # where the reference's random weights are saved, if anywhere
    s, cfg = settings, self.source.config
    rng = np.random.RandomState(config.seed)
    self.tokens = rng.randint(0, cfg.vocab_size, (s.batch_size, s.seq_len)).astype(np.int32)
    # Prompts of different lengths, so generation exercises left padding.
    lengths = np.linspace(max(1, s.seq_len // 2), s.seq_len, s.batch_size).astype(int)
    self.prompts = [row[:n].tolist() for row, n in zip(self.tokens, lengths)]
    self.reference: Reference | None = None

  def _tables(self) -> list:
    """The suite's rule tables that resolve (the others are reported as skipped, per combination)."""
    tables = []
    for name in self.settings.tables:
      try:
        tables.append(get_table(name, self.config.rule_overrides))
      except RuleError:
        pass
    return tables

  @property
  def model_config(self):
    return self.source.config

  def _run(self, partitioner: Partitioner) -> tuple[dict[str, Any], Any, np.ndarray, list[list[int]]]:
    """(info, params, host logits, greedy tokens) of one partitioner's run."""
    from qwen_logical.inference.generate import generate
    params, weights_s = self.source.weights(partitioner, progress=False)
    forward = build.timed_forward(partitioner, params, self.tokens, batch_flag=BATCH_FLAG)
    start = time.perf_counter()
    result = generate(partitioner, params, self.prompts, max_new_tokens=self.settings.new_tokens)
    timings = {"weights_s": weights_s, "compile_s": forward.compile_s, "run_s": forward.run_s,
               "generate_s": time.perf_counter() - start, "generate_compile_s": result.timings.compile_s}
    info = {"weights": self.source.label, "timings": timings, "collectives": forward.collectives}
    return info, params, forward.logits, [list(map(int, t)) for t in result.tokens]

  def run_reference(self) -> dict[str, Any]:
    """The 1x1 run (first device, tensor_parallel: on one device every table is the same)."""
    partitioner = build.make_partitioner(self.source, make_mesh("1x1", devices=jax.devices()[:1]),
                                         get_table("tensor_parallel"))
    info, params, logits, tokens = self._run(partitioner)
    if self.source.checkpoint is None and self.settings.weights == "reference":
      # Saved as an HF checkpoint, the weights reach every mesh through the sharded loader:
      # each device reads its own slice, and the host never holds another full copy.
      from qwen_logical.checkpoints.export import export_checkpoint
      self.scratch = tempfile.mkdtemp(prefix="qwen_logical_verify_")
      export_checkpoint(params, partitioner, self.scratch, progress=False)
      cfg = self.source.config
      numerics = {name: getattr(cfg, name) for name in build.NUMERICS}
      loaded = build.open_source(self.scratch, numerics, "the reference's weights, loaded")
      self.source = dataclasses.replace(loaded, note=self.source.note)
    del params
    release_weights()
    self.reference = Reference(logits, tokens)
    info.update(logits_std=float(logits.std()), logits_max=float(np.abs(logits).max()), tokens=tokens)
    return info

  def close(self) -> None:
    if self.scratch:
      shutil.rmtree(self.scratch, ignore_errors=True)
      self.scratch = None

  def _partitioner(self, mesh_shape: str, table_name: str, entry: dict[str, Any]) -> Partitioner:
    """The combination's Partitioner; raises a SKIPPABLE error when the table does not fit the mesh."""
    batch, model = parse_mesh_shape(mesh_shape)
    available = len(jax.devices())
    if batch * model > available:
      raise MeshError(f"mesh {mesh_shape} needs {batch * model} devices; {available} available (on CPU, "
                      f"simulate more with XLA_FLAGS=--xla_force_host_platform_device_count={batch * model})")
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:batch * model])
    table = get_table(table_name, self.config.rule_overrides)
    entry["rules"] = table.name
    if get_table(table_name).name == "expert_parallel" and not self.source.config.is_moe:
      raise RuleError("the model has no experts: expert_parallel shards it exactly as tensor_parallel")
    partitioner = build.make_partitioner(self.source, mesh, table)
    partitioner.check_batch(self.settings.batch_size, self.settings.seq_len, flag=BATCH_FLAG)
    return partitioner

  def run_combination(self, mesh_shape: str, table_name: str) -> dict[str, Any]:
    """One (mesh, table): status 'ok', 'fail' or 'skipped', with everything measured."""
    entry: dict[str, Any] = {"mesh": mesh_shape, "rules": table_name}
    try:
      partitioner = self._partitioner(mesh_shape, table_name, entry)
    except SKIPPABLE as e:
      entry.update(status="skipped", reason=str(e))
      return entry
    entry["head_plan"] = partitioner.layout.describe()
    failures = [f"replicated parameter axis: {m}" for m in unclaimed_replication(partitioner)]
    try:
      info, params, logits, tokens = self._run(partitioner)
    except Exception as e:  # a combination that crashes is a failure to report, not the end of the suite
      logging.error("%s %s crashed:\n%s", mesh_shape, table_name, traceback.format_exc())
      entry.update(status="fail", failures=failures + [f"crashed: {type(e).__name__}: {e}"])
      return entry
    report = sharding_report(partitioner, params)
    del params
    release_weights()
    tolerances = self.settings.tolerances
    comparison = compare_logits(logits, self.reference.logits, tolerances)
    failures += comparison.failures(tolerances) + greedy_failures(tokens, self.reference.tokens)
    entry.update(info)
    entry.update(dataclasses.asdict(comparison))
    entry.update(
        status="fail" if failures else "ok", failures=failures, greedy_tokens_agree=tokens == self.reference.tokens,
        devices=int(partitioner.mesh.devices.size), bytes_by_device=report.bytes_by_device,
        replicated=report.replicated, pictures=pictures(partitioner, self.settings.key_params),
        layouts=sharding_view(partitioner, self.settings.batch_size, self.settings.seq_len, cache_shape(
            partitioner.config, partitioner.layout, self.settings.batch_size, self.settings.seq_len)).to_dict())
    return entry
