"""LoRA against a hand-written torch LoRA on the HF reference: loss and adapter gradients (float32, bf16 and
int8 bases, on the identity and the padded head layout); training keeps the base; the merged export loads
in transformers with the fine-tuned logits."""

import types

import jax
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec
from transformers import Qwen2ForCausalLM as HFQwen2

from conftest import mesh_of
from hf_reference import hf_tensors, model_config, real_looking_model, tiny_hf_model
from qwen_logical.checkpoints.export import export_checkpoint
from qwen_logical.checkpoints.hf_names import flax_from_hf, hf_from_flax
from qwen_logical.model.head_layout import KV, QUERY
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import get_table
from qwen_logical.training import lora
from qwen_logical.training.heads import tie_gradients
from qwen_logical.training.loss import masked_cross_entropy
from qwen_logical.training.optimizer import OptimizerSettings, make_optimizer
from qwen_logical.training.state import init_state
from qwen_logical.training.step import make_train_step

RANK, ALPHA = 4, 8.0
TRAIN = types.SimpleNamespace(lora_rank=RANK, lora_alpha=ALPHA, lora_targets="q,k,v,o,gate,up,down", seed=3)
HF_MODULES = {"q_kernel": "self_attn.q_proj", "k_kernel": "self_attn.k_proj", "v_kernel": "self_attn.v_proj",
              "o_kernel": "self_attn.o_proj", "gate_kernel": "mlp.gate_proj", "up_kernel": "mlp.up_proj",
              "down_kernel": "mlp.down_proj"}
STORAGE = {"float32": {}, "bfloat16": {"param_dtype": "bfloat16"}, "int8": {"quantization": "int8"}}


def make_batch(vocab, seed=0):
  rng = np.random.RandomState(seed)
  attention = (np.arange(12)[None] < rng.randint(8, 13, (8, 1))).astype(np.int32)
  tokens = rng.randint(0, vocab, (8, 12)).astype(np.int32) * attention
  return {"tokens": tokens, "attention_mask": attention,
          "loss_mask": (attention * (np.arange(12)[None] >= 3)).astype(np.float32)}


def build(hf, mesh, storage, b_std=0.05, table="tensor_parallel"):
  """(partitioner, base params, trainable with a non-zero B, frozen, combine, axes, shapes); fsdp runs
  scanned layers (stacked adapters), as the jobs pick on CPU."""
  config = model_config(hf, scan_layers=table == "fsdp", **STORAGE[storage])
  part = Partitioner(config, mesh_of(mesh), get_table(table))
  params = part.place(flax_from_hf(hf_tensors(hf), config, part.layout))
  _, frozen, combine, axes, shapes = lora.setup(part, params, TRAIN)
  trainable = lora.init_adapters(part, lora.adapter_table(part, RANK, tuple(HF_MODULES)), TRAIN.seed, b_std)
  return part, params, trainable, frozen, combine, axes, shapes


def canonical(value, names, layout):
  """A layout-shaped array with its head axes back in HF's heads (first copy, padding dropped)."""
  value = np.asarray(value)
  for dim, name in enumerate(names):
    if name in ("heads", "kv_heads"):
      value = layout.to_canonical(QUERY if name == "heads" else KV, value, dim)
  return value


def per_layer(tree, axes):
  """A scanned tree ({'layers': stacked [N, ...]}) and its axes as unrolled ones ({'layers_<i>': ...})."""
  if "layers" not in tree:
    return tree, axes
  is_spec = lambda x: isinstance(x, PartitionSpec)
  count = jax.tree_util.tree_leaves(tree["layers"])[0].shape[0]
  layer_axes = jax.tree_util.tree_map(lambda spec: PartitionSpec(*tuple(spec)[1:]), axes["layers"], is_leaf=is_spec)
  return ({f"layers_{i}": jax.tree_util.tree_map(lambda x: np.asarray(x)[i], tree["layers"]) for i in range(count)},
          {f"layers_{i}": layer_axes for i in range(count)})


