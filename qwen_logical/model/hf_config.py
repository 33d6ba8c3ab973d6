"""HF `config.json` <-> ModelConfig for the families qwen_logical runs: Qwen2 / Qwen2.5, Qwen3, Qwen3-MoE.

Everything a config asks that the model does not implement is a ConfigError naming the field and the fix
(sliding-window attention, another activation, a rope scaling other than YaRN, MoE layers that are not
all sparse), never a silent approximation.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from qwen_logical.model import rope
from qwen_logical.model.config import MODEL_TYPES, ConfigError, ModelConfig

# model_type -> the HF architecture class that writes it.
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
assert set(ARCHITECTURES) == set(MODEL_TYPES)
# What transformers' config classes assume for a key config.json leaves out (a null head_dim or KV head count
# means hidden_size // heads and one KV head per query head, as there).
_MISSING = {"qwen2": {"num_key_value_heads": 32},
            "qwen3": {"num_key_value_heads": 32, "head_dim": 128},
            "qwen3_moe": {"num_key_value_heads": 4, "intermediate_size": 6144, "num_experts": 128,
                          "num_experts_per_tok": 8, "moe_intermediate_size": 768}}


def _load_json(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> tuple[dict, str]:
  if isinstance(path_or_dict, Mapping):
    return dict(path_or_dict), "the given dict"
  path = os.fspath(path_or_dict)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"No config.json at {path}; point to a Hugging Face Qwen2 / Qwen3 model directory.")
  with open(path) as f:
    try:
      return json.load(f), path
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} is not valid JSON: {e}") from e


def _model_type(hf: dict, where: str) -> str:
  model_type = hf.get("model_type")
  architectures = hf.get("architectures") or []
  if model_type in ARCHITECTURES:
    return model_type
  known = [t for t, arch in ARCHITECTURES.items() if arch in architectures]
  if model_type is None and known:
    return known[0]
  supported = ", ".join(f"'{t}' ({a})" for t, a in ARCHITECTURES.items())
  raise ConfigError(f"{where} describes model_type={model_type!r} (architectures={architectures}); "
                    f"qwen_logical runs {supported}.")


def _moe_fields(hf: dict, where: str) -> dict[str, Any]:
  """Qwen3-MoE's expert settings; every layer must be sparse (as in every released checkpoint)."""
  step, dense = hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
  if step != 1 or dense:
    raise ConfigError(f"{where}: decoder_sparse_step={step} / mlp_only_layers={dense} mix dense and expert "
                      "layers, which is not supported; "
                      "qwen_logical runs Qwen3-MoE with experts in every layer (step 1, no mlp_only_layers).")
  experts = hf.get("num_local_experts", hf.get("num_experts"))  # a saved config names it num_local_experts
  missing = [k for k, v in (("num_experts", experts), ("num_experts_per_tok", hf.get("num_experts_per_tok")),
                            ("moe_intermediate_size", hf.get("moe_intermediate_size"))) if v is None]
  if missing:
    raise ConfigError(f"{where}: Qwen3-MoE field(s) {missing} are null; give their values.")
  return dict(num_experts=experts, num_experts_per_tok=hf["num_experts_per_tok"],
              moe_intermediate_size=hf["moe_intermediate_size"],
              norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
              router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))


def _rope_scaling(hf: dict, where: str) -> tuple:
  try:
    return rope.parse_rope_scaling(hf, where)
  except rope.RopeError as e:
    raise ConfigError(str(e)) from e


def from_hf_config(path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig from an HF `config.json` (a path, its directory, or the parsed dict)."""
  hf, where = _load_json(path_or_dict)
  model_type = _model_type(hf, where)
  if hf.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (Qwen uses 'silu').")
  if hf.get("use_sliding_window", False):
    raise ConfigError(f"{where}: use_sliding_window=true is not supported; set it to false "
                      "(Qwen2.5 and Qwen3 checkpoints ship it disabled).")
  qwen3 = model_type != "qwen2"
  if qwen3 and hf.get("attention_bias", False):
    raise ConfigError(f"{where}: attention_bias=true is not supported for {model_type} (released Qwen3 "
                      "checkpoints have no attention biases); set it to false.")
  hf = {**_MISSING[model_type], **hf}
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads") if k not in hf]
  if missing:
    raise ConfigError(f"{where} lacks required field(s) {missing}.")
  heads = hf["num_attention_heads"]
  rope_parameters = hf.get("rope_parameters") or {}
  fields = dict(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rope_theta=float(rope_parameters.get("rope_theta", hf.get("rope_theta", 10000.0))),
      rope_scaling=_rope_scaling(hf, where),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_position_embeddings=hf.get("max_position_embeddings", 32768),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      initializer_range=float(hf.get("initializer_range", 0.02)),
      model_type=model_type,
      attention_bias=not qwen3,
      qk_norm=qwen3,
      name=hf.get("_name_or_path") or "hf",
  )
  if model_type == "qwen3_moe":
    fields.update(_moe_fields(hf, where))
  fields.update(overrides)
  return ModelConfig(**fields)


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
  """The HF `config.json` dict for `config` (what transformers' Qwen2Config / Qwen3Config / Qwen3MoeConfig
  reads)."""
  hf = {
      "architectures": [ARCHITECTURES[config.model_type]],
      "model_type": config.model_type,
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
  if config.rope_scaling:
    hf["rope_scaling"] = dict(config.rope_scaling)
  if config.model_type != "qwen2":
    hf["attention_bias"] = False
  if config.is_moe:
    hf.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
              moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
              router_aux_loss_coef=config.router_aux_loss_coef, decoder_sparse_step=1, mlp_only_layers=[])
  return hf
