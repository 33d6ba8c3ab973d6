"""The jitted train and eval steps, bound to one Partitioner (mesh and rule table).

    fns = make_train_step(partitioner, optimizer, grad_accum=2, clip_norm=1.0)
    state, metrics = fns.train_step(state, None, batch)     # state donated
    metrics = fns.eval_step(state.trainable, None, batch)

A batch is a dict of host (numpy) or global arrays, each [B, L] with logical axes (activation_batch,
activation_length): tokens int32, loss_mask float32 (1 where the NEXT token is trained; the last
column never counts), attention_mask int32 (1 real token, 0 padding). The step computes the model in
FORWARD mode under the partitioner's rules, the masked cross-entropy in float32, gradients summed over
grad_accum micro-batches and divided by the trained-token count, tied through the head layout
(`training.heads`), clipped by their canonical global norm, then the optimizer update.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from qwen_logical.model import axes as ax
from qwen_logical.model.layers import constrain
from qwen_logical.model.model import Qwen2ForCausalLM
from qwen_logical.sharding import validation
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.training.heads import canonical_norm, tie_gradients
from qwen_logical.training.loss import masked_cross_entropy
from qwen_logical.training.state import TrainingError, TrainState, state_shardings

BATCH_KEYS = ("tokens", "loss_mask", "attention_mask")
_DTYPES = {"tokens": np.int32, "loss_mask": np.float32, "attention_mask": np.int32}
Batch = dict  # {'tokens': int32[B, L], 'loss_mask': float32[B, L], 'attention_mask': int32[B, L]}


class StepFns(NamedTuple):
  """train_step(state, frozen, batch) -> (state, metrics); eval_step(trainable, frozen, batch) -> metrics;
  shardings: the TrainState of NamedSharding the train step keeps; gradients: what train_step would
  apply before clipping (for tests and benchmarks)."""

  train_step: Callable[..., tuple[TrainState, dict]]
  eval_step: Callable[..., dict]
  shardings: TrainState
  gradients: Callable[..., tuple[dict, Any]]  # (trainable, frozen, batch) -> (metrics, tied mean gradient)


def check_batch_size(partitioner: Partitioner, batch_size: int, grad_accum: int = 1,
                     flag: str = "--config.train.batch_size") -> None:
  """TrainingError unless each micro-batch (batch_size / grad_accum rows) splits over the batch shards."""
  shards = partitioner.batch_shards
  if grad_accum < 1 or batch_size % (grad_accum * shards):
    raise TrainingError(
        f"{flag}={batch_size} does not split into --config.train.grad_accum={grad_accum} micro-batches "
        f"over the {shards} batch shards of mesh {partitioner.name} (activation_batch -> "
        f"{partitioner.table.mapping().get(ax.ACTIVATION_BATCH)}); use a batch size that is a multiple "
        f"of {grad_accum * shards}, or change grad_accum, the mesh or the rule table.")


def data_shard(partitioner: Partitioner) -> tuple[int, int]:
  """(index, count): this process holds block `index` of `count` equal blocks of every batch's rows.

  With one process (0, 1). Processes that share rows (the batch split over fewer devices than the
  processes hold) get the same index and must read the same examples."""
  shards = partitioner.batch_shards
  indices = partitioner.sharding(ax.TOKENS).addressable_devices_indices_map((shards, 1)).values()
  starts = sorted({index[0].indices(shards)[0] for index in indices})
  block = len(starts)
  return starts[0] // block, shards // block


def global_rows(partitioner: Partitioner, local_rows: int) -> int:
  """Rows of the global batch when this process holds `local_rows` of them."""
  return local_rows * data_shard(partitioner)[1]


def place_batch(partitioner: Partitioner, batch: Batch) -> Batch:
  """Host rows -> global arrays split (activation_batch, activation_length). In a multi-process job each
  process passes its own rows (`data_shard` says which)."""
  sharding = partitioner.sharding(ax.TOKENS)
  out = {}
  for key in BATCH_KEYS:
    if key not in batch:
      raise TrainingError(f"a training batch needs {BATCH_KEYS}; {key!r} is missing.")
    value = batch[key]
    if isinstance(value, jax.Array):
      out[key] = value
    elif jax.process_count() == 1:
      out[key] = jax.device_put(np.asarray(value, _DTYPES[key]), sharding)
    else:
      local = np.asarray(value, _DTYPES[key])
      global_shape = (global_rows(partitioner, local.shape[0]), local.shape[1])
      out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out


def _model(partitioner: Partitioner, remat: str | None):
  cfg = partitioner.config
  if remat is None or remat == cfg.remat:
    return partitioner.model
  return Qwen2ForCausalLM(cfg.replace(remat=remat), partitioner.layout)


def _micro_batches(batch: Batch, grad_accum: int) -> Batch:
  """[B, L] -> [A, B/A, L]: micro-batch j holds rows j, j + A, ... so each device's rows split evenly."""
  def split(x):
    rows = x.shape[0]
    return jnp.swapaxes(x.reshape(rows // grad_accum, grad_accum, *x.shape[1:]), 0, 1)
  return {k: split(batch[k]) for k in BATCH_KEYS}


def make_train_step(partitioner: Partitioner, optimizer: optax.GradientTransformation, *,
                    combine: Callable[[Any, Any], Any] | None = None, remat: str | None = None,
                    grad_accum: int = 1, clip_norm: float | None = None, trainable_axes=None,
                    trainable_shapes=None) -> StepFns:
  """The jitted steps for `partitioner`'s model; see the module docstring and the arguments:

  combine(trainable, frozen) -> the model's params (default: trainable is the whole tree).
  remat: None keeps partitioner.config.remat; "none" | "full" | "dots" overrides it.
  trainable_axes / trainable_shapes: the trainable tree's logical PartitionSpecs and shapes when it
    is not the model's param tree (LoRA); default the partitioner's.
  """
  combine = combine or (lambda trainable, frozen: trainable)
  model = _model(partitioner, remat)
  axes = partitioner.logical_specs if trainable_axes is None else trainable_axes
  shardings = state_shardings(partitioner, optimizer, trainable_axes, trainable_shapes=trainable_shapes)
  replicated = NamedSharding(partitioner.mesh, PartitionSpec())

  def loss_sums(trainable, frozen, batch):
    tokens = constrain(batch["tokens"], ax.TOKENS)
    logits = model.apply({"params": combine(trainable, frozen)}, tokens, batch["attention_mask"])
    return masked_cross_entropy(logits, tokens, batch["loss_mask"])

  def summed_grads(trainable, frozen, batch):
    grad_fn = jax.value_and_grad(lambda t, b: loss_sums(t, frozen, b), has_aux=True)
    if grad_accum == 1:
      (loss_sum, count), grads = grad_fn(trainable, batch)
      return grads, loss_sum, count

    def body(carry, micro):
      grads, loss_sum, count = carry
      (l, c), g = grad_fn(trainable, micro)
      grads = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), grads, g)
      return (grads, loss_sum + l, count + c), None

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    start = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, loss_sum, count), _ = jax.lax.scan(body, start, _micro_batches(batch, grad_accum))
    return grads, loss_sum, count

  def gradients(trainable, frozen, batch):
    """(metrics, the mean gradient tied through the head layout, unclipped); inside `bound()`."""
    grads, loss_sum, count = summed_grads(trainable, frozen, batch)
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denominator, grads)
    grads = tie_gradients(grads, axes, partitioner.layout)
    norm = canonical_norm(grads, axes, partitioner.layout)
    return {"loss": loss_sum / denominator, "tokens": count.astype(jnp.int32), "grad_norm": norm}, grads

  def train(state: TrainState, frozen, batch):
    with partitioner.bound():
      metrics, grads = gradients(state.trainable, frozen, batch)
      if clip_norm:
        norm = metrics["grad_norm"]
        factor = jnp.where(norm > clip_norm, clip_norm / jnp.maximum(norm, 1e-30), 1.0)
        grads = jax.tree_util.tree_map(lambda g: g * factor, grads)
      grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.trainable)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
      trainable = optax.apply_updates(state.trainable, updates)
    return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

  def bound_gradients(trainable, frozen, batch):
    with partitioner.bound():
      return gradients(trainable, frozen, batch)

  def evaluate(trainable, frozen, batch):
    with partitioner.bound():
      loss_sum, count = loss_sums(trainable, frozen, batch)
    return {"loss": loss_sum / jnp.maximum(count, 1.0), "loss_sum": loss_sum, "tokens": count.astype(jnp.int32)}

  train_jit = jax.jit(train, donate_argnums=(0,), out_shardings=(shardings, replicated))
  eval_jit = jax.jit(evaluate, out_shardings=replicated)
  grads_jit = jax.jit(bound_gradients, out_shardings=(replicated, shardings.trainable))

  def train_step(state: TrainState, frozen, batch: Batch):
    _check_rows(partitioner, batch, grad_accum)
    return train_jit(state, frozen, place_batch(partitioner, batch))

  def eval_step(trainable, frozen, batch: Batch):
    _check_rows(partitioner, batch, 1)
    return eval_jit(trainable, frozen, place_batch(partitioner, batch))

  def gradients_step(trainable, frozen, batch: Batch):
    _check_rows(partitioner, batch, grad_accum)
    return grads_jit(trainable, frozen, place_batch(partitioner, batch))

  return StepFns(train_step, eval_step, shardings, gradients_step)


def _check_rows(partitioner: Partitioner, batch: Batch, grad_accum: int) -> None:
  tokens = batch.get("tokens")
  if tokens is None or np.ndim(tokens) != 2:
    raise TrainingError(f"batch['tokens'] must be int32[B, L], got {None if tokens is None else np.shape(tokens)}.")
  rows = tokens.shape[0] if isinstance(tokens, jax.Array) else global_rows(partitioner, tokens.shape[0])
  check_batch_size(partitioner, rows, grad_accum)
  problems = validation.check_array(f"token batch {tuple(tokens.shape)}", (rows, tokens.shape[1]), ax.TOKENS,
                                    partitioner.table, partitioner.mesh_shape)
  validation.raise_if(problems, partitioner.table, partitioner.mesh_shape)
