"""The verification suite: every mesh x every rule table against the single-device run.

For each (mesh, rule table) combination the suite builds a Partitioner (or records, as
skipped, the validation message that says why the table does not fit the mesh), puts
the same weights on the mesh, compiles and runs the forward pass on a [B, L] token
batch, generates greedy tokens with the KV cache, and compares with the 1x1 run:

* max |logit diff| and the overlap of the top-k token sets per position;
* whether every greedy token agrees;
* whether every parameter axis the table *claims* to shard (RuleTable.claims) really is
  split on this mesh: an override that silently replicates it is a failure;
* per-device parameter bytes, init / compile / run / generate times, the collectives in
  the compiled forward (count and bytes per execution), and a picture of how key
  parameters lie over the devices.

`verify(config)` prints each combination as it finishes, then a summary table, and
returns the JSON-able report; `report["ok"]` is False when any combination failed.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
import time
import traceback
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec
from ml_collections import ConfigDict

from qwen_logical.model import axes as ax
from qwen_logical.sharding import distributed
from qwen_logical.sharding.collectives import KINDS, count_collectives
from qwen_logical.model.head_layout import HeadLayoutError
from qwen_logical.sharding.mesh import MeshError, make_mesh, parse_mesh_shape
from qwen_logical.sharding.partitioner import Partitioner, path_str
from qwen_logical.sharding.report import device_picture, sharding_report
from qwen_logical.sharding.rules import RuleError, format_mesh_axes, get_table

SKIPPABLE = (RuleError, HeadLayoutError, MeshError)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to verify and the tolerances (from `config.verify`)."""

  meshes: tuple[str, ...]
  tables: tuple[str, ...]
  weights: str  # "reference": the 1x1 run's weights loaded onto each mesh | "init": sharded init per mesh
  batch_size: int
  seq_len: int
  new_tokens: int
  max_logit_diff: float
  top_k: int
  min_top_k_overlap: float
  key_params: tuple[str, ...]

  @classmethod
  def from_config(cls, v: ConfigDict) -> "Settings":
    split = lambda text: tuple(s.strip() for s in text.split(",") if s.strip())
    if v.weights not in ("reference", "init"):
      raise ValueError(f"--config.verify.weights={v.weights!r}: use 'reference' (the 1x1 run's weights loaded "
                       "onto each mesh) or 'init' (sharded random init on each mesh).")
    return cls(split(v.meshes), split(v.tables), v.weights, v.batch_size, v.seq_len, v.new_tokens,
               v.max_logit_diff, v.top_k, v.min_top_k_overlap, split(v.key_params))


@dataclasses.dataclass
class Reference:
  """The single-device run every combination is compared with."""

  logits: np.ndarray  # [B, L, V] float32
  tokens: list[list[int]]  # greedy tokens per prompt


