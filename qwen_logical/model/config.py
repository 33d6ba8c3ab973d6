"""ModelConfig: the architecture of one Qwen2 / Qwen2.5 decoder, its presets, and HF config.json parsing."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

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
  unless the checkpoint states it.
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

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @property
  def num_parameters(self) -> int:
    """Parameters of the HF model (no head padding or KV repetition)."""
    e, i, d = self.hidden_size, self.intermediate_size, self.head_dim
    q, kv = self.num_heads * d, self.num_kv_heads * d
    attention = e * q + q + 2 * (e * kv + kv) + q * e
    layer = attention + 3 * e * i + 2 * e
    head = 0 if self.tie_word_embeddings else self.vocab_size * e
    return self.vocab_size * e + self.num_layers * layer + e + head


def _preset(name, vocab, hidden, inter, layers, heads, kv, tied, eps) -> ModelConfig:
  return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                     num_layers=layers, num_heads=heads, num_kv_heads=kv,
                     head_dim=hidden // heads, tie_word_embeddings=tied,
                     rms_norm_eps=eps, name=name)


PRESETS: dict[str, ModelConfig] = {
    c.name: c for c in (
        _preset("qwen2.5-0.5b", 151936, 896, 4864, 24, 14, 2, True, 1e-6),
        _preset("qwen2.5-1.5b", 151936, 1536, 8960, 28, 12, 2, True, 1e-6),
        _preset("qwen2.5-3b", 151936, 2048, 11008, 36, 16, 2, True, 1e-6),
        _preset("qwen2.5-7b", 152064, 3584, 18944, 28, 28, 4, False, 1e-6),
        _preset("qwen2.5-14b", 152064, 5120, 13824, 48, 40, 8, False, 1e-5),
        _preset("qwen2.5-32b", 152064, 5120, 27648, 64, 40, 8, False, 1e-5),
        _preset("qwen2.5-72b", 152064, 8192, 29568, 80, 64, 8, False, 1e-5),
        # Tiny, for tests: the 0.5B head shape (14 query / 2 KV heads), so it needs
        # the head layout plan on 4- and 8-way tensor parallelism.
        _preset("tiny", 256, 112, 224, 2, 14, 2, False, 1e-6),
    )
}


def preset(name: str) -> ModelConfig:
  """The named preset; ConfigError listing the known names otherwise."""
  key = name.lower()
  if key not in PRESETS:
    raise ConfigError(f"Unknown model preset {name!r}; known presets: {', '.join(PRESETS)}.")
  return PRESETS[key]


def _load_json(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> tuple[dict, str]:
  if isinstance(path_or_dict, Mapping):
    return dict(path_or_dict), "the given dict"
  path = os.fspath(path_or_dict)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"No config.json at {path}; point to a Hugging Face Qwen2 model directory.")
  with open(path) as f:
    try:
      return json.load(f), path
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} is not valid JSON: {e}") from e


def from_hf_config(path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig from an HF `config.json` (a path, its directory, or the parsed dict).

  Rejects configs that are not Qwen2 or that use features this model does not
  implement (sliding-window attention, rope scaling, another activation).
  """
  hf, where = _load_json(path_or_dict)
  model_type = hf.get("model_type")
  architectures = hf.get("architectures") or []
  if model_type != "qwen2" and "Qwen2ForCausalLM" not in architectures:
    raise ConfigError(
        f"{where} describes model_type={model_type!r} (architectures={architectures}); "
        "qwen_logical runs Qwen2 / Qwen2.5 (model_type 'qwen2', Qwen2ForCausalLM) only.")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (Qwen2 uses 'silu').")
  if hf.get("use_sliding_window", False):
    raise ConfigError(f"{where}: use_sliding_window=true is not supported; set it to false "
                      "(Qwen2.5 checkpoints ship it disabled).")
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling")
  rope_type = rope.get("rope_type", "default") if rope else (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
  if rope_type not in ("default", None):
    raise ConfigError(f"{where}: rope scaling {rope_type!r} is not supported; remove rope_scaling "
                      "to run with the default rotary embedding.")
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads") if k not in hf]
  if missing:
    raise ConfigError(f"{where} lacks required field(s) {missing}.")
  heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_position_embeddings=hf.get("max_position_embeddings", 32768),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      initializer_range=float(hf.get("initializer_range", 0.02)),
      name=hf.get("_name_or_path") or "hf",
  )
  fields.update(overrides)
  return ModelConfig(**fields)


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
  """The HF `config.json` dict for `config` (what transformers' Qwen2Config reads)."""
  return {
      "architectures": ["Qwen2ForCausalLM"],
      "model_type": "qwen2",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "tie_word_embeddings": config.tie_word_embeddings,
      "initializer_range": config.initializer_range,
      "use_sliding_window": False,
      "attention_dropout": 0.0,
      "torch_dtype": config.param_dtype.name,
  }
