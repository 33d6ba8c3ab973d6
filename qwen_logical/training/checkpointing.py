"""Checkpoints of the train state (orbax): written every N steps atomically, restored onto any mesh,
rule table and layer form.

    <checkpoint_dir>/<step>/state   the TrainState's arrays: step, trainable, opt_state (orbax, sharded)
    <checkpoint_dir>/<step>/meta    JSON: the model's architecture and storage, the rule table, mesh,
                                    head layout and layer form, the logical axes of every array, the
                                    LoRA settings and the data position (what the loop needs to go on)

A save is atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` once
every file is complete, and only such directories count as steps, so a save cut short (a crash,
a full disk) is never restored. Saves block until written (no async saving), so the train step
may donate the state right after.

A restore reads the newest step into the shardings of the `state` it is given (the target run's
state_shardings): arrays are resharded on load. When the target lays the model out differently
(another head layout, scanned instead of unrolled layers) the arrays are converted
(`checkpoint_layout`). A checkpoint of another model (architecture, LoRA settings, shapes or
dtypes; `checkpoint_meta`) is a TrainCheckpointError naming both, never a silent change.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import time
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

from qwen_logical.common.errors import QwenLogicalError
from qwen_logical.model.head_layout import HeadLayout
from qwen_logical.sharding.tree_paths import path_keys
from qwen_logical.training import checkpoint_layout
from qwen_logical.training.checkpoint_meta import describe_model, flat, logical_axes, model_problems, shape_problems

FORMAT = 1
# config.train fields that fix the order of the training batches (the step counts the batches drawn).
DATA_ORDER = ("data", "seed", "batch_size", "eval_fraction", "max_length")


class TrainCheckpointError(QwenLogicalError):
  """A training checkpoint that cannot continue this run (another model, shapes, settings)."""


# --- the hooks jobs/finetune.py calls -----------------------------------------------------------
def _where(train_cfg) -> tuple[str, int, int | None]:
  directory = getattr(train_cfg, "checkpoint_dir", "") or ""
  every = int(getattr(train_cfg, "checkpoint_every", 0) or 0)
  keep = getattr(train_cfg, "checkpoint_keep", 3)
  return (os.path.abspath(directory) if directory else ""), every, (int(keep) if keep else None)


def lora_settings(train_cfg) -> dict | None:
  """The LoRA settings a checkpoint must share with the run that continues it (None: full fine-tuning)."""
  rank = int(getattr(train_cfg, "lora_rank", 0) or 0)
  if rank <= 0:
    return None
  alpha = getattr(train_cfg, "lora_alpha", None)
  targets = getattr(train_cfg, "lora_targets", None) or ""
  return {"rank": rank, "alpha": float(alpha) if alpha else 2.0 * rank,
          "targets": targets if isinstance(targets, str) else ",".join(targets)}


def save(train_cfg, state, force: bool = False, *, partitioner=None, trainable_axes=None,
         data_position: Mapping | None = None) -> bool:
  """Writes `state` to config.train.checkpoint_dir when its step is a multiple of checkpoint_every
  (or `force`); a no-op without a directory or with checkpoint_every <= 0 and no force. True if written."""
  directory, every, keep = _where(train_cfg)
  if not directory or (every <= 0 and not force):
    return False
  if data_position is None:  # the loop's order is fixed by these: the step counts the batches drawn
    data_position = {key: getattr(train_cfg, key, None) for key in DATA_ORDER}
  return save_state(directory, state, every=every, keep=keep, force=force, partitioner=partitioner,
                    trainable_axes=trainable_axes, data_position=data_position, lora=lora_settings(train_cfg))


def maybe_restore(train_cfg, state, *, partitioner=None, trainable_axes=None, with_data: bool = False):
  """The newest checkpoint in config.train.checkpoint_dir restored into `state`'s shardings, or `state`
  as is when there is none. with_data: returns (state, data position dict or None)."""
  directory, _, _ = _where(train_cfg)
  position = None
  if directory and latest_step(directory) is not None:
    state, meta = restore_state(directory, state, partitioner=partitioner, trainable_axes=trainable_axes,
                                lora=lora_settings(train_cfg))
    position = meta.get("data_position")
    changed = {key: (position[key], getattr(train_cfg, key, None)) for key in DATA_ORDER
               if position and key in position and position[key] != getattr(train_cfg, key, None)}
    if changed:
      logging.warning("Resuming with other data settings than the checkpoint's (%s): the examples after "
                      "step %d differ from those the saved run would have drawn.", ", ".join(
                          f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()), int(jax.device_get(state.step)))
  return (state, position) if with_data else state


# --- saving ---------------------------------------------------------------------------------------
def _quiet_orbax_info(record) -> bool:
  return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


@contextlib.contextmanager
def _manager(directory: str, keep: int | None = None):
  """An orbax CheckpointManager for `directory`, closed on exit; orbax's INFO lines (a dozen per save)
  stay out of the job's log while it is open, its warnings do not."""
  logger = logging.get_absl_logger()
  logger.addFilter(_quiet_orbax_info)
  try:
    with _open_manager(directory, keep) as manager:
      yield manager
  finally:
    logger.removeFilter(_quiet_orbax_info)


def _open_manager(directory: str, keep: int | None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item, handler in (("state", ocp.StandardCheckpointHandler), ("meta", ocp.JsonCheckpointHandler)):
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore) if item == "state" else (
        ocp.args.JsonSave, ocp.args.JsonRestore):
      registry.add(item, args, handler)
  return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


