"""The main job: model on a mesh under a rule table, sharded init, report, forward pass, timings."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from absl import logging
from ml_collections import ConfigDict

from qwen_logical.common import host
from qwen_logical.model.config import ModelConfig, from_hf_config, preset
from qwen_logical.sharding.mesh import make_mesh, mesh_name, parse_mesh_shape, simulate_cpu_devices

ARCHITECTURE_OVERRIDES = ("num_layers", "hidden_size", "intermediate_size", "num_heads",
                          "num_kv_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                          "rope_theta", "initializer_range")


def say(*args, **kwargs) -> None:
  """print, flushed, on process 0 only (every process computes the same results)."""
  from qwen_logical.sharding.distributed import printer
  printer()(*args, **kwargs)


def model_config_from(config: ConfigDict) -> ModelConfig:
  """The ModelConfig a run config asks for: a preset or an HF config.json, then overrides."""
  m = config.model
  overrides = {k: m[k] for k in ARCHITECTURE_OVERRIDES if k in m and m[k] is not None}
  overrides.update(param_dtype=m.param_dtype, dtype=m.dtype, scan_layers=m.scan_layers)
  if m.get("hf_config"):
    return from_hf_config(m.hf_config, **overrides)
  return preset(m.preset).replace(**overrides)


# Sharded init on CPU holds, besides the finished shards, temporaries of about 3.5x the
# parameter being generated (random bits, the normal transform); measured on the 7B shape.
INIT_TEMPORARY_FACTOR = 3.5


def init_host_bytes(cfg: ModelConfig) -> int:
  """Estimated peak host bytes of sharded init on CPU: all shards plus one parameter's temporaries."""
  itemsize = np.dtype(cfg.param_dtype).itemsize
  per_layer = (cfg.replace(num_layers=2).num_parameters - cfg.replace(num_layers=1).num_parameters) * itemsize
  # +15% per layer for head plan padding/repetition and allocator slack.
  total = cfg.num_parameters * itemsize + int(0.15 * per_layer) * cfg.num_layers
  stacked = cfg.num_layers if cfg.scan_layers else 1  # scanned layers make one array per kernel
  largest = max(cfg.vocab_size, stacked * cfg.intermediate_size) * cfg.hidden_size * itemsize
  return total + int(INIT_TEMPORARY_FACTOR * largest)


def fit_layers_to_host(cfg: ModelConfig, budget_fraction: float, explicit_layers: bool) -> tuple[ModelConfig, str]:
  """Reduces the layer count when init would not fit the host; says so, never silently."""
  budget = int(host.available_host_bytes() * budget_fraction)
  need = init_host_bytes(cfg)
  if need <= budget:
    return cfg, ""
  fit = next((n for n in range(cfg.num_layers, 0, -1) if init_host_bytes(cfg.replace(num_layers=n)) <= budget), 1)
  params_gib = cfg.num_parameters * np.dtype(cfg.param_dtype).itemsize / 2**30
  message = (f"{cfg.name} with {cfg.num_layers} layers needs about {need / 2**30:.1f} GiB of host memory "
             f"to initialise in {cfg.param_dtype} ({params_gib:.1f} GiB of parameters); this host "
             f"allows {budget / 2**30:.1f} GiB ({budget_fraction:.0%} of available).")
  if explicit_layers:
    return cfg, message + " Running the requested layer count anyway (--config.model.num_layers was set)."
  reduced = cfg.replace(num_layers=fit)
  return reduced, (message + f" RUNNING A REDUCED VARIANT: {fit} of {cfg.num_layers} layers, every other "
                   "dimension as in the full model. Set --config.model.num_layers to choose, or run on a "
                   "host with more memory for the full model.")


