"""The same fine-tuning on every mesh and rule table: the 1x1 loss and gradients, the same parameters
after three steps, and optimizer moments sharded exactly like their parameters."""

import functools

import jax
import numpy as np
import pytest

from hf_reference import real_looking_model
from training_helpers import (canonical, gradient_tolerance, loss_tolerance, partitioner_for, random_batch,
                              relative_error)
from qwen_logical.sharding.tree_paths import path_keys
from qwen_logical.training.optimizer import OptimizerSettings, make_optimizer
from qwen_logical.training.state import init_state
from qwen_logical.training.step import make_train_step

STEPS = 3
# Every table and every mesh at least once; the 0.5B head shape (14 / 2 heads) pads and repeats heads
# on 1x8 and 2x4 tensor parallelism. Scanned layers where the table gathers weights, as jobs pick.
COMBINATIONS = [("1x8", "tensor_parallel", False), ("2x4", "tp_fsdp", True), ("4x2", "fsdp", True),
                ("8x1", "data_parallel", False)]
SETTINGS = OptimizerSettings(learning_rate=1e-3, warmup_steps=1, steps=STEPS, weight_decay=0.01, clip_norm=0.5,
                             grad_accum=2)


def _run(mesh, table, scan):
  """(loss, canonical gradient, canonical params after STEPS steps, partitioner, state) of one combination."""
  hf = real_looking_model()
  part, params = partitioner_for(hf, mesh, table, scan_layers=scan)
  batch = random_batch(part.config.vocab_size, rows=16)
  optimizer = make_optimizer(SETTINGS)
  fns = make_train_step(part, optimizer, grad_accum=SETTINGS.grad_accum, clip_norm=SETTINGS.clip_norm)
  metrics, grads = fns.gradients(params, None, batch)
  state = init_state(part, optimizer, params)
  for _ in range(STEPS):
    state, step_metrics = fns.train_step(state, None, batch)
  assert float(step_metrics["grad_norm"]) > SETTINGS.clip_norm  # clipping is exercised
  return float(metrics["loss"]), canonical(part, grads), canonical(part, state.trainable), part, state, batch


@functools.lru_cache(maxsize=1)
def _single_device():
  return _run("1x1", "tensor_parallel", False)[:3]


@pytest.mark.parametrize("mesh,table,scan", COMBINATIONS)
def test_every_mesh_and_table_trains_like_one_device(mesh, table, scan):
  loss, grads, params, part, state, batch = _run(mesh, table, scan)
  expected_loss, expected_grads, expected_params = _single_device()
  # Both runs are float32 with sums (all-reduces, sharded products) in other orders: within the
  # worst-case float32 bound of the computation's sums (training_helpers.float32_bound).
  # Accumulating micro-batches sums each token once, as one batch does.
  assert abs(loss - expected_loss) <= loss_tolerance(part.config, batch) * abs(expected_loss)
  tolerance = gradient_tolerance(part.config, batch)
  initial = canonical_initial()
  for name in expected_grads:
    assert relative_error(grads[name], expected_grads[name]) <= tolerance, f"gradient of {name}"
    # The same parameters after the steps. Adam divides each gradient element by its own magnitude, so an
    # element whose gradient is near its float32 error may move either way, by up to the learning rate
    # per step, in either run: the parameters agree to 1e-4 and the updates to 1% as norms. An element
    # whose gradient is 100x its difference between the two runs has a relative error under 1%, so
    # Adam's ratio m / sqrt(v) (at most 1 per step) moves by under 2%: each such element is within 5% of
    # the most the steps can move it.
    assert relative_error(params[name], expected_params[name]) <= 1e-4, f"parameter {name}"
    moved = expected_params[name] - initial[name]
    assert relative_error(params[name] - initial[name], moved) <= 1e-2, f"update of {name}"
    g = np.asarray(expected_grads[name], np.float64)
    settled = np.abs(g) >= 100 * np.abs(np.asarray(grads[name], np.float64) - g)
    assert settled.mean() > 0.5 or np.abs(g).max() == 0, name  # most elements
    deviation = np.abs(params[name] - expected_params[name])[settled]
    assert deviation.max(initial=0) <= 0.05 * SETTINGS.learning_rate * STEPS, name
  _check_moments_sharded_like_params(part, state)


@functools.lru_cache(maxsize=1)
def canonical_initial():
  hf = real_looking_model()
  return {k: v.detach().numpy().copy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}


def _check_moments_sharded_like_params(part, state):
  """Each Adam moment has its parameter's sharding and per-device bytes; nothing else is an array."""
  params = {path_keys(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(state.trainable)}
  moments = 0
  split = False
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
    if leaf.ndim == 0:
      continue
    keys = path_keys(path)
    param = next(params[keys[i:]] for i in range(len(keys)) if keys[i:] in params)
    assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), keys
    per_device = leaf.addressable_shards[0].data.nbytes
    assert per_device == param.addressable_shards[0].data.nbytes, keys
    split |= per_device < leaf.nbytes
    moments += 1
  assert moments == 2 * len(params)  # mu and nu
  assert split or part.table.name == "data_parallel"
