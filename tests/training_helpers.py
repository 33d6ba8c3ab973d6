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


FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24


def float32_bound(sum_lengths: int) -> float:
  """Relative distance allowed between two float32 runs of one computation that sum in other orders.

  A float32 sum of n terms is within gamma_n = n*u / (1 - n*u) of the exact sum, relative to the sum
  of the terms' magnitudes (u = 2^-24; Higham, Accuracy and Stability of Numerical Algorithms, 3.1),
  and to first order the errors of a chain of dependent sums add, so each run is within gamma_N of
  the exact result with N the chain's summed lengths, and two runs within 2 gamma_N of each other.
  This is the worst case: no machine's summation order can exceed it (random-sign rounding errors
  keep the observed differences one to two orders below it).
  """
  nu = sum_lengths * FLOAT32_UNIT_ROUNDOFF
  return 2 * nu / (1 - nu)


def forward_sum_lengths(cfg, length: int) -> int:
  """The summed lengths of the float32 sums on the longest path from the inputs to the mean loss.

  Per layer: RMSNorm (hidden), the q/k/v products (hidden), the scores (head_dim), softmax and the
  weighted values (length each), o (heads x head_dim), RMSNorm, gate/up (hidden), down (mlp); then
  the final norm and the lm_head (hidden) and the softmax over the vocabulary.
  """
  per_layer = (4 * cfg.hidden_size + cfg.head_dim + 2 * length + cfg.num_heads * cfg.head_dim
               + cfg.intermediate_size)
  return cfg.num_layers * per_layer + 2 * cfg.hidden_size + cfg.vocab_size


def loss_tolerance(cfg, batch) -> float:
  """Relative tolerance on the mean loss: the forward chain plus the mean over the batch's tokens."""
  rows, length = batch["tokens"].shape
  return float32_bound(forward_sum_lengths(cfg, length) + rows * length)


def gradient_tolerance(cfg, batch) -> float:
  """Relative (Frobenius) tolerance on a weight gradient of one forward + backward over `batch`.

  The backward pass walks the forward chain again in reverse (each product's input gradient sums over
  its output dimension, the same lengths), and the weight gradient sums over every token.
  """
  rows, length = batch["tokens"].shape
  return float32_bound(2 * forward_sum_lengths(cfg, length) + 2 * rows * length)


def relative_error(got, expected) -> float:
  return float(np.linalg.norm(np.asarray(got, np.float64) - expected) / max(np.linalg.norm(expected), 1e-30))
