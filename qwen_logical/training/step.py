"""The compiled train and eval steps, bound to one Partitioner (mesh and rule table).

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

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qwen_logical.model import axes as ax
from qwen_logical.model.layers import constrain
from qwen_logical.model.model import Qwen2ForCausalLM
from qwen_logical.model.moe import ROUTER_LOGITS
from qwen_logical.sharding import programs
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.tree_paths import path_keys
from qwen_logical.training.heads import canonical_norm, tie_gradients
from qwen_logical.training.loss import load_balancing_loss, masked_cross_entropy
from qwen_logical.training.placement import (BATCH_KEYS, Batch, check_batch_size, check_rows,  # noqa: F401 (re-exported)
                                             data_shard, place_batch)
from qwen_logical.training.state import TrainState, state_axes, state_shardings


class StepFns(NamedTuple):
  """train_step(state, frozen, batch) -> (state, metrics); eval_step(trainable, frozen, batch) -> metrics;
  shardings: the TrainState of NamedSharding the train step keeps; gradients: what train_step would
  apply before clipping (for tests and benchmarks)."""

  train_step: Callable[..., tuple[TrainState, dict]]
  eval_step: Callable[..., dict]
  shardings: TrainState
  gradients: Callable[..., tuple[dict, Any]]  # (trainable, frozen, batch) -> (metrics, tied mean gradient)


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


def _combine_whole(trainable, frozen):
  del frozen
  return trainable


@dataclasses.dataclass(frozen=True)
class _Program:
  """The traced bodies of the steps (programs of the partitioner: its rules bound inside)."""

  partitioner: Partitioner
  model: Qwen2ForCausalLM
  optimizer: optax.GradientTransformation
  combine: Callable[[Any, Any], Any]
  axes: Any  # logical PartitionSpecs of the trainable tree
  grad_accum: int
  clip_norm: float | None

  def loss_sums(self, trainable, frozen, batch, router_loss: bool = True):
    """(summed token loss, trained-token count). With `router_loss` a mixture of experts adds
    router_aux_loss_coef times its load-balancing loss per trained token, so the mean is transformers'
    training loss with output_router_logits (loss + coef * aux); evaluation reports the cross-entropy alone."""
    tokens = constrain(batch["tokens"], ax.TOKENS)
    params = {"params": self.combine(trainable, frozen)}
    cfg = self.model.config
    if not (router_loss and cfg.is_moe and cfg.router_aux_loss_coef):
      logits = self.model.apply(params, tokens, batch["attention_mask"])
      return masked_cross_entropy(logits, tokens, batch["loss_mask"])
    logits, sown = self.model.apply(params, tokens, batch["attention_mask"], mutable=["intermediates"])
    loss_sum, count = masked_cross_entropy(logits, tokens, batch["loss_mask"])
    router = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(sown["intermediates"])
              if ROUTER_LOGITS in path_keys(path)]
    aux = load_balancing_loss(router, cfg.num_experts_per_tok, batch["attention_mask"])
    return loss_sum + cfg.router_aux_loss_coef * aux * count, count

  def summed_grads(self, trainable, frozen, batch):
    """(gradient of the summed loss, loss sum, trained-token count), over grad_accum micro-batches."""
    grad_fn = jax.value_and_grad(lambda t, b: self.loss_sums(t, frozen, b), has_aux=True)
    if self.grad_accum == 1:
      (loss_sum, count), grads = grad_fn(trainable, batch)
      return grads, loss_sum, count

    def body(carry, micro):
      grads, loss_sum, count = carry
      (micro_loss, micro_count), micro_grads = grad_fn(trainable, micro)
      grads = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), grads, micro_grads)
      return (grads, loss_sum + micro_loss, count + micro_count), None

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    start = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, loss_sum, count), _ = jax.lax.scan(body, start, _micro_batches(batch, self.grad_accum))
    return grads, loss_sum, count

  def reduced(self, trainable, frozen, batch):
    """(metrics, the summed gradient tied through the head layout, 1 / trained-token count).

    The gradient stays a sum: the train step folds the mean's 1/count and the clipping factor into
    one scalar that the optimizer's elementwise passes multiply in, rather than writing a divided
    copy of every gradient (XLA does not duplicate a division into several consumers)."""
    grads, loss_sum, count = self.summed_grads(trainable, frozen, batch)
    inverse = 1.0 / jnp.maximum(count, 1.0)
    layout = self.partitioner.layout
    grads = tie_gradients(grads, self.axes, layout)  # linear: tying the sum ties the mean
    norm = canonical_norm(grads, self.axes, layout) * inverse
    return {"loss": loss_sum * inverse, "tokens": count.astype(jnp.int32), "grad_norm": norm}, grads, inverse

  def gradients(self, trainable, frozen, batch):
    """(metrics, the mean gradient tied through the head layout, unclipped)."""
    metrics, grads, inverse = self.reduced(trainable, frozen, batch)
    return metrics, jax.tree_util.tree_map(lambda g: g * inverse, grads)

  def train(self, state: TrainState, frozen, batch):
    metrics, grads, scale = self.reduced(state.trainable, frozen, batch)
    if self.clip_norm:
      norm = metrics["grad_norm"]
      scale = scale * jnp.where(norm > self.clip_norm, self.clip_norm / jnp.maximum(norm, 1e-30), 1.0)
    grads = jax.tree_util.tree_map(lambda g, p: (g * scale).astype(p.dtype), grads, state.trainable)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

  def evaluate(self, trainable, frozen, batch):
    loss_sum, count = self.loss_sums(trainable, frozen, batch, router_loss=False)
    return {"loss": loss_sum / jnp.maximum(count, 1.0), "loss_sum": loss_sum, "tokens": count.astype(jnp.int32)}


def make_train_step(partitioner: Partitioner, optimizer: optax.GradientTransformation, *,
                    combine: Callable[[Any, Any], Any] | None = None, remat: str | None = None,
                    grad_accum: int = 1, clip_norm: float | None = None, trainable_axes=None,
                    trainable_shapes=None) -> StepFns:
  """The compiled steps for `partitioner`'s model; see the module docstring and the arguments:

  combine(trainable, frozen) -> the model's params (default: trainable is the whole tree).
  remat: None keeps partitioner.config.remat; "none" | "full" | "dots" overrides it.
  grad_accum: micro-batches per step; clip_norm: None or 0 = no clipping.
  trainable_axes / trainable_shapes: the trainable tree's logical PartitionSpecs and shapes when it
    is not the model's param tree (LoRA); default the partitioner's.
  """
  axes = partitioner.logical_specs if trainable_axes is None else trainable_axes
  body = _Program(partitioner, _model(partitioner, remat), optimizer, combine or _combine_whole, axes,
                  grad_accum, clip_norm)
  shardings = state_shardings(partitioner, optimizer, trainable_axes, trainable_shapes=trainable_shapes)
  state = state_axes(partitioner, optimizer, trainable_axes, trainable_shapes=trainable_shapes)
  rep = programs.REPLICATED
  train = partitioner.program(body.train, out_axes=(state, rep), donate=(0,), name="train_step")
  evaluate = partitioner.program(body.evaluate, out_axes=rep, name="eval_step")
  gradients = partitioner.program(body.gradients, out_axes=(rep, state.trainable), name="gradients")

  def placed(program, accum):
    def call(first, frozen, batch: Batch):
      check_rows(partitioner, batch, accum)
      return program(first, frozen, place_batch(partitioner, batch))
    return call

  return StepFns(placed(train, grad_accum), placed(evaluate, 1), shardings, placed(gradients, grad_accum))
