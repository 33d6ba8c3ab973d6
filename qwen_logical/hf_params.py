"""The HF name map: HF Qwen2ForCausalLM tensors <-> Flax parameters in the head layout.

One table (`tensor_specs`) says, for every HF tensor, which Flax parameter it
becomes, the HF shape, and how it is transposed/reshaped and laid out by the
head plan. Conversions in both directions read that table and nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from qwen_logical.config import ModelConfig
from qwen_logical.head_plan import HeadLayout, plan_heads


class CheckpointError(ValueError):
  """A tensor that is missing, unexpected or misshaped for the model config."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor: its name and shape, its Flax path, and the two conversions."""

  hf_name: str
  hf_shape: tuple[int, ...]
  flax_path: tuple[str, ...]
  to_flax: Callable[[np.ndarray], np.ndarray]
  from_flax: Callable[[np.ndarray], np.ndarray]
  layer: int | None = None  # decoder layer index, None for global tensors


# torch Linear weight (out, in) <-> kernel (in, out).
_TRANSPOSE = (lambda w: w.T, lambda k: k.T)


def _heads_in(layout: HeadLayout, kind: str, heads: int, head_dim: int):
  """(heads*head_dim, embed) weight <-> (embed, layout heads, head_dim) kernel."""
  def to(w):
    return layout.to_layout(w.T.reshape(w.shape[1], heads, head_dim), axis=1, kind=kind)
  def back(k):
    k = layout.from_layout(k, axis=1, kind=kind)
    return k.reshape(k.shape[0], heads * head_dim).T
  return to, back


def _heads_bias(layout: HeadLayout, kind: str, heads: int, head_dim: int):
  def to(b):
    return layout.to_layout(b.reshape(heads, head_dim), axis=0, kind=kind)
  def back(b):
    return layout.from_layout(b, axis=0, kind=kind).reshape(heads * head_dim)
  return to, back


def _heads_out(layout: HeadLayout, heads: int, head_dim: int):
  """o_proj (embed, heads*head_dim) <-> (layout heads, head_dim, embed)."""
  def to(w):
    return layout.to_layout(w.T.reshape(heads, head_dim, w.shape[0]), axis=0, kind="query")
  def back(k):
    k = layout.from_layout(k, axis=0, kind="query")
    return k.reshape(heads * head_dim, k.shape[-1]).T
  return to, back


_IDENTITY = (lambda x: x, lambda x: x)


def tensor_specs(config: ModelConfig, layout: HeadLayout | None = None) -> list[TensorSpec]:
  """Every HF tensor of `config`, in checkpoint order, with its Flax target."""
  layout = layout or plan_heads(config.num_heads, config.num_kv_heads, 1)
  e, i, d = config.hidden_size, config.intermediate_size, config.head_dim
  h, k, v = config.num_heads, config.num_kv_heads, config.vocab_size
  specs = [TensorSpec("model.embed_tokens.weight", (v, e), ("embed_tokens", "embedding"), *_IDENTITY)]
  for n in range(config.num_layers):
    pre = f"model.layers.{n}."
    layer = [
        ("self_attn.q_proj.weight", (h * d, e), ("attention", "q_kernel"), _heads_in(layout, "query", h, d)),
        ("self_attn.q_proj.bias", (h * d,), ("attention", "q_bias"), _heads_bias(layout, "query", h, d)),
        ("self_attn.k_proj.weight", (k * d, e), ("attention", "k_kernel"), _heads_in(layout, "kv", k, d)),
        ("self_attn.k_proj.bias", (k * d,), ("attention", "k_bias"), _heads_bias(layout, "kv", k, d)),
        ("self_attn.v_proj.weight", (k * d, e), ("attention", "v_kernel"), _heads_in(layout, "kv", k, d)),
        ("self_attn.v_proj.bias", (k * d,), ("attention", "v_bias"), _heads_bias(layout, "kv", k, d)),
        ("self_attn.o_proj.weight", (e, h * d), ("attention", "o_kernel"), _heads_out(layout, h, d)),
        ("mlp.gate_proj.weight", (i, e), ("mlp", "gate_kernel"), _TRANSPOSE),
        ("mlp.up_proj.weight", (i, e), ("mlp", "up_kernel"), _TRANSPOSE),
        ("mlp.down_proj.weight", (e, i), ("mlp", "down_kernel"), _TRANSPOSE),
        ("input_layernorm.weight", (e,), ("input_norm", "scale"), _IDENTITY),
        ("post_attention_layernorm.weight", (e,), ("post_attention_norm", "scale"), _IDENTITY),
    ]
    layer_root = ("layers",) if config.scan_layers else (f"layers_{n}",)
    specs += [TensorSpec(pre + name, shape, layer_root + path, *fns, layer=n)
              for name, shape, path, fns in layer]
  specs.append(TensorSpec("model.norm.weight", (e,), ("final_norm", "scale"), *_IDENTITY))
  if not config.tie_word_embeddings:
    specs.append(TensorSpec("lm_head.weight", (v, e), ("lm_head",), *_TRANSPOSE))
  return specs


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def flax_from_hf(tensors: Mapping[str, np.ndarray], config: ModelConfig,
                 layout: HeadLayout | None = None) -> dict:
  """HF-named numpy tensors -> Flax params (numpy, head layout applied, layers stacked if scanned).

  Raises CheckpointError naming the tensor for a missing or misshaped one. Tensors
  the model does not use are rejected by the checkpoint loader, not here.
  """
  params: dict = {}
  stacked: dict[tuple[str, ...], list] = {}
  for spec in tensor_specs(config, layout):
    if spec.hf_name not in tensors:
      raise CheckpointError(f"tensor {spec.hf_name} is missing; expected shape {spec.hf_shape}.")
    array = np.asarray(tensors[spec.hf_name])
    if tuple(array.shape) != spec.hf_shape:
      raise CheckpointError(f"tensor {spec.hf_name} has shape {tuple(array.shape)}, expected "
                            f"{spec.hf_shape} for this config.")
    value = spec.to_flax(array)
    if spec.layer is not None and config.scan_layers:
      stacked.setdefault(spec.flax_path, []).append(value)
    else:
      _set(params, spec.flax_path, value)
  for path, values in stacked.items():
    _set(params, path, np.stack(values))
  return params


def hf_from_flax(params: Mapping, config: ModelConfig, layout: HeadLayout | None = None) -> dict[str, np.ndarray]:
  """Flax params (numpy or jax) -> HF-named numpy tensors, the head plan undone."""
  result = {}
  for spec in tensor_specs(config, layout):
    value = np.asarray(_get(params, spec.flax_path))
    if spec.layer is not None and config.scan_layers:
      value = value[spec.layer]
    result[spec.hf_name] = np.ascontiguousarray(spec.from_flax(value))
  return result
