"""Tiny random HF Qwen2ForCausalLM models (torch, float32): the reference implementation."""

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from qwen_logical.model.config import from_hf_config


def tiny_hf_model(heads=4, kv_heads=2, tied=False, hidden=32, layers=2, vocab=160, seed=0):
  """A random HF model whose every weight (biases and norms too) is non-trivial."""
  torch.manual_seed(seed)
  config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       tie_word_embeddings=tied, max_position_embeddings=128, rope_theta=1e6,
                       rms_norm_eps=1e-6, attn_implementation="eager")
  model = Qwen2ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model


def hf_tensors(model) -> dict:
  """The state dict as numpy, without `lm_head.weight` when tied (as save_pretrained writes it)."""
  tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    tensors.pop("lm_head.weight", None)
  return tensors


def model_config(model, **overrides):
  return from_hf_config(model.config.to_dict(), **overrides)


def hf_logits(model, tokens, attention_mask=None) -> np.ndarray:
  tokens = torch.tensor(np.asarray(tokens), dtype=torch.long)
  kwargs = {}
  if attention_mask is not None:
    mask = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
    kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
  with torch.no_grad():
    return model(tokens, **kwargs).logits.float().numpy()