def setup_devices(config: ConfigDict) -> None:
  """Simulated CPU devices for the mesh and, for a multi-process run, joining the job.

  Runs before JAX initialises. On CPU each process simulates its share of the mesh's
  devices (all of them when alone); accelerators bring their own.
  """
  from qwen_logical.sharding import distributed
  d = config.distributed
  multi = bool(d.coordinator) or d.auto
  processes = d.num_processes if multi and d.num_processes > 0 else 1
  shapes = [parse_mesh_shape(config.mesh)]
  if config.job == "verify":
    shapes = [parse_mesh_shape(m) for m in config.verify.meshes.split(",") if m.strip()]
  total = max(b * m for b, m in shapes)
  if config.num_cpu_devices > 0:
    count = config.num_cpu_devices
  elif processes >= 1 and total % processes == 0:
    count = total // processes
  else:
    raise distributed.DistributedError(
        f"mesh {config.mesh} has {total} devices, which do not split evenly over "
        f"--config.distributed.num_processes={d.num_processes}; set --config.num_cpu_devices (per process) "
        "or use a mesh whose size is a multiple of the process count.")
  on_cpu = config.platform in ("", "cpu")
  if on_cpu:
    simulate_cpu_devices(count)
  if config.platform:
    import jax
    jax.config.update("jax_platforms", config.platform)
  if multi:
    import jax
    distributed.initialize(d.coordinator, d.num_processes, d.process_id, auto=d.auto,
                           cpu=on_cpu,
                           initialization_timeout_s=d.initialization_timeout_s,
                           heartbeat_timeout_s=d.heartbeat_timeout_s)
    if not distributed.is_main_process():
      logging.set_verbosity(logging.WARNING)
    logging.info("Process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def _model_config_and_params(config: ConfigDict, mesh, table):
  """(Partitioner, params, note, timings) from a checkpoint directory or a sharded random init."""
  import jax
  from qwen_logical.sharding.partitioner import Partitioner

  timings: dict[str, float] = {}
  if config.checkpoint:
    from qwen_logical.checkpoints.directory import open_checkpoint
    from qwen_logical.checkpoints.loader import load_params
    overridden = [k for k in ARCHITECTURE_OVERRIDES if config.model.get(k) is not None]
    if overridden:
      raise ValueError(f"--config.model.{overridden[0]} cannot change a checkpoint's architecture; the "
                       f"model comes from {config.checkpoint}/config.json. Drop the override.")
    checkpoint = open_checkpoint(config.checkpoint, param_dtype=config.model.param_dtype,
                                 dtype=config.model.dtype, scan_layers=config.model.scan_layers)
    partitioner = Partitioner(checkpoint.config, mesh, table)
    _log_model(partitioner, mesh, table)
    start = time.perf_counter()
    params = jax.block_until_ready(load_params(checkpoint, partitioner))
    timings["load_s"] = time.perf_counter() - start
    return partitioner, params, "", timings
  cfg = model_config_from(config)
  note = ""
  if config.fit_to_host_memory and jax.default_backend() == "cpu":
    cfg, note = fit_layers_to_host(cfg, config.host_memory_fraction, config.model.num_layers is not None)
    if note:
      logging.warning(note)
  partitioner = Partitioner(cfg, mesh, table)
  _log_model(partitioner, mesh, table)
  start = time.perf_counter()
  params = jax.block_until_ready(partitioner.init(config.seed))
  timings["init_s"] = time.perf_counter() - start
  logging.info("Sharded init: %.2f s", timings["init_s"])
  return partitioner, params, note, timings


def _log_model(partitioner, mesh, table) -> None:
  import jax
  cfg = partitioner.config
  logging.info("Model %s: %d layers, hidden %d, %d query / %d KV heads, head_dim %d, mlp %d, vocab %d, "
               "%.2fB parameters", cfg.name, cfg.num_layers, cfg.hidden_size, cfg.num_heads,
               cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size, cfg.num_parameters / 1e9)
  logging.info("Mesh %s on %d %s devices; rule table %s: %s", mesh_name(mesh), mesh.devices.size,
               jax.default_backend(), table.name, table.description)


def _forward_sample(config: ConfigDict, partitioner, params, timings) -> dict[str, Any]:
  """Compiles and runs the forward pass on a random [batch_size, seq_len] batch."""
  import jax
  from qwen_logical.model import axes as ax
  from qwen_logical.sharding.collectives import count_collectives
  from qwen_logical.sharding.distributed import global_array, to_host

  cfg = partitioner.config
  partitioner.check_batch(config.batch_size, config.seq_len)
  tokens = np.random.RandomState(config.seed).randint(0, cfg.vocab_size, (config.batch_size, config.seq_len))
  mask = np.ones_like(tokens)
  start = time.perf_counter()
  compiled = partitioner.lower_forward(config.batch_size, config.seq_len).compile()
  timings["compile_s"] = time.perf_counter() - start
  logging.info("Compile forward [%d, %d]: %.2f s", config.batch_size, config.seq_len, timings["compile_s"])
  collectives = {k: v for k, v in count_collectives(compiled.as_text()).items() if v["count"]}
  start = time.perf_counter()
  token_sharding = partitioner.sharding(ax.TOKENS)
  logits = jax.block_until_ready(compiled(params, global_array(tokens.astype(np.int32), token_sharding),
                                          global_array(mask.astype(np.int32), token_sharding)))
  timings["run_s"] = time.perf_counter() - start
  logging.info("Forward pass: %.3f s (%.1f tokens/s)", timings["run_s"], tokens.size / timings["run_s"])
  host_logits = to_host(logits)
  say(f"\nForward pass on a [{config.batch_size}, {config.seq_len}] batch: logits {tuple(host_logits.shape)} "
        f"sharded {logits.sharding.spec}, mean {host_logits.mean():+.4f}, std {host_logits.std():.4f}")
  say(f"Collectives in the compiled forward: {collectives or 'none'}")
  return {"logits_shape": list(host_logits.shape), "logits_sharding": str(logits.sharding.spec),
          "logits_mean": float(host_logits.mean()), "logits_std": float(host_logits.std()),
          "next_tokens": host_logits[:, -1].argmax(-1).tolist(), "collectives": collectives}


def read_prompts(config: ConfigDict) -> list[str]:
  """--config.prompt, plus --config.prompts: a file (one prompt per line) or prompts joined by '||'."""
  prompts = [config.prompt] if config.prompt else []
  if config.prompts:
    if os.path.isfile(config.prompts):
      with open(config.prompts) as f:
        prompts += [line.rstrip("\n") for line in f if line.strip()]
    else:
      prompts += [p.strip() for p in config.prompts.split("||") if p.strip()]
  return prompts


def _generate(config: ConfigDict, partitioner, params, prompts: list[str]) -> dict[str, Any]:
  """Tokenizes (chat template optional), generates with streaming, prints the text."""
  from qwen_logical.inference.generate import generate
  from qwen_logical.checkpoints.tokenizer import Tokenizer

  source = config.tokenizer or config.checkpoint
  if not source:
    raise ValueError("A text prompt needs a tokenizer: pass --config.checkpoint=DIR (with tokenizer.json) "
                     "or --config.tokenizer=DIR.")
  tokenizer = Tokenizer.from_directory(source)
  if config.chat:
    inputs = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
  else:
    inputs = [tokenizer.encode(p) for p in prompts]
  streamed = len(prompts) == 1

  def show(event):
    if streamed and event.texts and event.texts[0]:
      say(event.texts[0], end="")

  if streamed:
    say(f"\n>>> {prompts[0]}\n", flush=True)
  result = generate(partitioner, params, inputs, tokenizer=tokenizer, max_new_tokens=config.max_new_tokens,
                    temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                    seed=config.seed, callback=show)
  if streamed:
    say()
  else:
    for prompt, text, reason in zip(prompts, result.texts, result.finish_reasons):
      say(f"\n>>> {prompt}\n{text}\n[{reason}]")
  t = result.timings
  say(f"\nGeneration: prefill {t.prefill_tokens_per_s:.1f} tokens/s, decode {t.decode_tokens_per_s:.1f} "
        f"tokens/s, compile {t.compile_s:.2f} s, {t.new_tokens} new tokens")
  return {"texts": result.texts, "tokens": result.tokens, "finish_reasons": result.finish_reasons,
          "generation_timings": t.to_dict()}


def _write_report(path: str, report: dict[str, Any]) -> None:
  from qwen_logical.sharding.distributed import is_main_process
  if path and is_main_process():
    with open(path, "w") as f:
      json.dump(report, f, indent=1, default=str)
    logging.info("Wrote report to %s", path)


def run(config: ConfigDict) -> dict[str, Any]:
  """Runs the job `config.job` names and returns a JSON-able summary (`ok`: whether it passed)."""
  if config.job not in ("run", "verify"):
    raise ValueError(f"--config.job={config.job!r}: use 'run' (one mesh and table) or 'verify' "
                     "(the verification suite, configs/verify.py).")
  setup_devices(config)
  if config.job == "verify":
    from qwen_logical.jobs.verify import verify
    report = verify(config)
    _write_report(config.report, report)
    return report
  import jax
  from qwen_logical.sharding.report import sharding_report
  from qwen_logical.sharding.rules import get_table

  mesh = make_mesh(config.mesh)
  table = get_table(config.rules, config.rule_overrides)
  partitioner, params, note, timings = _model_config_and_params(config, mesh, table)
  cfg = partitioner.config
  report = sharding_report(partitioner, params)
  say(report.format(), flush=True)

  summary: dict[str, Any] = {
      "model": cfg.name, "num_layers": cfg.num_layers, "mesh": config.mesh, "rules": table.name,
      "devices": int(mesh.devices.size), "backend": jax.default_backend(), "note": note,
      "head_plan": partitioner.layout.describe(), "timings": timings,
      "bytes_by_device": report.bytes_by_device, "replicated": report.replicated,
  }
  prompts = read_prompts(config)
  if prompts:
    summary.update(_generate(config, partitioner, params, prompts))
  else:
    summary.update(_forward_sample(config, partitioner, params, timings))
  if config.export:
    from qwen_logical.checkpoints.export import export_checkpoint
    start = time.perf_counter()
    files = export_checkpoint(params, partitioner, config.export, copy_files_from=config.checkpoint or None)
    timings["export_s"] = time.perf_counter() - start
    logging.info("Exported %d files to %s in %.2f s", len(files), config.export, timings["export_s"])
    summary["exported"] = files
  say("Timings: " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in timings.items()))
  if note:
    say(f"NOTE: {note}")
  _write_report(config.report, {"summary": summary, "sharding": report.to_dict()})
  return summary