def latest_step(directory: str) -> int | None:
  """The newest complete step in `directory` (temporary directories of unfinished saves never count)."""
  if not os.path.isdir(directory):
    return None
  with _manager(directory) as manager:
    return manager.latest_step()


def save_state(directory: str, state, *, every: int = 1, keep: int | None = None, force: bool = False,
               partitioner=None, trainable_axes=None, data_position: Mapping | None = None,
               lora: Mapping | None = None) -> bool:
  """Saves `state` as step int(state.step) if a multiple of `every` (or `force`) and not saved yet.

  Blocks until the step directory is complete and renamed. Keeps the newest `keep` steps (None: all).
  """
  step = int(jax.device_get(state.step))
  if not force and (every <= 0 or step % every):
    return False
  start = time.perf_counter()
  state_dict = serialization.to_state_dict(state)
  axes = trainable_axes if trainable_axes is not None else getattr(partitioner, "logical_specs", None)
  meta = {"format": FORMAT, "step": step, "lora": dict(lora) if lora else None,
          "data_position": dict(data_position) if data_position is not None else None,
          "model": describe_model(partitioner) if partitioner is not None else None,
          "axes": logical_axes(state_dict, axes) if axes is not None else None}
  with _manager(directory, keep) as manager:
    if step in manager.all_steps():
      return False
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_dict),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()
  logging.info("Saved checkpoint step %d to %s in %.2f s", step, directory, time.perf_counter() - start)
  return True


# --- restoring ------------------------------------------------------------------------------------
def _saved_tree(manager: ocp.CheckpointManager, step: int):
  """The saved state's tree of orbax array metadata (shape, dtype), empty nodes and all."""
  tree = manager.item_metadata(step)["state"]
  return getattr(tree, "tree", tree)


def _saved_arrays(tree) -> dict[str, tuple[tuple, np.dtype]]:
  return {path: (tuple(m.shape), np.dtype(m.dtype)) for path, m in flat(tree).items()}


def _raise(where: str, meta: Mapping, partitioner, problems: list[str]) -> None:
  saved = (meta.get("model") or {}).get("name")
  ours = partitioner.config.name if partitioner is not None else None
  shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
  raise TrainCheckpointError(
      f"checkpoint {where}{f' (model {saved!r})' if saved else ''} does not fit this run"
      f"{f' (model {ours!r})' if ours else ''}:\n  - "
      + "\n  - ".join(shown) + "\nPoint config.train.checkpoint_dir at a new directory to start afresh, or "
      "build the model and LoRA settings the checkpoint was written with.")


def restore_state(directory: str, state, *, step: int | None = None, partitioner=None, trainable_axes=None,
                  lora: Mapping | None = None):
  """(state restored from `step` (default the newest) into `state`'s shardings, the saved meta dict).

  Without a partitioner the checkpoint must have `state`'s exact shapes; with one, another head
  layout or layer form of the same model is converted. TrainCheckpointError for another model.
  """
  start = time.perf_counter()
  with _manager(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise TrainCheckpointError(f"no complete checkpoint in {directory}.")
    where = os.path.join(directory, str(step))
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    problems = model_problems(meta, partitioner, lora)
    if problems:
      _raise(where, meta, partitioner, problems)
    target = serialization.to_state_dict(state)
    flat_target = {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for p, x in flat(target).items()}
    saved_tree = _saved_tree(manager, step)
    saved = _saved_arrays(saved_tree)
    same = saved == {p: (tuple(s.shape), np.dtype(s.dtype)) for p, s in flat_target.items()}
    if same:
      restored = flat(manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(target))))["state"])
    elif partitioner is not None and meta.get("axes") and meta.get("model"):
      restored = _restore_converted(manager, step, meta, saved_tree, flat_target, partitioner, where)
    else:
      _raise(where, meta, partitioner, shape_problems(saved, flat_target))
  values = jax.tree_util.tree_map_with_path(lambda p, _: restored["/".join(path_keys(p))], target)
  logging.info("Restored checkpoint step %d from %s in %.2f s", step, directory, time.perf_counter() - start)
  return serialization.from_state_dict(state, values), meta


def _abstract(state_dict):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_dict)


def _restore_converted(manager, step, meta, saved_tree, flat_target, partitioner, where) -> dict[str, jax.Array]:
  """The saved arrays in shardings that fit them on this mesh, converted to this run's layout."""
  axes = meta["axes"]

  def fitting(path, m):
    shape, names = tuple(m.shape), axes.get("/".join(path_keys(path)))
    sharding = checkpoint_layout.fitting_sharding(shape, names or (None,) * len(shape), partitioner)
    return jax.ShapeDtypeStruct(shape, m.dtype, sharding=sharding)

  abstract = jax.tree_util.tree_map_with_path(fitting, saved_tree)
  arrays = flat(manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"])
  saved_layout = HeadLayout(**meta["model"]["layout"])
  converted, problems = checkpoint_layout.convert(
      arrays, {p: axes.get(p) or () for p in arrays}, saved_layout, flat_target, partitioner.layout,
      partitioner.config.num_layers)
  if problems:
    _raise(where, meta, partitioner, problems)
  logging.info("Checkpoint %s converted from %s (%s) to %s (%s)", where, meta["model"]["table"],
               saved_layout.describe(), partitioner.name, partitioner.layout.describe())
  return converted
