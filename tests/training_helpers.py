"""Shared pieces of the fine-tuning tests: batches, HF params on a mesh, the torch loss and AdamW."""

import numpy as np
import torch

from conftest import mesh_of
from hf_reference import hf_tensors, model_config
from qwen_logical.checkpoints.hf_names import flax_from_hf, hf_from_flax
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import get_table


def random_batch(vocab, rows=8, length=12, seed=1):
  """Right-padded rows of different lengths; the loss on a random subset of the real next tokens."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, vocab, (rows, length)).astype(np.int32)
  lengths = rng.randint(length // 2, length + 1, rows)
  attention = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  loss_mask = (rng.rand(rows, length) < 0.6).astype(np.float32)
  loss_mask *= (np.arange(length)[None] < lengths[:, None] - 1)  # the next token must be real
  return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": attention}


def partitioner_for(hf, mesh="1x1", table="tensor_parallel", **overrides):
  cfg = model_config(hf, **overrides)
  part = Partitioner(cfg, mesh_of(mesh), get_table(table))
  return part, part.place(flax_from_hf(hf_tensors(hf), cfg, part.layout))


def canonical(part, tree) -> dict:
  """A layout-shaped tree (params or gradients) as HF-named numpy tensors."""
  return hf_from_flax(tree, part.config, part.layout)


def torch_loss(model, batch):
  """Mean cross-entropy over the trained next tokens, as the train step defines it."""
  tokens = torch.tensor(batch["tokens"], dtype=torch.long)
  mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  logits = model(tokens, attention_mask=mask, position_ids=positions).logits.float()
  logp = torch.log_softmax(logits[:, :-1], dim=-1)
  nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
  weights = torch.tensor(batch["loss_mask"][:, :-1])
  return (nll * weights).sum() / weights.sum()


def torch_grads(model, batch):
  model.zero_grad()
  loss = torch_loss(model, batch)
  loss.backward()
  tied = model.config.tie_word_embeddings
  grads = {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()
           if not (tied and n == "lm_head.weight")}
  return float(loss.detach()), grads


def relative_error(got, expected) -> float:
  return float(np.linalg.norm(np.asarray(got, np.float64) - expected) / max(np.linalg.norm(expected), 1e-30))
