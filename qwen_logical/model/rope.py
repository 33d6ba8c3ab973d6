"""Rotary position embeddings: the default RoPE and YaRN, numerically as transformers computes them.

`parse_rope_scaling` reads an HF config.json's rope settings (the old `rope_scaling` dict or the
transformers-5 `rope_parameters` dict) into frozen, hashable items: () for the default rotary embedding,
else every YaRN parameter resolved to the value transformers would use. `rope_frequencies` turns them into
inv_freq and the attention factor that scales cos/sin (transformers' ROPE_INIT_FUNCTIONS), and
`rotary_embedding` applies the half-split rotation (Qwen2/Qwen3 `apply_rotary_pos_emb`).

This module must not import model.config (config imports it): its errors are `RopeError`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qwen_logical.common.errors import QwenLogicalError

ROPE_TYPES = ("default", "yarn")
DEFAULT_MAX_POSITION_EMBEDDINGS = 32768  # Qwen2Config / Qwen3Config's default


class RopeError(QwenLogicalError):
  """Rope settings that qwen_logical cannot run (another scaling type, a missing or bad YaRN field)."""


def _number(value: Any, where: str, key: str, *, positive: bool = False) -> float | int:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise RopeError(f"{where}: rope scaling field {key}={value!r} must be a number.")
  if positive and value <= 0:
    raise RopeError(f"{where}: rope scaling field {key}={value!r} must be > 0.")
  return value


def _rope_type(params: Mapping) -> str:
  """transformers: `rope_type`, else the legacy `type`, else 'default'."""
  return params.get("rope_type") or params.get("type") or "default"


def _resolve_yarn(params: Mapping, max_position_embeddings: int, where: str) -> dict[str, Any]:
  """Every YaRN key with the value transformers 5 uses (its standardize/validate/_compute_yarn_parameters).

  `original_max_position_embeddings` absent: max_position_embeddings. `factor` absent: error (transformers'
  KeyError); null: max_position_embeddings / original. beta_fast / beta_slow: `or 32` / `or 1`. truncate:
  absent True, else its truthiness (null: no truncation). mscale, mscale_all_dim, attention_factor: kept
  when set (attention_factor None is derived from factor and the mscales in rope_frequencies).
  """
  if params.get("partial_rotary_factor") not in (None, 1, 1.0):
    raise RopeError(f"{where}: partial_rotary_factor={params['partial_rotary_factor']!r} is not supported with "
                    "YaRN (qwen_logical rotates the whole head); remove it.")
  if "factor" not in params:
    raise RopeError(f"{where}: rope scaling 'yarn' lacks the field 'factor' (the context extension ratio, "
                    "e.g. 4.0 for 32768 -> 131072 tokens); add it.")
  original = params.get("original_max_position_embeddings")
  original = max_position_embeddings if original is None else original
  original = _number(original, where, "original_max_position_embeddings", positive=True)
  factor = params["factor"]
  factor = float(max_position_embeddings / original if factor is None else _number(factor, where, "factor"))
  if factor < 1.0:
    raise RopeError(f"{where}: rope scaling field factor={factor!r} must be >= 1 (YaRN extends the context).")
  out = {"rope_type": "yarn", "factor": factor,
         "original_max_position_embeddings": int(original) if float(original).is_integer() else float(original),
         "beta_fast": float(_number(params.get("beta_fast") or 32, where, "beta_fast")),
         "beta_slow": float(_number(params.get("beta_slow") or 1, where, "beta_slow")),
         "truncate": bool(params.get("truncate", True))}
  for key in ("mscale", "mscale_all_dim", "attention_factor"):
    if params.get(key) is not None:
      out[key] = float(_number(params[key], where, key, positive=key == "attention_factor"))
  return out


def parse_rope_scaling(hf: Mapping, where: str) -> tuple[tuple[str, Any], ...]:
  """The rope scaling of HF config.json dict `hf` as sorted (key, value) items; () for the default RoPE.

  Reads `rope_scaling` (old: {"type" | "rope_type", "factor", ...} beside a top-level rope_theta) or, when
  that is empty, `rope_parameters` (transformers 5), as transformers does. The items are the YaRN keys
  (rope_type, factor, original_max_position_embeddings, beta_fast, beta_slow, truncate; mscale,
  mscale_all_dim, attention_factor when set), not rope_theta (ModelConfig.rope_theta). A top-level
  `original_max_position_embeddings` overrides the dict's (transformers' Phi3 rule). The items, as a dict,
  are a valid transformers `rope_scaling`. RopeError naming `where` for any type but default / yarn and for
  a missing or bad YaRN field.
  """
  params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  source = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  if not isinstance(params, Mapping):
    raise RopeError(f"{where}: {source}={params!r} must be a JSON object.")
  if any(isinstance(value, Mapping) for value in params.values()):
    raise RopeError(f"{where}: per-layer-type {source} ({sorted(params)}) is not supported; give one rope dict.")
  rope_type = _rope_type(params)
  if rope_type not in ROPE_TYPES:
    raise RopeError(f"{where}: rope scaling type {rope_type!r} (in {source}) is not supported (supported: "
                    f"{', '.join(ROPE_TYPES)}); remove rope_scaling to run the default rotary embedding.")
  if rope_type == "default":
    return ()
  params = dict(params)
  if hf.get("original_max_position_embeddings") is not None:
    params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
  if hf.get("partial_rotary_factor") is not None:
    params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
  max_positions = hf.get("max_position_embeddings") or DEFAULT_MAX_POSITION_EMBEDDINGS
  return tuple(sorted(_resolve_yarn(params, max_positions, where).items()))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature (paper eq. 21): 0.1 * mscale * ln(scale) + 1, 1 for scale <= 1."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(rotations: float, dim: int, base: float, max_positions: float) -> float:
  """The rotary dimension whose wavelength turns `rotations` times over `max_positions` tokens."""
  return (dim * math.log(max_positions / (rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_frequencies(head_dim: int, theta: float, scaling: tuple,
                     max_position_embeddings: int) -> tuple[np.ndarray, float]:
  """(inv_freq f32[head_dim / 2], attention_factor) for `scaling` (parse_rope_scaling's items; () default).

  As transformers' ROPE_INIT_FUNCTIONS, in its float32 operation order: theta ** (arange(0, D, 2) / D) is
  rounded from float64 (transformers' float32 pow is within 1 ulp of it), every later step is float32 as
  there. Default: (1 / theta ** (2i / D), 1.0). YaRN: per frequency a blend of 1 / pos (extrapolation) and
  1 / (factor * pos) (interpolation) by a linear ramp over the correction range [low, high] given by
  beta_fast / beta_slow rotations over original_max_position_embeddings (floored / ceiled when truncate);
  attention factor: explicit attention_factor, else mscale(factor, mscale) / mscale(factor, mscale_all_dim)
  when both are set, else mscale(factor).
  """
  params = dict(scaling)
  rope_type = _rope_type(params)
  if rope_type not in ROPE_TYPES:
    raise RopeError(f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)}).")
  if head_dim <= 0 or head_dim % 2:
    raise RopeError(f"rotary embedding needs an even head_dim > 0, got {head_dim}.")
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  pos_freqs = (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
  one = np.float32(1.0)
  if rope_type == "default":
    return one / pos_freqs, 1.0
  p = _resolve_yarn(params, max_position_embeddings, "rope scaling")
  factor = p["factor"]
  if p.get("attention_factor") is not None:
    attention_factor = p["attention_factor"]
  elif p.get("mscale") and p.get("mscale_all_dim"):
    attention_factor = float(_yarn_mscale(factor, p["mscale"]) / _yarn_mscale(factor, p["mscale_all_dim"]))
  else:
    attention_factor = _yarn_mscale(factor)
  original = p["original_max_position_embeddings"]
  low = _correction_dim(p["beta_fast"], head_dim, theta, original)
  high = _correction_dim(p["beta_slow"], head_dim, theta, original)
  if p["truncate"]:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp
  ramp = (np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
  extrapolation_weight = one - np.clip(ramp, 0, 1).astype(np.float32)
  extrapolation = one / pos_freqs
  interpolation = one / (np.float32(factor) * pos_freqs)
  inv_freq = interpolation * (one - extrapolation_weight) + extrapolation * extrapolation_weight
  return inv_freq.astype(np.float32), attention_factor


def rotary_embedding(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray,
                     attention_factor: float) -> jax.Array:
  """x [B, L, N, D] rotated at positions int[B, L] by inv_freq f32[D / 2] -> [B, L, N, D] in x.dtype.

  As transformers' Qwen2/Qwen3 rotary embedding: angles = positions * inv_freq in float32, duplicated to D;
  cos / sin times attention_factor in float32 (skipped at 1.0), cast to x.dtype; x * cos + rotate_half(x) * sin.
  """
  dim = x.shape[-1]
  assert inv_freq.shape == (dim // 2,), (inv_freq.shape, x.shape)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, L, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if attention_factor != 1.0:
    cos, sin = cos * jnp.float32(attention_factor), sin * jnp.float32(attention_factor)
  cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
  first, second = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return x * cos + rotated * sin
