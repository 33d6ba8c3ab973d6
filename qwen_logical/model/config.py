"""ModelConfig: the architecture of one Qwen decoder (Qwen2 / Qwen2.5, Qwen3, Qwen3-MoE) and its presets.

HF config.json in and out: `hf_config`."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np

from qwen_logical.common.errors import QwenLogicalError
from qwen_logical.model.quantization import QUANTIZATIONS

# The dtypes a model can hold its parameters and compute in, by name.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
SUPPORTED_DTYPES = tuple(DTYPES)
REMAT_POLICIES = ("none", "full", "dots")
KV_CACHE_DTYPES = ("", "float32", "bfloat16", "int8")
# The model families, by HF model_type: what differs is data in the config (q/k/v biases, query/key
# norms, routed experts), not a copy of the model.
MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe")


class ConfigError(QwenLogicalError):
  """A model configuration that qwen_logical cannot run as asked."""


def as_dtype(name_or_dtype: Any, what: str = "dtype") -> np.dtype:
  """The np.dtype of a supported name ('bfloat16') or dtype-like (np.float32, jnp.bfloat16).

  ConfigError naming `what` and the supported names otherwise.
  """
  if isinstance(name_or_dtype, str):
    dtype = DTYPES.get(name_or_dtype.lower())
  else:
    try:
      dtype = np.dtype(name_or_dtype)
    except TypeError:
      dtype = None
  if dtype is None or dtype not in DTYPES.values():
    raise ConfigError(f"{what}={name_or_dtype!r} is not supported; use one of {SUPPORTED_DTYPES}.")
  return dtype


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a Qwen2ForCausalLM.

  Sizes follow HF naming where it exists: `num_heads` is `num_attention_heads`,
  `num_layers` is `num_hidden_layers`. `head_dim` is `hidden_size // num_heads`
  unless the checkpoint states it (Qwen3 does: 128 for every size).

  Families (`model_type`): "qwen2" has q/k/v biases; "qwen3" has none and normalises each query
  and key head (RMSNorm over head_dim) before RoPE; "qwen3_moe" is qwen3 whose every MLP is
  `num_experts` routed experts of `moe_intermediate_size`, `num_experts_per_tok` per token.
  `rope_scaling` is `rope.parse_rope_scaling`'s frozen items (() for plain RoPE; YaRN otherwise).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 32768
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  model_type: str = "qwen2"
  attention_bias: bool = True  # q/k/v projection biases (Qwen2); Qwen3 has none
  qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3)
  num_experts: int = 0  # > 0: every MLP is a routed mixture of experts (Qwen3-MoE)
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = True  # the chosen experts' weights renormalised to sum to 1
  router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss in fine-tuning
  rope_scaling: tuple = ()
  name: str = "custom"
  # Numerics and structure, not architecture. The dtypes accept names or dtypes and hold np.dtype.
  param_dtype: np.dtype = DTYPES["float32"]
  dtype: np.dtype = DTYPES["float32"]  # compute dtype of activations and matmuls
  # "" stores kernels in param_dtype; "int8": weight-only int8 kernels with float32 scales per output
  # channel (model.quantization). Not part of the HF config.
  quantization: str = ""
  # How the KV cache stores keys and values: "" in the compute dtype, "float32", "bfloat16", or "int8"
  # (one bfloat16 scale per token and KV head; `inference.kv_cache`). Not part of the HF config.
  kv_cache_dtype: str = ""
  scan_layers: bool = False  # unrolled: the fast form on XLA:CPU; jobs pick per platform
  # Rematerialisation of each decoder layer in FORWARD calls (training): "none" keeps every
  # activation for the backward pass, "full" recomputes the layer, "dots" keeps the weight products only.
  remat: str = "none"

  def __post_init__(self):
    for field in ("param_dtype", "dtype"):
      object.__setattr__(self, field, as_dtype(getattr(self, field), f"ModelConfig.{field}"))
    self.validate()

  def validate(self) -> None:
    """Raises ConfigError naming the field and the fix when the config cannot run."""
    positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings")
    for field in positive:
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"ModelConfig.{field} must be a positive integer, got {value!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"ModelConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads="
          f"{self.num_kv_heads}; grouped-query attention needs whole groups.")
    if self.model_type not in MODEL_TYPES:
      raise ConfigError(f"ModelConfig.model_type={self.model_type!r} is not supported; use one of {MODEL_TYPES}.")
    self._validate_family()
    if self.head_dim % 2:
      raise ConfigError(f"ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings.")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"ModelConfig.remat={self.remat!r} is not supported; use one of {REMAT_POLICIES}.")
    if self.kv_cache_dtype not in KV_CACHE_DTYPES:
      raise ConfigError(f"ModelConfig.kv_cache_dtype={self.kv_cache_dtype!r} is not supported; use one of "
                        f"{KV_CACHE_DTYPES} ('' stores the cache in the compute dtype).")
    if self.quantization not in QUANTIZATIONS:
      raise ConfigError(f"ModelConfig.quantization={self.quantization!r} is not supported; use one of "
                        f"{QUANTIZATIONS} ('' keeps weights in param_dtype).")

  def _validate_family(self) -> None:
    qwen3 = self.model_type != "qwen2"
    if self.qk_norm != qwen3 or self.attention_bias == qwen3:
      raise ConfigError(
          f"ModelConfig.model_type={self.model_type!r} has qk_norm={qwen3} and attention_bias={not qwen3}; got "
          f"qk_norm={self.qk_norm}, attention_bias={self.attention_bias}. Set model_type to the family you mean.")
    moe = self.model_type == "qwen3_moe"
    if moe != (self.num_experts > 0):
      raise ConfigError(f"ModelConfig.num_experts={self.num_experts}: model_type {self.model_type!r} "
                        + ("needs num_experts > 0." if moe else "has no experts; use model_type 'qwen3_moe'."))
    if moe and not 0 < self.num_experts_per_tok <= self.num_experts:
      raise ConfigError(f"ModelConfig.num_experts_per_tok={self.num_experts_per_tok} must be in "
                        f"[1, num_experts={self.num_experts}].")
    if moe and (not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0):
      raise ConfigError(f"ModelConfig.moe_intermediate_size must be a positive integer, got "
                        f"{self.moe_intermediate_size!r}.")

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @property
  def num_parameters(self) -> int:
    """Parameters of the HF model (no head padding or KV repetition)."""
    e, i, d = self.hidden_size, self.intermediate_size, self.head_dim
    q, kv = self.num_heads * d, self.num_kv_heads * d
    attention = 2 * e * q + 2 * e * kv + (q + 2 * kv if self.attention_bias else 0) + (2 * d if self.qk_norm else 0)
    mlp = self.num_experts * (3 * e * self.moe_intermediate_size + e) if self.is_moe else 3 * e * i
    layer = attention + mlp + 2 * e
    head = 0 if self.tie_word_embeddings else self.vocab_size * e
    return self.vocab_size * e + self.num_layers * layer + e + head

  @property
  def active_parameters(self) -> int:
    """Parameters one token runs through: a mixture's unchosen experts left out (the 6N of training FLOPs)."""
    unchosen = self.num_experts - self.num_experts_per_tok
    return self.num_parameters - self.num_layers * unchosen * 3 * self.hidden_size * self.moe_intermediate_size


