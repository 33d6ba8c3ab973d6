"""Fine-tuning numerics against PyTorch: the loss and every gradient equal torch autograd on HF's
Qwen2ForCausalLM (float32), one AdamW step equals torch.optim.AdamW, remat changes nothing."""

import jax
import numpy as np
import optax
import pytest
import torch

from hf_reference import real_looking_model, tiny_hf_model
from training_helpers import (canonical, gradient_tolerance, loss_tolerance, partitioner_for, random_batch,
                              relative_error, torch_grads)
from qwen_logical.model.model import Qwen2ForCausalLM
from qwen_logical.training.optimizer import OptimizerSettings, decays, learning_rate_schedule, make_optimizer
from qwen_logical.training.state import init_state
from qwen_logical.training.step import make_train_step



@pytest.mark.parametrize("make_model,scan", [(tiny_hf_model, False), (real_looking_model, True)])
def test_loss_and_every_gradient_equal_torch_autograd(make_model, scan):
  hf = make_model()
  part, params = partitioner_for(hf, scan_layers=scan)
  batch = random_batch(part.config.vocab_size)
  expected_loss, expected = torch_grads(hf, batch)
  metrics, grads = make_train_step(part, optax.sgd(1.0)).gradients(params, None, batch)
  got = canonical(part, grads)
  # torch and XLA sum in other orders: within the worst-case float32 bound of the computation's sums.
  tolerance = gradient_tolerance(part.config, batch)
  assert abs(float(metrics["loss"]) - expected_loss) <= loss_tolerance(part.config, batch) * abs(expected_loss)
  assert int(metrics["tokens"]) == int(batch["loss_mask"][:, :-1].sum())
  assert sorted(got) == sorted(expected)
  for name in expected:
    assert np.abs(expected[name]).max() > 0, name
    assert relative_error(got[name], expected[name]) <= tolerance, name
  norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in expected.values()))
  assert abs(float(metrics["grad_norm"]) - norm) <= tolerance * norm


def test_adamw_steps_equal_torch_adamw():
  """Decoupled weight decay times the learning rate on both sides (optax's mask = torch's param groups).

  Each step gives torch the gradient the train step applies (its parity with autograd is the test
  above): Adam divides by |g|, so the gradients' last-digit differences would move the tiny ones."""
  hf = tiny_hf_model()
  part, params = partitioner_for(hf)
  batch = random_batch(part.config.vocab_size)
  settings = OptimizerSettings(learning_rate=1e-2, warmup_steps=1, steps=10, weight_decay=0.1, clip_norm=0.0,
                               b1=0.8, b2=0.95, eps=1e-6)
  schedule = learning_rate_schedule(settings)
  optimizer = make_optimizer(settings)
  fns = make_train_step(part, optimizer)
  state = init_state(part, optimizer, params)
  named = dict(hf.named_parameters())
  no_decay = lambda name: name.endswith("bias") or name.endswith("norm.weight")  # optimizer.decays' choice
  decayed = [p for n, p in named.items() if not no_decay(n)]
  plain = [p for n, p in named.items() if no_decay(n)]
  torch_opt = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
                                lr=1.0, betas=(0.8, 0.95), eps=1e-6)
  for step in range(3):
    _, grads = fns.gradients(state.trainable, None, batch)
    state, _ = fns.train_step(state, None, batch)
    before = {n: p.detach().numpy().copy() for n, p in named.items()}
    for name, grad in canonical(part, grads).items():
      named[name].grad = torch.tensor(grad)
    for group in torch_opt.param_groups:
      group["lr"] = float(schedule(step))
    torch_opt.step()
    got = canonical(part, state.trainable)
    for name, p in named.items():
      moved = p.detach().numpy() - before[name]
      if step:  # step 0 runs at learning rate 0 (warmup)
        assert np.abs(moved).max() > 1e-3, name
      np.testing.assert_allclose(got[name], p.detach().numpy(), rtol=0, atol=1e-6, err_msg=name)
      assert relative_error(got[name] - before[name], moved) <= 1e-5 or not step, name
  assert float(schedule(1)) == pytest.approx(1e-2) and float(schedule(0)) == 0.0
  key = jax.tree_util.DictKey
  assert decays((key("layers_0"), key("attention"), key("q_kernel"))) and decays((key("embed_tokens"), key("embedding")))
  assert not decays((key("layers_0"), key("attention"), key("q_bias"))) and not decays((key("final_norm"), key("scale")))


@pytest.mark.parametrize("scan,remat", [(False, "full"), (True, "dots")])
def test_remat_gives_identical_loss_and_gradients(scan, remat):
  """Recomputing the layers (or all but their weight products) in the backward pass changes no number
  beyond float32 rounding."""
  hf = real_looking_model()
  part, params = partitioner_for(hf, scan_layers=scan)
  batch = random_batch(part.config.vocab_size)
  base_metrics, base = make_train_step(part, optax.sgd(1.0)).gradients(params, None, batch)
  metrics, grads = make_train_step(part, optax.sgd(1.0), remat=remat).gradients(params, None, batch)
  assert float(metrics["loss"]) == pytest.approx(float(base_metrics["loss"]), rel=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(base)):
    assert relative_error(a, np.asarray(b)) <= 1e-5  # the same products, fused differently
  # ... and the layers are rematerialised: a checkpoint per layer in the program (one when scanned).
  def count(policy):
    model = Qwen2ForCausalLM(part.config.replace(remat=policy), part.layout)
    text = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, batch["tokens"]))(params))
    return text.count("checkpoint[") + text.count("remat")
  assert count("none") == 0 and count(remat) == (1 if scan else part.config.num_layers)
