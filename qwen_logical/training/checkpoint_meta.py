"""The facts a training checkpoint carries besides its arrays, and comparing them with a run.

`describe_model` (the saving run's architecture, storage, layer form, mesh, table and head layout)
and `logical_axes` (every saved array's logical names) go into the checkpoint's JSON; a restore
checks them (`model_problems`, `shape_problems`) before anything is converted or loaded.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import PartitionSpec

from qwen_logical.sharding.tree_paths import path_keys

# What makes two models the same model (storage dtypes and the layer form may differ).
ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "tie_word_embeddings", "rope_theta", "rms_norm_eps")


def flat(tree) -> dict[str, Any]:
  """'/'-joined path -> leaf of a tree."""
  return {"/".join(path_keys(p)): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def logical_axes(state_dict: Mapping, trainable_axes) -> dict[str, list | None]:
  """'/'-joined path -> logical names of every array of a state dict: trainable leaves from
  `trainable_axes`; optimizer leaves from the trainable leaf whose path ends theirs (Adam's mu, nu)
  with the same rank; scalars (); anything else None (replicated on restore)."""
  by_path = {path_keys(p): tuple(spec) for p, spec in jax.tree_util.tree_leaves_with_path(
      trainable_axes, is_leaf=lambda x: isinstance(x, PartitionSpec))}
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state_dict):
    keys, ndim = path_keys(path), np.ndim(leaf)
    names = () if ndim == 0 else next((by_path[keys[k:]] for k in range(1, len(keys))
                                       if len(by_path.get(keys[k:], ())) == ndim), None)
    out["/".join(keys)] = None if names is None else [n if n is None else str(n) for n in names]
  return out


def describe_model(partitioner) -> dict:
  """The JSON facts of the saving run's model and layout."""
  cfg = partitioner.config
  return {"architecture": {k: getattr(cfg, k) for k in ARCHITECTURE}, "name": cfg.name,
          "param_dtype": cfg.param_dtype.name, "quantization": cfg.quantization, "scan_layers": cfg.scan_layers,
          "mesh": dict(partitioner.mesh_shape), "table": partitioner.table.name,
          "rules": [[name, value] for name, value in partitioner.table.rules],
          "layout": dataclasses.asdict(partitioner.layout)}


def model_problems(meta: Mapping, partitioner, lora: Mapping | None) -> list[str]:
  """Each difference of architecture or LoRA settings between a checkpoint's `meta` and this run."""
  problems = []
  if meta.get("model") is not None and partitioner is not None:
    saved, cfg = meta["model"]["architecture"], partitioner.config
    problems += [f"{k}: checkpoint {saved.get(k)!r}, this run {getattr(cfg, k)!r}"
                 for k in ARCHITECTURE if saved.get(k) != getattr(cfg, k)]
  if (meta.get("lora") or None) != (dict(lora) if lora else None):
    problems.append(f"LoRA: checkpoint {meta.get('lora')}, this run {dict(lora) if lora else None}")
  return problems


def shape_problems(saved: Mapping[str, tuple], target: Mapping[str, jax.ShapeDtypeStruct]) -> list[str]:
  """Each array missing on either side or of another shape or dtype, parameters first."""
  problems = [f"{p}: not in the checkpoint" for p in target if p not in saved]
  problems += [f"{p}: checkpoint {saved[p][0]} {saved[p][1]}, this run {tuple(s.shape)} {np.dtype(s.dtype)}"
               for p, s in target.items() if p in saved and saved[p] != (tuple(s.shape), np.dtype(s.dtype))]
  problems += [f"{p}: in the checkpoint, not in this run" for p in saved if p not in target]
  problems.sort(key=lambda text: not text.startswith("trainable/"))  # parameters before optimizer moments
  return problems or ["the arrays differ"]
