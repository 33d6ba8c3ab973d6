"""Tiny random HF Qwen3 and Qwen3-MoE models (torch, float32) whose logits look like a real checkpoint's
(std >= 3, maxima >= 25), saved as HF directories: the reference for the Qwen3 families."""

import atexit
import functools
import os
import shutil
import tempfile

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

FAMILIES = ("qwen3", "qwen3_moe")
# Attention peaked by the query/key norms' weights (~2.5: the norms fix each head's scale), the layers
# adding about as much to the residual stream as the embedding, a head at a real one's scale, and a
# decisive router (logit std ~2.4).
SCALES = {"embed_tokens": 0.3, "o_proj": 0.02, "down_proj": 0.02, "lm_head": 1.0, "mlp.gate.weight": 0.3,
          "experts.down_proj": 0.02}
OTHER_SCALE = 0.1
_SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4, head_dim=16, max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-6,
              tie_word_embeddings=False)


def _scaled(model, seed: int):
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if name.endswith(("q_norm.weight", "k_norm.weight")):
        p.copy_(2.5 + 0.2 * noise)
      elif name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(next((s for part, s in SCALES.items() if part in name), OTHER_SCALE) * noise)
  return model.eval()


def hf_model(family: str, seed: int = 0, **changes):
  """A real-looking tiny Qwen3 (8 query / 4 KV heads of head_dim 16 over hidden 64) or Qwen3-MoE (8 experts,
  2 per token, normalised weights)."""
  sizes = {**_SIZES, **changes}
  if family == "qwen3_moe":
    experts = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                   router_aux_loss_coef=0.01)
    config = Qwen3MoeConfig(**{**experts, **sizes})
    model_class = Qwen3MoeForCausalLM
  elif family == "qwen3":
    config, model_class = Qwen3Config(**sizes), Qwen3ForCausalLM
  else:
    config, model_class = Qwen2Config(**{k: v for k, v in sizes.items() if k != "head_dim"}), Qwen2ForCausalLM
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  return _scaled(model_class(config), seed)


@functools.lru_cache(maxsize=None)
def checkpoint(family: str) -> tuple[str, object]:
  """(an HF directory written by save_pretrained, the model) for `family`, once per run."""
  model = hf_model(family)
  root = tempfile.mkdtemp(prefix=f"qwen_logical_{family}_")
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  directory = os.path.join(root, "model")
  model.save_pretrained(directory)
  return directory, model


def hf_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def hf_greedy(model, prompts, new_tokens: int) -> list[list[int]]:
  """transformers' greedy tokens for each prompt alone."""
  out = []
  for prompt in prompts:
    with torch.no_grad():
      ids = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)
    out.append(ids[0, len(prompt):].tolist())
  return out


def checkpoint_tensors(model) -> dict:
  """The state dict as numpy under a checkpoint's names: Qwen3-MoE's fused in-memory expert tensors split per
  expert, as save_pretrained writes them."""
  tensors, f = {}, getattr(model.config, "moe_intermediate_size", 0)
  for name, value in model.state_dict().items():
    value = value.detach().numpy().copy()
    if name.endswith("experts.gate_up_proj"):
      for x in range(value.shape[0]):
        tensors[name.replace("gate_up_proj", f"{x}.gate_proj.weight")] = value[x, :f]
        tensors[name.replace("gate_up_proj", f"{x}.up_proj.weight")] = value[x, f:]
    elif name.endswith("experts.down_proj"):
      for x in range(value.shape[0]):
        tensors[name.replace("down_proj", f"{x}.down_proj.weight")] = value[x]
    else:
      tensors[name] = value
  return tensors
