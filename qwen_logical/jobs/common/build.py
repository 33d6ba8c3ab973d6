"""The one build path of every job: run config -> ModelConfig or checkpoint -> Partitioner -> params.

    source = model_source(config)                    # ModelConfig (+ opened checkpoint), once per job
    partitioner = make_partitioner(source, mesh, table)
    params, seconds = source.weights(partitioner)    # loaded into shards, or sharded random init
    forward = timed_forward(partitioner, params, tokens)

Runs after `devices.setup_devices` (the platform decides the layer form and whether the
host-memory fit applies).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from qwen_logical.common.errors import QwenLogicalError
from qwen_logical.jobs.common import host_memory
from qwen_logical.model import axes as ax
from qwen_logical.model.config import ModelConfig, preset
from qwen_logical.model.hf_config import from_hf_config
from qwen_logical.sharding import distributed
from qwen_logical.sharding.collectives import count_collectives
from qwen_logical.sharding.mesh import mesh_name
from qwen_logical.sharding.partitioner import Partitioner

# ModelConfig fields a run config sets that are numerics and structure, not architecture: a
# checkpoint accepts them; every other ModelConfig field under config.model is an architecture
# override (the placeholders in configs/base.py say which).
NUMERICS = ("param_dtype", "dtype", "quantization", "kv_cache_dtype", "scan_layers")
_NOT_OVERRIDES = NUMERICS + ("name",)


class JobError(QwenLogicalError):
  """A run config the jobs cannot carry out as given (the message names the flag and the fix)."""


def gathers_weights(table, mesh_shape: dict[str, int] | None = None) -> bool:
  """Whether `table` shards parameters along embed (FSDP): the forward then gathers each layer's weights.

  With `mesh_shape`, only mesh axes of more than one device count.
  """
  axes = table.mesh_axes(ax.EMBED)
  return any(mesh_shape is None or mesh_shape.get(a, 1) > 1 for a in axes)


def scan_layers_for(setting: bool | None, backend: str, gathers: bool = False) -> bool:
  """--config.model.scan_layers resolved: None picks the form for the platform and table.

  Unrolled on CPU and GPU: XLA copies each layer's slice of scanned (stacked) weights on every
  decode step (XLA:CPU: about 4x slower decode on a real 0.5B; H100, 7B shape, bf16, batch 1:
  14.9 ms per step scanned, 5.7 ms unrolled, docs/performance.md). Scanned on TPU (one compiled
  layer instead of N; not measured here) and under a table that gathers weights (`gathers`,
  FSDP), where XLA holds every unrolled layer's gathered weights on every device at once
  (measured on the 0.5B shape, XLA:CPU, 1x8 fsdp: +0.5 GB peak per layer, 21 GB at 24 layers)
  and a scan gathers one layer at a time.
  """
  if setting is not None:
    return setting
  return gathers or backend not in ("cpu", "gpu")


def numerics(config: ConfigDict, gathers: bool = False) -> dict[str, Any]:
  """param_dtype, dtype, quantization and the resolved scan_layers of a run config (`gathers`: see
  scan_layers_for)."""
  m = config.model
  return {"param_dtype": m.param_dtype or "float32", "dtype": m.dtype, "quantization": m.get("quantization", ""),
          "kv_cache_dtype": m.get("kv_cache_dtype", ""),
          "scan_layers": scan_layers_for(m.scan_layers, jax.default_backend(), gathers)}


def architecture_overrides(config: ConfigDict) -> dict[str, Any]:
  """The ModelConfig architecture fields the run config sets (not None) under config.model."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)} - set(_NOT_OVERRIDES)
  return {k: v for k, v in config.model.items() if k in fields and v is not None}


def model_config_from(config: ConfigDict, gathers: bool = False) -> ModelConfig:
  """The ModelConfig a run config asks for: a preset or an HF config.json, then its overrides."""
  m = config.model
  overrides = {**architecture_overrides(config), **numerics(config, gathers)}
  if m.get("hf_config"):
    return from_hf_config(m.hf_config, **overrides)
  return preset(m.preset).replace(**overrides)


@dataclasses.dataclass
class Source:
  """Where a job's model comes from: its ModelConfig and, for a checkpoint, the opened directory.

  Attributes:
    config: the ModelConfig every partitioner of the job is built for.
    checkpoint: the opened checkpoint (weights are loaded from it), or None (sharded random init).
    seed: the random-init seed.
    note: a message the job repeats at the end (a reduced layer count), or "".
    label: how the weights came to be, for reports.
  """

  config: ModelConfig
  checkpoint: Any = None
  seed: int = 0
  note: str = ""
  label: str = ""

  @property
  def kind(self) -> str:
    """'load' or 'init' (the timing's name)."""
    return "load" if self.checkpoint is not None else "init"

  def weights(self, partitioner: Partitioner, progress: bool = True) -> tuple[Any, float]:
    """(params on the partitioner's mesh, seconds): each device's slice read, or created, in place."""
    start = time.perf_counter()
    if self.checkpoint is not None:
      from qwen_logical.checkpoints.loader import load_params
      params = load_params(self.checkpoint, partitioner, progress=progress)
    else:
      params = partitioner.init(self.seed)
    params = jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    logging.info("Weights (%s) on %s: %.2f s", self.kind, partitioner.name, seconds)
    return params, seconds