def _preset(name, vocab, hidden, inter, layers, heads, kv, tied, eps, **family) -> ModelConfig:
  return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                     num_layers=layers, num_heads=heads, num_kv_heads=kv,
                     head_dim=family.pop("head_dim", hidden // heads), tie_word_embeddings=tied,
                     rms_norm_eps=eps, name=name, **family)


# Qwen3: head_dim 128 at every size, no q/k/v biases, query/key norms, 40,960 positions.
_QWEN3 = dict(model_type="qwen3", attention_bias=False, qk_norm=True, head_dim=128, max_position_embeddings=40960)


def _moe(experts, per_token, inter) -> dict:
  return dict(_QWEN3, model_type="qwen3_moe", num_experts=experts, num_experts_per_tok=per_token,
              moe_intermediate_size=inter)


PRESETS: dict[str, ModelConfig] = {
    c.name: c for c in (
        _preset("qwen2.5-0.5b", 151936, 896, 4864, 24, 14, 2, True, 1e-6),
        _preset("qwen2.5-1.5b", 151936, 1536, 8960, 28, 12, 2, True, 1e-6),
        _preset("qwen2.5-3b", 151936, 2048, 11008, 36, 16, 2, True, 1e-6),
        _preset("qwen2.5-7b", 152064, 3584, 18944, 28, 28, 4, False, 1e-6),
        _preset("qwen2.5-14b", 152064, 5120, 13824, 48, 40, 8, False, 1e-5),
        _preset("qwen2.5-32b", 152064, 5120, 27648, 64, 40, 8, False, 1e-5),
        _preset("qwen2.5-72b", 152064, 8192, 29568, 80, 64, 8, False, 1e-5),
        _preset("qwen3-0.6b", 151936, 1024, 3072, 28, 16, 8, True, 1e-6, **_QWEN3),
        _preset("qwen3-1.7b", 151936, 2048, 6144, 28, 16, 8, True, 1e-6, **_QWEN3),
        _preset("qwen3-4b", 151936, 2560, 9728, 36, 32, 8, True, 1e-6, **_QWEN3),
        _preset("qwen3-8b", 151936, 4096, 12288, 36, 32, 8, False, 1e-6, **_QWEN3),
        _preset("qwen3-14b", 151936, 5120, 17408, 40, 40, 8, False, 1e-6, **_QWEN3),
        _preset("qwen3-32b", 151936, 5120, 25600, 64, 64, 8, False, 1e-6, **_QWEN3),
        _preset("qwen3-30b-a3b", 151936, 2048, 6144, 48, 32, 4, False, 1e-6, **_moe(128, 8, 768)),
        _preset("qwen3-235b-a22b", 151936, 4096, 12288, 94, 64, 4, False, 1e-6, **_moe(128, 8, 1536)),
        # Tiny, for tests: the 0.5B head shape (14 query / 2 KV heads), so it needs
        # the head layout plan on 4- and 8-way tensor parallelism.
        _preset("tiny", 256, 112, 224, 2, 14, 2, False, 1e-6),
        # Tiny Qwen3 and Qwen3-MoE: head_dim (16) is not hidden / heads (8), as in Qwen3.
        _preset("tiny-qwen3", 256, 64, 128, 2, 8, 4, False, 1e-6, **dict(_QWEN3, head_dim=16)),
        _preset("tiny-qwen3-moe", 256, 64, 128, 2, 8, 4, False, 1e-6, **dict(_moe(8, 2, 32), head_dim=16)),
    )
}


def preset(name: str) -> ModelConfig:
  """The named preset; ConfigError listing the known names otherwise."""
  key = name.lower()
  if key not in PRESETS:
    raise ConfigError(f"Unknown model preset {name!r}; known presets: {', '.join(PRESETS)}.")
  return PRESETS[key]
