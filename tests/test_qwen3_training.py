"""Fine-tuning Qwen3-MoE: the loss with the router's load-balancing term and every gradient equal torch autograd on
transformers' Qwen3MoeForCausalLM (float32) under expert parallelism; LoRA adapts each expert and learns."""

import types

import jax
import numpy as np
import optax
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from conftest import mesh_of
from qwen3_reference import checkpoint_tensors, hf_model
from training_helpers import canonical, forward_sum_lengths, float32_bound, random_batch, relative_error, torch_loss
from qwen_logical.checkpoints.hf_names import flax_from_hf
from qwen_logical.model.hf_config import from_hf_config
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import get_table
from qwen_logical.training import lora
from qwen_logical.training.optimizer import OptimizerSettings, make_optimizer
from qwen_logical.training.state import init_state
from qwen_logical.training.step import make_train_step


def partitioner_for(hf, mesh, table, **overrides):
  cfg = from_hf_config(hf.config.to_dict(), **overrides)
  part = Partitioner(cfg, mesh_of(mesh), get_table(table))
  return part, part.place(flax_from_hf(checkpoint_tensors(hf), cfg, part.layout))


def _torch_loss_and_grads(model, batch):
  """transformers' training loss (cross-entropy + coef * aux, padding masked) and its gradients by HF tensor
  name, the fused expert tensors split per expert as checkpoints store them."""
  model.zero_grad()
  mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  out = model(torch.tensor(batch["tokens"], dtype=torch.long), attention_mask=mask, position_ids=positions,
              output_router_logits=True)
  cfg = model.config
  aux = load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, mask)
  loss = torch_loss(model, batch) + cfg.router_aux_loss_coef * aux
  loss.backward()
  grads, f = {}, cfg.moe_intermediate_size
  for name, p in model.named_parameters():
    grad = p.grad.detach().numpy().copy()
    if name.endswith("experts.gate_up_proj"):
      for x in range(cfg.num_experts):
        grads[name.replace("gate_up_proj", f"{x}.gate_proj.weight")] = grad[x, :f]
        grads[name.replace("gate_up_proj", f"{x}.up_proj.weight")] = grad[x, f:]
    elif name.endswith("experts.down_proj"):
      for x in range(cfg.num_experts):
        grads[name.replace("down_proj", f"{x}.down_proj.weight")] = grad[x]
    else:
      grads[name] = grad
  return float(loss.detach()), float(aux.detach()), grads


def _tolerances(cfg, batch):
  """float32 bounds as training_helpers', the MoE's longer chain added: the router's product (hidden) and
  softmax (experts), the k experts' sum, and the load-balancing loss's means over every layer's tokens."""
  rows, length = batch["tokens"].shape
  moe = cfg.num_layers * (cfg.hidden_size + cfg.num_experts + cfg.num_experts_per_tok) + cfg.num_layers * rows * length
  forward = forward_sum_lengths(cfg, length) + moe
  return float32_bound(forward + rows * length), float32_bound(2 * forward + 2 * rows * length)


def test_loss_with_the_load_balancing_term_and_every_gradient_equal_torch_autograd():
  hf = hf_model("qwen3_moe")
  part, params = partitioner_for(hf, mesh="2x4", table="expert_parallel", scan_layers=True)
  batch = random_batch(part.config.vocab_size)
  expected_loss, aux, expected = _torch_loss_and_grads(hf, batch)
  assert aux > 1.0 and part.config.router_aux_loss_coef == 0.01  # the term really weighs in
  fns = make_train_step(part, optax.sgd(1.0))
  metrics, grads = fns.gradients(params, None, batch)
  loss_tolerance, gradient_tolerance = _tolerances(part.config, batch)
  assert abs(float(metrics["loss"]) - expected_loss) <= loss_tolerance * abs(expected_loss)
  cross_entropy = expected_loss - part.config.router_aux_loss_coef * aux  # evaluation reports it alone
  assert abs(float(fns.eval_step(params, None, batch)["loss"]) - cross_entropy) <= loss_tolerance * cross_entropy
  got = canonical(part, grads)
  assert sorted(got) == sorted(expected)
  for name in expected:
    assert np.abs(expected[name]).max() > 0, name
    assert relative_error(got[name], expected[name]) <= gradient_tolerance, name