def open_source(directory: str, numerics_: dict[str, Any], label: str) -> Source:
  """A Source reading its weights from an HF checkpoint directory (validated, headers only)."""
  from qwen_logical.checkpoints.directory import open_checkpoint
  checkpoint = open_checkpoint(directory, **numerics_)
  return Source(checkpoint.config, checkpoint, label=label)


def model_source(config: ConfigDict, gathers: bool = False) -> Source:
  """The job's model: --config.checkpoint, else the preset / hf_config with overrides.

  `gathers`: whether a rule table of the job gathers weights (gathers_weights), which decides
  the layer form when --config.model.scan_layers is None. On CPU with
  --config.fit_to_host_memory, a random model that would not fit the host runs with fewer
  layers, and the Source's note says so.
  """
  if config.checkpoint:
    overridden = sorted(architecture_overrides(config))
    if overridden:
      raise JobError(f"--config.model.{overridden[0]} cannot change a checkpoint's architecture; the "
                     f"model comes from {config.checkpoint}/config.json. Drop the override.")
    source = open_source(config.checkpoint, numerics(config, gathers), "loaded from the checkpoint")
    source.config, source.note = _auto_storage(config, source.config)
    source.checkpoint.config = source.config
    return source
  cfg, note = _auto_storage(config, model_config_from(config, gathers))
  if config.fit_to_host_memory and jax.default_backend() == "cpu":
    cfg, reduced = host_memory.fit_layers_to_host(cfg, config.host_memory_fraction,
                                                  config.model.num_layers is not None)
    if reduced:
      logging.warning(reduced)
    note = " ".join(filter(None, (note, reduced)))
  return Source(cfg, seed=config.seed, note=note, label="sharded init")


def _auto_storage(config: ConfigDict, cfg: ModelConfig) -> tuple[ModelConfig, str]:
  """--config.model.param_dtype='' (auto): float32 when the model fits this host so, else bfloat16."""
  if config.model.param_dtype or config.model.get("quantization"):
    return cfg, ""
  dtype, note = host_memory.storage_dtype(cfg, config.host_memory_fraction)
  if note:
    logging.info(note)
  return cfg.replace(param_dtype=dtype), note


def make_partitioner(source: Source, mesh, table) -> Partitioner:
  """The Partitioner for the source's model on `mesh` under `table` (validates; logs what it built)."""
  partitioner = Partitioner(source.config, mesh, table)
  cfg = source.config
  logging.info("Model %s: %d layers (%s), hidden %d, %d query / %d KV heads, head_dim %d, mlp %d, vocab %d, "
               "%.2fB parameters", cfg.name, cfg.num_layers, "scanned" if cfg.scan_layers else "unrolled",
               cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
               cfg.vocab_size, cfg.num_parameters / 1e9)
  logging.info("Mesh %s on %d %s devices; rule table %s: %s", mesh_name(mesh), mesh.devices.size,
               jax.default_backend(), table.name, table.description)
  return partitioner


@dataclasses.dataclass
class Forward:
  """One compiled, timed forward pass.

  logits: float32[B, L, V] on the host (activation_batch, activation_length, activation_vocab).
  sharding: the device logits' PartitionSpec, as text.
  collectives: per kind, count and bytes per execution of the compiled program.
  """

  logits: np.ndarray
  sharding: str
  compile_s: float
  run_s: float
  collectives: dict[str, dict[str, int]]


def timed_forward(partitioner: Partitioner, params, tokens: np.ndarray, batch_flag: str = "--config.batch_size"
                  ) -> Forward:
  """Compiles and runs the forward pass on int[B, L] `tokens` (no padding), timing each.

  `batch_flag` is the flag a user changes when [B, L] does not split over the mesh.
  """
  tokens = np.asarray(tokens, np.int32)
  partitioner.check_batch(*tokens.shape, flag=batch_flag)
  start = time.perf_counter()
  compiled = partitioner.lower_forward(*tokens.shape).compile()
  compile_s = time.perf_counter() - start
  sharding = partitioner.sharding(ax.TOKENS)
  start = time.perf_counter()
  logits = jax.block_until_ready(compiled(params, distributed.global_array(tokens, sharding),
                                          distributed.global_array(np.ones_like(tokens), sharding)))
  run_s = time.perf_counter() - start
  logging.info("Forward %s on %s: compile %.2f s, run %.3f s (%.1f tokens/s)", tokens.shape, partitioner.name,
               compile_s, run_s, tokens.size / run_s)
  return Forward(distributed.to_host(logits), str(logits.sharding.spec), compile_s, run_s,
                 count_collectives(compiled.as_text()))
