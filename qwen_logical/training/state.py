"""The train state and its shardings: every optimizer moment carries its parameter's logical axes.

    state = init_state(partitioner, optimizer, params)        # step 0, sharded like the table says
    shardings = state_shardings(partitioner, optimizer)        # TrainState of NamedSharding
    target = abstract_state(partitioner, optimizer)            # ShapeDtypeStructs with shardings (restore)

Frozen parameters are not part of the state: the train step takes them apart (LoRA's base).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from qwen_logical.common.errors import QwenLogicalError
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


def state_shardings(partitioner: Partitioner, optimizer: optax.GradientTransformation, trainable_axes=None,
                    *, trainable_shapes=None) -> TrainState:
  """A TrainState of NamedSharding: the trainable tree by its logical axes under the table, each
  optimizer-state leaf whose tree path ends with a trainable leaf's path (Adam's mu and nu, ...)
  like that leaf, scalars replicated. Any other array in the optimizer state is an error (it would
  otherwise be replicated without anyone asking for it)."""
  axes, shapes = _trainable(partitioner, trainable_axes, trainable_shapes)
  mesh, rules = partitioner.mesh, partitioner.table.rules
  param_shardings = nn.logical_to_mesh_sharding(axes, mesh, rules)
  by_path = {path_keys(p): (s, shape) for (p, s), shape in zip(
      jax.tree_util.tree_leaves_with_path(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)),
      jax.tree_util.tree_leaves(shapes))}
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shapes = jax.eval_shape(optimizer.init, shapes)

  def place(path, leaf):
    if leaf.ndim == 0:
      return replicated
    keys = path_keys(path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and tuple(hit[1].shape) == tuple(leaf.shape):
        return hit[0]
    raise TrainingError(f"optimizer state leaf {path_str(path)} {tuple(leaf.shape)} matches no trainable "
                        "parameter, so its sharding is unknown; use an optimizer whose state mirrors the "
                        "parameters (optax adamw, sgd, ...).")

  opt_shardings = jax.tree_util.tree_map_with_path(place, opt_shapes)
  return TrainState(step=replicated, trainable=param_shardings, opt_state=opt_shardings)


def abstract_state(partitioner: Partitioner, optimizer: optax.GradientTransformation, trainable_axes=None,
                   *, trainable_shapes=None) -> TrainState:
  """The state as jax.ShapeDtypeStruct leaves with their shardings (a restore target)."""
  _, shapes = _trainable(partitioner, trainable_axes, trainable_shapes)
  shardings = state_shardings(partitioner, optimizer, trainable_axes, trainable_shapes=trainable_shapes)
  structs = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=shapes,
                       opt_state=jax.eval_shape(optimizer.init, shapes))
  return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                structs, shardings)


def init_state(partitioner: Partitioner, optimizer: optax.GradientTransformation, trainable: Params,
               trainable_axes=None) -> TrainState:
  """Step 0: optimizer.init(trainable), made in place by state_shardings (nothing full-size on one device)."""
  shapes = None if trainable_axes is None else jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
  shardings = state_shardings(partitioner, optimizer, trainable_axes, trainable_shapes=shapes)

  def init(trainable):
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=optimizer.init(trainable))

  return jax.jit(init, in_shardings=(shardings.trainable,), out_shardings=shardings)(trainable)