def torch_lora(hf, base, trainable, axes, layout, batch):
  """(loss, {adapter path: gradient in canonical shape}) of a hand-written LoRA on the HF model whose
  weights are `base`'s (HF tensors): W + alpha/r * B @ A for every target linear layer."""
  hf.load_state_dict({k: torch.tensor(np.asarray(v, np.float32)) for k, v in base.items()}, strict=False)
  leaves, weights = {}, {}
  for layer, node in trainable.items():
    for group in node.values():
      for name in [k for k in group if k.endswith(lora.A_SUFFIX)]:
        kernel = name[:-len(lora.A_SUFFIX)]
        tensors = []
        for suffix, reshape in ((lora.A_SUFFIX, (RANK, -1)), (lora.B_SUFFIX, (-1, RANK))):
          path = (layer, "attention" if HF_MODULES[kernel].startswith("self_attn") else "mlp", kernel + suffix)
          names = tuple(axes[path[0]][path[1]][path[2]])
          value = canonical(group[kernel + suffix], names, layout)
          leaves[path] = (torch.tensor(value.reshape(reshape), requires_grad=True), value.shape)
          tensors.append(leaves[path][0])
        hf_name = f"model.layers.{layer.split('_')[1]}.{HF_MODULES[kernel]}.weight"
        weights[hf_name] = dict(hf.named_parameters())[hf_name].detach() + ALPHA / RANK * tensors[1] @ tensors[0]
  tokens = torch.tensor(batch["tokens"], dtype=torch.long)
  mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
  logits = torch.func.functional_call(hf, weights, (tokens,), {
      "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}).logits.float()
  targets = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
  loss_mask = torch.tensor(batch["loss_mask"]).clone()
  loss_mask[:, -1] = 0
  nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
  loss = (nll * loss_mask.reshape(-1)).sum() / loss_mask.sum()
  loss.backward()
  return float(loss.detach()), {path: t.grad.numpy().reshape(shape) for path, (t, shape) in leaves.items()}


def ours(part, trainable, frozen, combine, axes, batch):
  def loss(t, b):
    with part.bound():
      logits = part.model.apply({"params": combine(t, frozen)}, b["tokens"], b["attention_mask"])
      total, count = masked_cross_entropy(logits, b["tokens"], b["loss_mask"])
    return total / count

  value, grads = jax.jit(jax.value_and_grad(loss))(trainable, batch)
  return float(value), tie_gradients(grads, axes, part.layout)


@pytest.mark.parametrize("model,mesh,table,storage", [
    ("tiny", "1x1", "tensor_parallel", "float32"), ("real_looking", "1x8", "tensor_parallel", "float32"),
    ("real_looking", "1x8", "tensor_parallel", "bfloat16"), ("real_looking", "1x8", "tensor_parallel", "int8"),
    ("real_looking", "2x4", "fsdp", "float32")])
def test_loss_and_adapter_gradients_match_a_torch_lora(model, mesh, table, storage):
  hf = tiny_hf_model() if model == "tiny" else real_looking_model()
  part, params, trainable, frozen, combine, axes, _ = build(hf, mesh, storage, table=table)
  batch = make_batch(part.config.vocab_size)
  loss, grads = ours(part, trainable, frozen, combine, axes, batch)
  grads, _ = per_layer(grads, axes)
  trainable, axes = per_layer(trainable, axes)
  # The torch model runs on the base exactly as stored (bf16 rounded, int8 dequantised), in float32.
  ref_loss, ref_grads = torch_lora(hf, hf_from_flax(params, part.config, part.layout), trainable, axes,
                                   part.layout, batch)
  assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)
  flat = {tuple(k.key for k in p): g for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  assert set(flat) == set(ref_grads) and len(flat) == 2 * 7 * part.config.num_layers
  for path, ref in ref_grads.items():
    got = canonical(flat[path], tuple(axes[path[0]][path[1]][path[2]]), part.layout)
    assert np.abs(ref).max() > 0, path  # B non-zero: A's gradients are real too
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), path


def _steps(part, trainable, frozen, combine, axes, shapes, count=3):
  optimizer = make_optimizer(OptimizerSettings(learning_rate=1e-2, warmup_steps=0, steps=count, clip_norm=1.0))
  fns = make_train_step(part, optimizer, combine=combine, trainable_axes=axes, trainable_shapes=shapes,
                        clip_norm=1.0)
  state, losses = init_state(part, optimizer, trainable, axes), []
  for _ in range(count):  # one batch again and again: its loss must fall
    state, metrics = fns.train_step(state, frozen, make_batch(part.config.vocab_size))
    losses.append(float(metrics["loss"]))
  return state, losses


@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_training_adapters_keeps_the_base(storage):
  part, params, _, frozen, combine, axes, shapes = build(real_looking_model(), "1x8", storage)
  trainable, *_ = lora.setup(part, params, TRAIN)  # B zero: the model starts as the base
  before = jax.device_get(params)
  state, losses = _steps(part, trainable, frozen, combine, axes, shapes)
  assert losses[-1] < losses[0]
  for (path, now), then in zip(jax.tree_util.tree_leaves_with_path(frozen["base"]), jax.tree_util.tree_leaves(before)):
    np.testing.assert_array_equal(np.asarray(now), then, err_msg=str(path))  # stored dtype, bit for bit
  combined = jax.jit(lora.combine)(state.trainable, frozen)
  assert combined["embed_tokens"]["embedding"].dtype == params["embed_tokens"]["embedding"].dtype
  assert combined["layers_0"]["attention"]["q_kernel"].dtype == np.float32
  if storage == "int8":
    np.testing.assert_array_equal(np.asarray(combined["layers_0"]["mlp"]["up_kernel_scale"]), 1.0)


def test_merged_export_loads_in_transformers(tmp_path):
  part, params, _, frozen, combine, axes, shapes = build(real_looking_model(), "1x8", "float32")
  trainable, *_ = lora.setup(part, params, TRAIN)
  state, losses = _steps(part, trainable, frozen, combine, axes, shapes)
  assert losses[-1] < losses[0]
  merged = lora.merge(part, state.trainable, frozen)
  export_checkpoint(merged, part, str(tmp_path), progress=False)
  exported = HFQwen2.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  tokens = make_batch(part.config.vocab_size, 7)["tokens"]
  with torch.no_grad():
    theirs = exported(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  tuned = np.asarray(part.forward(merged, tokens))
  base = np.asarray(part.forward(params, tokens))
  assert np.abs(tuned - base).max() > 1e-2  # the adapters changed the model
  assert np.abs(theirs - tuned).max() <= 1e-4 * np.abs(tuned).max()