def test_lora_adapts_every_expert_and_learns_on_an_int8_base():
  """An adapter pair per expert, split like its expert; three steps on one batch lower its loss, the base intact."""
  hf = hf_model("qwen3_moe")
  part, params = partitioner_for(hf, mesh="2x4", table="expert_parallel", quantization="int8")
  train = types.SimpleNamespace(lora_rank=4, lora_alpha=8.0, lora_targets="q,gate,up,down", seed=3)
  trainable, frozen, combine, axes, shapes = lora.setup(part, params, train)
  table = lora.adapter_table(part, 4, ("gate_kernel", "down_kernel"))
  cfg = part.config
  assert table[("layers_0", "mlp", "gate_kernel_lora_a")] == ((cfg.num_experts, 4, cfg.hidden_size),
                                                              ("expert", "lora_rank", "embed"))
  assert table[("layers_0", "mlp", "down_kernel_lora_b")] == ((cfg.num_experts, cfg.hidden_size, 4),
                                                              ("expert", "embed", "lora_rank"))
  a = trainable["layers_0"]["mlp"]["gate_kernel_lora_a"]
  assert {shard.data.shape[0] for shard in a.addressable_shards} == {cfg.num_experts // 8}
  optimizer = make_optimizer(OptimizerSettings(learning_rate=3e-2, warmup_steps=0, steps=3, clip_norm=1.0))
  fns = make_train_step(part, optimizer, combine=combine, trainable_axes=axes, trainable_shapes=shapes, clip_norm=1.0)
  state, losses = init_state(part, optimizer, trainable, axes), []
  before = jax.device_get(params)
  batch = random_batch(cfg.vocab_size, seed=3)
  for _ in range(3):
    state, metrics = fns.train_step(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0], losses
  for now, then in zip(jax.tree_util.tree_leaves(frozen["base"]), jax.tree_util.tree_leaves(before)):
    np.testing.assert_array_equal(np.asarray(now), then)


def test_the_cpu_blocked_product_equals_ragged_dot_values_and_gradients():
  """grouped_swiglu's two methods (blocks on XLA:CPU, ragged_dot on accelerators) on uneven groups, an empty
  one and rows in no group, with int8 weights: the same values and the same gradients."""
  import jax.numpy as jnp
  from qwen_logical.model import quantization as quant
  from qwen_logical.model.moe import block_rows, grouped_swiglu
  rng = np.random.RandomState(0)
  experts, hidden, embed = 5, 12, 16
  sizes = jnp.asarray([7, 0, 19, 1, 9], jnp.int32)  # 36 rows in groups, 4 in none
  rows = jnp.asarray(rng.randn(40, embed), jnp.float32)
  gate, up = (jnp.asarray(rng.randn(experts, hidden, embed) * 0.3, jnp.float32) for _ in range(2))
  down = jnp.asarray(rng.randn(experts, embed, hidden) * 0.3, jnp.float32)
  int8 = [(quant.quantize(k, s, (-1,), jnp), s) for k in (gate, up, down) for s in [quant.scales_of(k, (-1,), jnp)]]
  assert block_rows(40, experts) == 8 and block_rows(4096, 16) == 128
  for kernels in ([(k, None) for k in (gate, up, down)], int8):
    def total(rows, gate_weights, method):
      kernels_now = [(gate_weights, kernels[0][1])] + kernels[1:]
      out = grouped_swiglu(rows, sizes, *kernels_now, jnp.float32, method)[:36]
      return jnp.sum(jnp.sin(out)), out
    results = {}
    for method in ("blocks", "ragged"):
      weights = kernels[0][0].astype(jnp.float32)
      (value, out), grads = jax.jit(jax.value_and_grad(lambda r, g: total(r, g.astype(kernels[0][0].dtype), method),
                                                       argnums=(0, 1), has_aux=True))(rows, weights)
      results[method] = (np.asarray(out), [np.asarray(g) for g in grads])
    (out_b, grads_b), (out_r, grads_r) = results["blocks"], results["ragged"]
    assert np.abs(out_r).max() > 0.1
    np.testing.assert_allclose(out_b, out_r, atol=1e-5, rtol=0)
    np.testing.assert_allclose(grads_b[0][:36], grads_r[0][:36], atol=1e-5, rtol=0)
    if kernels[0][1] is None:  # int8 weights take no gradient
      np.testing.assert_allclose(grads_b[1], grads_r[1], atol=1e-5, rtol=0)