def top_k_overlap(logits: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
  """Per position, the fraction of the reference's top-k token ids also in `logits`' top-k."""
  k = min(k, reference.shape[-1])
  top = lambda x: np.argpartition(-x.reshape(-1, x.shape[-1]), k - 1, axis=-1)[:, :k]
  a, b = top(logits), top(reference)
  return np.array([len(np.intersect1d(x, y, assume_unique=True)) / k for x, y in zip(a, b)])


def unclaimed_replication(partitioner: Partitioner) -> list[str]:
  """Parameter axes the table claims to shard that this mesh does not split, as messages."""
  table, mesh_shape = partitioner.table, partitioner.mesh_shape
  found = []
  specs = jax.tree_util.tree_leaves_with_path(partitioner.logical_specs,
                                              is_leaf=lambda x: isinstance(x, PartitionSpec))
  for (path, logical), sharding in zip(specs, jax.tree_util.tree_leaves(partitioner.param_shardings)):
    actual = tuple(sharding.spec) + (None,) * (len(logical) - len(sharding.spec))
    for name, mesh_axes in zip(logical, actual):
      claimed = [a for a in table.claimed_axes(name) if mesh_shape.get(a, 1) > 1]
      have = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
      missing = [a for a in claimed if a not in have]
      if missing:
        found.append(f"{path_str(path)}: '{name}' is claimed sharded over {'+'.join(claimed)} by "
                     f"{table.name} but is split over {format_mesh_axes(mesh_axes)} "
                     f"(missing {'+'.join(missing)})")
  return found


def _key_param(path: str) -> str:
  """'layers_0/mlp/down_kernel' -> 'layers/mlp/down_kernel' (unrolled layers: the first stands for all)."""
  return re.sub(r"^layers_0/", "layers/", path)


def pictures(partitioner: Partitioner, key_params: tuple[str, ...]) -> list[str]:
  specs = dict(jax.tree_util.tree_leaves_with_path(partitioner.logical_specs,
                                                   is_leaf=lambda x: isinstance(x, PartitionSpec)))
  shapes = jax.tree_util.tree_leaves_with_path(partitioner.param_shapes)
  shardings = jax.tree_util.tree_leaves(partitioner.param_shardings)
  out = []
  for (path, shape), sharding in zip(shapes, shardings):
    if _key_param(path_str(path)) in key_params:
      out.append(device_picture(path_str(path), shape.shape, sharding, tuple(specs[path])))
  return out


class Suite:
  """Runs the combinations of `settings` for one model config, weights source and inputs."""

  def __init__(self, config: ConfigDict, settings: Settings):
    self.config, self.settings = config, settings
    self.checkpoint = None
    self.scratch: str | None = None  # where the reference's random weights are saved, if anywhere
    if config.checkpoint:
      from qwen_logical.checkpoints.directory import open_checkpoint
      self.checkpoint = open_checkpoint(config.checkpoint, param_dtype=config.model.param_dtype,
                                        dtype=config.model.dtype, scan_layers=config.model.scan_layers)
      self.model_config = self.checkpoint.config
    else:
      from qwen_logical.jobs.run import model_config_from
      self.model_config = model_config_from(config)
    s, cfg = settings, self.model_config
    rng = np.random.RandomState(config.seed)
    self.tokens = rng.randint(0, cfg.vocab_size, (s.batch_size, s.seq_len)).astype(np.int32)
    # Prompts of different lengths, so generation exercises left padding.
    lengths = np.linspace(max(1, s.seq_len // 2), s.seq_len, s.batch_size).astype(int)
    self.prompts = [row[:n].tolist() for row, n in zip(self.tokens, lengths)]
    self.reference: Reference | None = None

  # --- the pieces of one run ----------------------------------------------------------
  def _weights(self, partitioner: Partitioner):
    """(params, how) for this partitioner: loaded (a checkpoint, or the reference saved as one) or initialised."""
    if self.checkpoint is not None:
      from qwen_logical.checkpoints.loader import load_params
      how = "the reference's weights, loaded" if self.scratch else "loaded from the checkpoint"
      return load_params(self.checkpoint, partitioner, progress=False), how
    return partitioner.init(self.config.seed), "sharded init"

  def _run(self, partitioner: Partitioner) -> tuple[dict[str, Any], Any, np.ndarray, list[list[int]]]:
    from qwen_logical.inference.generate import generate
    s = self.settings
    timings: dict[str, float] = {}
    start = time.perf_counter()
    params, how = self._weights(partitioner)
    params = jax.block_until_ready(params)
    timings["weights_s"] = time.perf_counter() - start
    start = time.perf_counter()
    compiled = partitioner.lower_forward(s.batch_size, s.seq_len).compile()
    timings["compile_s"] = time.perf_counter() - start
    mask = np.ones_like(self.tokens)
    start = time.perf_counter()
    sharding = partitioner.sharding(ax.TOKENS)
    logits = jax.block_until_ready(compiled(params, distributed.global_array(self.tokens, sharding),
                                            distributed.global_array(mask, sharding)))
    timings["run_s"] = time.perf_counter() - start
    host_logits = distributed.to_host(logits)
    del logits
    start = time.perf_counter()
    result = generate(partitioner, params, self.prompts, max_new_tokens=s.new_tokens)
    timings["generate_s"] = time.perf_counter() - start
    timings["generate_compile_s"] = result.timings.compile_s
    collectives = count_collectives(compiled.as_text())
    info = {"weights": how, "timings": timings, "collectives": collectives}
    return info, params, host_logits, [list(map(int, t)) for t in result.tokens]

  def run_reference(self) -> dict[str, Any]:
    """The 1x1 run (first device, tensor_parallel: on one device every table is the same)."""
    partitioner = Partitioner(self.model_config, make_mesh("1x1", devices=jax.devices()[:1]),
                              get_table("tensor_parallel"))
    info, params, logits, tokens = self._run(partitioner)
    if self.checkpoint is None and self.settings.weights == "reference":
      # Saved as an HF checkpoint, the weights reach every mesh through the sharded loader:
      # each device reads its own slice, and the host never holds another full copy.
      from qwen_logical.checkpoints.directory import open_checkpoint
      from qwen_logical.checkpoints.export import export_checkpoint
      self.scratch = tempfile.mkdtemp(prefix="qwen_logical_verify_")
      export_checkpoint(params, partitioner, self.scratch, progress=False)
      cfg = self.model_config
      self.checkpoint = open_checkpoint(self.scratch, param_dtype=cfg.param_dtype, dtype=cfg.dtype,
                                        scan_layers=cfg.scan_layers)
    del params
    self.reference = Reference(logits, tokens)
    info.update(logits_std=float(logits.std()), tokens=tokens)
    return info

  def close(self) -> None:
    if self.scratch:
      shutil.rmtree(self.scratch, ignore_errors=True)
      self.scratch = None

  def run_combination(self, mesh_shape: str, table_name: str) -> dict[str, Any]:
    """One (mesh, table): status 'ok', 'fail' or 'skipped', with everything measured."""
    s = self.settings
    entry: dict[str, Any] = {"mesh": mesh_shape, "rules": table_name}
    try:
      batch, model = parse_mesh_shape(mesh_shape)
      available = len(jax.devices())
      if batch * model > available:
        raise MeshError(f"mesh {mesh_shape} needs {batch * model} devices; {available} available (on CPU, "
                        f"simulate more with XLA_FLAGS=--xla_force_host_platform_device_count={batch * model})")
      mesh = make_mesh(mesh_shape, devices=jax.devices()[:batch * model])
      table = get_table(table_name, self.config.rule_overrides)
      entry["rules"] = table.name
      partitioner = Partitioner(self.model_config, mesh, table)
      partitioner.check_batch(s.batch_size, s.seq_len)
    except SKIPPABLE as e:
      entry.update(status="skipped", reason=str(e).replace("(--config.batch_size)", "(--config.verify.batch_size)"))
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
    ref = self.reference
    diff = float(np.abs(logits - ref.logits).max())
    overlap = top_k_overlap(logits, ref.logits, s.top_k)
    greedy_agree = tokens == ref.tokens
    if not diff <= s.max_logit_diff:
      failures.append(f"max |logit diff| {diff:.3g} > tolerance {s.max_logit_diff:.3g}")
    if overlap.min() < s.min_top_k_overlap:
      failures.append(f"top-{s.top_k} overlap {overlap.min():.3f} < {s.min_top_k_overlap}")
    if not greedy_agree:
      rows = [i for i, (a, b) in enumerate(zip(tokens, ref.tokens)) if a != b]
      failures.append(f"greedy tokens differ from the single-device run in prompt(s) {rows}")
    entry.update(info)
    entry.update(
        status="fail" if failures else "ok", failures=failures, max_abs_logit_diff=diff,
        top_k_overlap_min=float(overlap.min()), top_k_overlap_mean=float(overlap.mean()),
        greedy_tokens_agree=greedy_agree, devices=int(mesh.devices.size),
        bytes_by_device=report.bytes_by_device, replicated=report.replicated,
        pictures=pictures(partitioner, s.key_params))
    return entry


def format_combination(entry: dict[str, Any], settings: Settings) -> str:
  head = f"== {entry['mesh']} x {entry['rules']}: {entry['status'].upper()}"
  if entry["status"] == "skipped":
    return f"{head}\n   {entry['reason']}"
  lines = [head]
  if "timings" in entry:
    t = entry["timings"]
    per_device = entry["bytes_by_device"].values()
    lines += [
        f"   head plan: {entry['head_plan']}; weights: {entry['weights']}",
        f"   params MiB/device: max {max(per_device) / 2**20:.2f}, min {min(per_device) / 2**20:.2f} "
        f"over {entry['devices']} devices; replicated: {', '.join(entry['replicated']) or 'none'}",
        f"   times: weights {t['weights_s']:.2f} s, compile {t['compile_s']:.2f} s, forward "
        f"{t['run_s']:.3f} s, generate {t['generate_s']:.2f} s (compile {t['generate_compile_s']:.2f} s)",
        f"   vs 1x1: max |logit diff| {entry['max_abs_logit_diff']:.3g} (tolerance {settings.max_logit_diff:.3g}), "
        f"top-{settings.top_k} overlap min {entry['top_k_overlap_min']:.3f}, greedy tokens "
        f"{'agree' if entry['greedy_tokens_agree'] else 'DIFFER'}",
        "   collectives per forward: " + _collectives_text(entry["collectives"], long=True),
    ]
    lines += ["   " + line for p in entry["pictures"] for line in p.splitlines()]
  lines += [f"   FAILED: {f}" for f in entry.get("failures", [])]
  return "\n".join(lines)


def _collectives_text(collectives: dict, long: bool = False) -> str:
  short = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
           "collective-permute": "CP"}
  parts = []
  for kind in KINDS:
    c = collectives[kind]
    if c["count"]:
      name = kind if long else short[kind]
      parts.append(f"{name} {c['count']}" + (f" ({c['bytes'] / 2**20:.2f} MiB)" if long else ""))
  return ", ".join(parts) if parts else "none"


def summary_table(entries: list[dict[str, Any]]) -> str:
  header = ("mesh", "rules", "status", "max|dlogit|", "top-k min", "greedy", "MiB/dev", "replicated",
            "collectives/forward", "weights s", "compile s", "forward s")
  rows = []
  for e in entries:
    if e["status"] == "skipped" or "timings" not in e:
      rows.append((e["mesh"], e["rules"], e["status"]) + ("-",) * (len(header) - 3))
      continue
    t = e["timings"]
    rows.append((e["mesh"], e["rules"], e["status"], f"{e['max_abs_logit_diff']:.2e}",
                 f"{e['top_k_overlap_min']:.3f}", "agree" if e["greedy_tokens_agree"] else "DIFFER",
                 f"{max(e['bytes_by_device'].values()) / 2**20:.1f}",
                 str(len(e["replicated"])) if e["devices"] > 1 else "-",
                 _collectives_text(e["collectives"]), f"{t['weights_s']:.2f}", f"{t['compile_s']:.2f}",
                 f"{t['run_s']:.3f}"))
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  fmt = " | ".join(f"{{:<{w}}}" for w in widths)
  out = [fmt.format(*header), "-+-".join("-" * w for w in widths)]
  return "\n".join(out + [fmt.format(*r) for r in rows])


def verify(config: ConfigDict, suite: Suite | None = None) -> dict[str, Any]:
  """Runs the suite; prints progress and the summary; returns the report (report['ok']).

  `suite` (built from the same config) lets a caller inspect the reference run afterwards.
  """
  if jax.process_count() > 1:
    raise ValueError("The verification suite runs in one process (its 1x1 reference lives on one device); "
                     "drop --config.distributed.* and simulate the devices on one host instead.")
  say = distributed.printer()
  started = time.perf_counter()
  suite = suite or Suite(config, Settings.from_config(config.verify))
  settings, cfg = suite.settings, suite.model_config
  say(f"Verifying {cfg.name} ({cfg.num_layers} layers, {cfg.num_parameters / 1e9:.2f}B parameters, "
      f"{cfg.param_dtype}) on {len(jax.devices())} {jax.default_backend()} devices: meshes "
      f"{', '.join(settings.meshes)} x tables {', '.join(settings.tables)}"
      + (f" (overrides: {config.rule_overrides})" if config.rule_overrides else ""))
  entries = []
  try:
    reference = suite.run_reference()
    t = reference["timings"]
    say(f"== reference 1x1: weights {t['weights_s']:.2f} s ({reference['weights']}), compile "
        f"{t['compile_s']:.2f} s, forward {t['run_s']:.3f} s, logits std {reference['logits_std']:.3f}")
    for mesh_shape in settings.meshes:
      for table_name in settings.tables:
        entries.append(suite.run_combination(mesh_shape, table_name))
        say(format_combination(entries[-1], settings))
  finally:
    suite.close()
  failed = [e for e in entries if e["status"] == "fail"]
  skipped = [e for e in entries if e["status"] == "skipped"]
  say("\nSummary (vs the single-device run; collectives per forward: AR all-reduce, AG all-gather, "
      "RS reduce-scatter, A2A all-to-all, CP collective-permute)")
  say(summary_table(entries))
  for e in skipped:
    say(f"skipped {e['mesh']} x {e['rules']}: {e['reason']}")
  elapsed = time.perf_counter() - started
  verdict = (f"{len(entries) - len(failed) - len(skipped)} agree, {len(failed)} FAILED, {len(skipped)} skipped "
             f"of {len(entries)} combinations in {elapsed:.0f} s")
  say(("VERIFICATION FAILED: " if failed else "Verification passed: ") + verdict)
  return {"ok": not failed, "verdict": verdict, "elapsed_s": elapsed, "model": cfg.name,
          "num_layers": cfg.num_layers, "param_dtype": cfg.param_dtype,
          "settings": dataclasses.asdict(settings), "rule_overrides": config.rule_overrides,
          "reference": reference, "combinations": entries}
