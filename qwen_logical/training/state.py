"""The train state and its shardings: every optimizer moment carries its parameter's logical axes.

    state = init_state(partitioner, optimizer, params)        # step 0, sharded like the table says
    shardings = state_shardings(partitioner, optimizer)        # TrainState of NamedSharding
    axes = state_axes(partitioner, optimizer)                  # TrainState of logical names
    target = abstract_state(partitioner, optimizer)            # ShapeDtypeStructs with shardings (restore)

Frozen parameters are not part of the state: the train step takes them apart (LoRA's base).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from qwen_logical.common.errors import QwenLogicalError
from qwen_logical.sharding import programs
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.tree_paths import path_keys, path_str

Params = Any


class TrainingError(QwenLogicalError):
  """A fine-tuning setting or input that cannot work as given (the message names the fix)."""


@flax.struct.dataclass
class TrainState:
  """step int32[] (optimizer steps taken), trainable (the tree the optimizer updates), opt_state."""

  step: jax.Array
  trainable: Params
  opt_state: optax.OptState


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def _trainable(partitioner: Partitioner, trainable_axes, trainable_shapes):
  if trainable_axes is None:
    return partitioner.logical_specs, partitioner.param_shapes
  if trainable_shapes is None:
    raise TrainingError("state_shardings got trainable_axes for a tree of its own but no "
                        "trainable_shapes; pass both (trees of PartitionSpec and jax.ShapeDtypeStruct).")
  return trainable_axes, trainable_shapes


def state_axes(partitioner: Partitioner, optimizer: optax.GradientTransformation, trainable_axes=None,
               *, trainable_shapes=None) -> TrainState:
  """A TrainState of logical names: the trainable tree's own, each optimizer-state leaf whose tree
  path ends with a trainable leaf's path (Adam's mu and nu, ...) that leaf's, scalars replicated.
  Any other array in the optimizer state is an error (it would otherwise be replicated without
  anyone asking for it). Scalar leaves are `programs.REPLICATED`, so map over the state's arrays
  (a tree of the state's structure first), not over these names alone."""
  axes, shapes = _trainable(partitioner, trainable_axes, trainable_shapes)
  by_path = {path_keys(p): (names, shape) for (p, names), shape in zip(
      jax.tree_util.tree_leaves_with_path(axes, is_leaf=_is_spec), jax.tree_util.tree_leaves(shapes))}
  opt_shapes = jax.eval_shape(optimizer.init, shapes)

  def place(path, leaf):
    if leaf.ndim == 0:
      return programs.REPLICATED
    keys = path_keys(path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and tuple(hit[1].shape) == tuple(leaf.shape):
        return hit[0]
    raise TrainingError(f"optimizer state leaf {path_str(path)} {tuple(leaf.shape)} matches no trainable "
                        "parameter, so its sharding is unknown; use an optimizer whose state mirrors the "
                        "parameters (optax adamw, sgd, ...).")

  opt_axes = jax.tree_util.tree_map_with_path(place, opt_shapes)
  return TrainState(step=programs.REPLICATED, trainable=axes, opt_state=opt_axes)


def _structs(partitioner: Partitioner, optimizer: optax.GradientTransformation, trainable_axes,
             trainable_shapes) -> TrainState:
  _, shapes = _trainable(partitioner, trainable_axes, trainable_shapes)
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=shapes,
                    opt_state=jax.eval_shape(optimizer.init, shapes))


def state_shardings(partitioner: Partitioner, optimizer: optax.GradientTransformation, trainable_axes=None,
                    *, trainable_shapes=None) -> TrainState:
  """A TrainState of NamedSharding: `state_axes` under the partitioner's rule table."""
  axes = state_axes(partitioner, optimizer, trainable_axes, trainable_shapes=trainable_shapes)
  structs = _structs(partitioner, optimizer, trainable_axes, trainable_shapes)
  return jax.tree_util.tree_map(lambda _, names: partitioner.sharding(tuple(names)), structs, axes)


def abstract_state(partitioner: Partitioner, optimizer: optax.GradientTransformation, trainable_axes=None,
                   *, trainable_shapes=None) -> TrainState:
  """The state as jax.ShapeDtypeStruct leaves with their shardings (a restore target)."""
  shardings = state_shardings(partitioner, optimizer, trainable_axes, trainable_shapes=trainable_shapes)
  structs = _structs(partitioner, optimizer, trainable_axes, trainable_shapes)
  return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                structs, shardings)


def init_state(partitioner: Partitioner, optimizer: optax.GradientTransformation, trainable: Params,
               trainable_axes=None) -> TrainState:
  """Step 0: optimizer.init(trainable), made in place by state_shardings (nothing full-size on one device)."""
  shapes = None if trainable_axes is None else jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
  axes = state_axes(partitioner, optimizer, trainable_axes, trainable_shapes=shapes)

  def init(trainable):
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=optimizer.init(trainable))

  program = partitioner.program(init, in_axes=(axes.trainable,), out_axes=axes, name="init_state")
  return program(trainable)
