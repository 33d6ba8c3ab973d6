"""Tiny random HF Qwen2ForCausalLM models (torch, float32): the reference implementation.

`tiny_hf_model` draws every weight at one scale (logit std ~1); `real_looking_model` scales them so
the logits look like a real checkpoint's (std >= 3, maxima >= 25): test with both.
"""

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from qwen_logical.model.hf_config import from_hf_config


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


# Weight scales that give logits like a real checkpoint's (std >= 3, maxima >= 25: tied embeddings
# make each token's own logit stand out), with attention peaked (large q/k) and the layers adding
# about as much to the residual stream as the embedding (small o/down projections).
SCALES = {"embed_tokens": 0.3, "q_proj": 0.3, "k_proj": 0.3, "o_proj": 0.02, "down_proj": 0.02}
OTHER_SCALE = 0.1  # v, gate, up and the biases


def real_looking_model(seed=0):
  """A random HF Qwen2 (the 0.5B head shape: 14 query / 2 KV heads) whose logits look real."""
  model = tiny_hf_model(heads=14, kv_heads=2, hidden=112, vocab=256, tied=True, seed=seed)
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not name.endswith("norm.weight"):
        scale = next((s for part, s in SCALES.items() if part in name), OTHER_SCALE)
        p.copy_(scale * torch.randn(p.shape, generator=generator))
  return model


def varied_text_model(seed=0):
  """real_looking_model with an untied head at the scale of a real one (logit std ~10, maxima ~30): its
  greedy text varies, where the tied one's repeats the last token."""
  model = real_looking_model(seed=seed)
  model.config.tie_word_embeddings = False
  head = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(seed + 1))
  model.lm_head.weight = torch.nn.Parameter(head)
  return model


def copying_model(seed=0, pull=6.0):
  """varied_text_model whose head also favours one successor per token (`walk`): its greedy text mostly
  follows that walk and sometimes leaves it, so a prompt holding a stretch of the walk is partly copied."""
  model = varied_text_model(seed=seed)
  walk = walk_successors(model.config.vocab_size, seed)
  with torch.no_grad():
    embedding = model.model.embed_tokens.weight
    unit = embedding / embedding.norm(dim=1, keepdim=True)
    predecessor = torch.argsort(torch.as_tensor(walk))  # predecessor[v]: the token whose successor is v
    model.lm_head.weight.add_(pull * np.sqrt(model.config.hidden_size) * unit[predecessor])
  return model


def walk_successors(vocab: int, seed=0) -> np.ndarray:
  """int[V]: the token `copying_model` favours after each token (a random permutation)."""
  return np.random.RandomState(seed + 7).permutation(vocab)
