"""The HF name map: HF Qwen2 / Qwen3 / Qwen3-MoE tensors <-> Flax parameters in the head layout.

One table (`tensor_specs`) says, for every HF tensor, which Flax parameter it becomes, its HF shape, the view
that turns it into the canonical Flax shape (reshapes only, so a memory-mapped tensor is not read), and which
axis carries heads for the head layout plan. Flax kernels keep HF's [out, in] order (outputs first, the
contracted dimension last), so every view is a plain reshape or the identity and a loaded slice is a
contiguous copy. Full conversions (`flax_from_hf`, `hf_from_flax`) and the slice-wise checkpoint loader all
read that table.

Several HF tensors can make one stacked Flax parameter: scanned layers stack on a leading `layers` axis, and
Qwen3-MoE's per-expert tensors (`mlp.experts.<j>.gate_proj.weight` ...) on an `expert` axis; a spec's
`stack` is its index into those leading axes.

With int8 quantization (`ModelConfig.quantization`) a kernel's spec carries a second spec, `scale`, for its
`<kernel>_scale` parameter: the tensor's per-output-channel scales (`quantization.row_scales`, f32[out] in
HF order) through the same head layout as the kernel's output dimensions. Loading quantises each slice with
its scales; exporting writes the dequantised kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from qwen_logical.checkpoints.safetensors_io import CheckpointError
from qwen_logical.model import quantization as quant
from qwen_logical.model.config import ModelConfig
from qwen_logical.sharding.distributed import to_host
from qwen_logical.model.head_layout import KV, QUERY, HeadLayout, plan_heads


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor and the Flax parameter it becomes.

  Attributes:
    hf_name, hf_shape: as in the checkpoint.
    flax_path: path in the Flax params tree (a stacked `layers` param when scanned).
    view: HF array -> canonical Flax-shaped array (views only: reshape).
    unview: canonical Flax-shaped array -> HF array.
    head_axis, head_kind: the canonical axis holding heads and its kind (head_layout.QUERY or KV),
      or None.
    layer: decoder layer index; None for global tensors.
    stack: the index of this tensor in the stacked parameter's leading axes: (layer,) when layers are
      scanned, then (expert,) for an expert's tensor; () for a parameter of its own.
    scale: for an int8 kernel, the spec of its scale parameter (else None).
    of_scales: this spec is a `scale`: hf_shape is the tensor's output channels (out,), and its
      values are the tensor's row scales, not the tensor.
  """

  hf_name: str
  hf_shape: tuple[int, ...]
  flax_path: tuple[str, ...]
  view: Callable[[np.ndarray], np.ndarray]
  unview: Callable[[np.ndarray], np.ndarray]
  head_axis: int | None = None
  head_kind: str | None = None
  layer: int | None = None
  stack: tuple[int, ...] = ()
  scale: "TensorSpec | None" = None
  of_scales: bool = False

  @property
  def canonical_shape(self) -> tuple[int, ...]:
    """Shape of the view (the Flax shape before the head layout)."""
    return self.view(np.broadcast_to(np.zeros((), np.uint8), self.hf_shape)).shape

  @property
  def contracted(self) -> tuple[int, ...]:
    return quant.contracted_axes(self.flax_path[-1])

  def layout_shape(self, layout: HeadLayout) -> tuple[int, ...]:
    """Shape of this tensor in the Flax head layout (one layer, unstacked)."""
    shape = list(self.canonical_shape)
    if self.head_axis is not None:
      shape[self.head_axis] = layout.num_layout_heads(self.head_kind)
    return tuple(shape)

  def flax_dtype(self, hf_dtype) -> np.dtype:
    """The dtype a full conversion gives: int8 kernel, float32 scale, else the file's."""
    return np.dtype(np.int8 if self.scale is not None else np.float32 if self.of_scales else hf_dtype)

  def read_into(self, hf_array: np.ndarray, layout: HeadLayout, index: Sequence[slice], out: np.ndarray,
                hf_scales: np.ndarray | None = None) -> None:
    """Writes the `index` slice of the layout-shaped parameter into `out`, reading only that slice.

    `hf_array` may be a memory map: views select the slice before anything is read. An int8
    kernel or its scale needs `hf_scales`, the tensor's `quantization.row_scales` (f32[out]).
    """
    if self.of_scales:
      self._read_layout(hf_scales, layout, index, out)
      out[out == 0] = 1  # padded heads (read as zeros): scale 1; a real scale is never 0
    elif self.scale is not None:  # the slice in float32, quantised with its rows' scales
      values = np.empty(out.shape, np.float32)
      self._read_layout(hf_array, layout, index, values)
      scale_index = tuple(index)[:len(self.scale.canonical_shape)]
      scale = self.scale.read(None, layout, scale_index, np.float32, hf_scales)
      quant.quantize_into(out, values, scale, self.contracted)
    else:
      self._read_layout(hf_array, layout, index, out)

  def _read_layout(self, hf_array: np.ndarray, layout: HeadLayout, index: Sequence[slice], out: np.ndarray) -> None:
    canonical = self.view(hf_array)
    index = tuple(index) + (slice(None),) * (canonical.ndim - len(index))
    if self.head_axis is None:
      convert_into(out, canonical[index])
      return
    axis = self.head_axis
    others = tuple(slice(None) if a == axis else s for a, s in enumerate(index))
    layout.read_heads(self.head_kind, canonical[others], axis, index[axis], out, convert_into)

  def read(self, hf_array: np.ndarray, layout: HeadLayout, index: Sequence[slice], dtype,
           hf_scales: np.ndarray | None = None) -> np.ndarray:
    """The `index` slice of the layout-shaped parameter as a new array of `dtype`."""
    layout_shape = self.layout_shape(layout)
    index = list(index) + [slice(None)] * (len(layout_shape) - len(index))
    shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, layout_shape))
    out = np.empty(shape, dtype)
    self.read_into(hf_array, layout, index, out, hf_scales)
    return out

  def to_flax(self, hf_array: np.ndarray, layout: HeadLayout, hf_scales: np.ndarray | None = None) -> np.ndarray:
    return self.read(hf_array, layout, (), self.flax_dtype(hf_array.dtype), hf_scales)

  def from_flax(self, value: np.ndarray, layout: HeadLayout) -> np.ndarray:
    if self.head_axis is not None:
      value = layout.to_canonical(self.head_kind, value, self.head_axis)
    return self.unview(value)


def convert_into(out: np.ndarray, source: np.ndarray) -> None:
  """out[...] = source cast to out.dtype (same shapes), bit-exact for bfloat16 -> float32.

  Every HF -> Flax view is a reshape, so `source` is read along its rows and the ml_dtypes
  cast runs vectorised, about as fast as a copy.
  """
  np.copyto(out, source, casting="unsafe")


def _identity(x):
  return x


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
  """Every HF tensor of `config`, in checkpoint order, with its Flax target (layout-independent)."""
  e, v = config.hidden_size, config.vocab_size
  specs = [TensorSpec("model.embed_tokens.weight", (v, e), ("embed_tokens", "embedding"), _identity, _identity)]
  for n in range(config.num_layers):
    root, stack = (("layers",), (n,)) if config.scan_layers else ((f"layers_{n}",), ())
    specs += [TensorSpec(f"model.layers.{n}.{name}", shape, root + path, fns[0], fns[1], axis, kind, n, stack + within)
              for name, shape, path, fns, axis, kind, within in _layer_tensors(config)]
  specs.append(TensorSpec("model.norm.weight", (e,), ("final_norm", "scale"), _identity, _identity))
  if not config.tie_word_embeddings:
    specs.append(TensorSpec("lm_head.weight", (v, e), ("lm_head",), _identity, _identity))
  return [_with_scale(spec) if quant.is_quantized(spec.flax_path[-1], config.quantization) else spec
          for spec in specs]


def _layer_tensors(config: ModelConfig) -> list[tuple]:
  """One decoder layer's tensors: (HF name below the layer, HF shape, Flax path below the layer,
  (view, unview), head axis, head kind, index in the stacked parameter)."""
  e, i, d = config.hidden_size, config.intermediate_size, config.head_dim
  h, k = config.num_heads, config.num_kv_heads

  def heads_in(n):  # (n*d, e) weight <-> (n, d, e) kernel
    return (lambda w: w.reshape(n, d, e), lambda x: x.reshape(n * d, e))

  def heads_bias(n):  # (n*d,) <-> (n, d)
    return (lambda b: b.reshape(n, d), lambda x: x.reshape(n * d))

  heads_out = (lambda w: w.reshape(e, h, d), lambda x: x.reshape(e, h * d))  # (e, h*d) <-> (e, h, d)
  same = (_identity, _identity)  # gate/up (i, e), down (e, i), norms: Flax keeps HF's order
  attention = [("q", h, QUERY), ("k", k, KV), ("v", k, KV)]
  tensors = []
  for p, n, kind in attention:
    tensors.append((f"self_attn.{p}_proj.weight", (n * d, e), ("attention", f"{p}_kernel"), heads_in(n), 0, kind, ()))
    if config.attention_bias:
      tensors.append((f"self_attn.{p}_proj.bias", (n * d,), ("attention", f"{p}_bias"), heads_bias(n), 0, kind, ()))
  tensors.append(("self_attn.o_proj.weight", (e, h * d), ("attention", "o_kernel"), heads_out, 1, QUERY, ()))
  if config.qk_norm:
    tensors += [(f"self_attn.{p}_norm.weight", (d,), ("attention", f"{p}_norm", "scale"), same, None, None, ())
                for p in "qk"]
  if config.is_moe:
    f = config.moe_intermediate_size
    tensors.append(("mlp.gate.weight", (config.num_experts, e), ("mlp", "router_kernel"), same, None, None, ()))
    for x in range(config.num_experts):
      tensors += [(f"mlp.experts.{x}.{p}_proj.weight", shape, ("mlp", f"{p}_kernel"), same, None, None, (x,))
                  for p, shape in (("gate", (f, e)), ("up", (f, e)), ("down", (e, f)))]
  else:
    tensors += [(f"mlp.{p}_proj.weight", shape, ("mlp", f"{p}_kernel"), same, None, None, ())
                for p, shape in (("gate", (i, e)), ("up", (i, e)), ("down", (e, i)))]
  tensors += [("input_layernorm.weight", (e,), ("input_norm", "scale"), same, None, None, ()),
              ("post_attention_layernorm.weight", (e,), ("post_attention_norm", "scale"), same, None, None, ())]
  return tensors


def _with_scale(kernel: TensorSpec) -> TensorSpec:
  """An int8 kernel's spec, with the spec of its scale: the output dimensions of its view, heads and all."""
  out_shape = quant.output_part(kernel.canonical_shape, kernel.contracted)
  has_heads = kernel.head_axis is not None and kernel.head_axis < len(out_shape)
  rows = kernel.hf_shape[0]
  scale = dataclasses.replace(
      kernel, hf_shape=(rows,), flax_path=kernel.flax_path[:-1] + (quant.scale_name(kernel.flax_path[-1]),),
      view=lambda s: s.reshape(out_shape), unview=lambda x: x.reshape(rows),
      head_axis=kernel.head_axis if has_heads else None, head_kind=kernel.head_kind if has_heads else None,
      of_scales=True)
  return dataclasses.replace(kernel, scale=scale)


def stack_shape(stacks) -> tuple[int, ...]:
  """The leading (stacked) shape that the `stack` indices of one parameter's tensors fill."""
  return tuple(max(column) + 1 for column in zip(*stacks))


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def check_tensor(spec: TensorSpec, shape: Sequence[int], where: str = "") -> None:
  if tuple(shape) != spec.hf_shape:
    raise CheckpointError(f"tensor {spec.hf_name}{where} has shape {tuple(shape)}, expected "
                          f"{spec.hf_shape} for this config.json.")


def flax_from_hf(tensors: Mapping[str, np.ndarray], config: ModelConfig,
                 layout: HeadLayout | None = None) -> dict:
  """HF-named numpy tensors -> Flax params (numpy, head layout applied, layers stacked if scanned).

  Raises CheckpointError naming the tensor for a missing or misshaped one.
  """
  layout = layout or plan_heads(config.num_heads, config.num_kv_heads, 1)
  params: dict = {}
  stacked: dict[tuple[str, ...], dict] = {}
  for spec in tensor_specs(config):
    if spec.hf_name not in tensors:
      raise CheckpointError(f"tensor {spec.hf_name} is missing; expected shape {spec.hf_shape}.")
    array = np.asarray(tensors[spec.hf_name])
    check_tensor(spec, array.shape)
    hf_scales = quant.row_scales(array) if spec.scale is not None else None
    for part in (spec,) if spec.scale is None else (spec, spec.scale):
      value = part.to_flax(array, layout, hf_scales)
      if spec.stack:
        stacked.setdefault(part.flax_path, {})[spec.stack] = value
      else:
        set_path(params, part.flax_path, value)
  for path, values in stacked.items():
    lead = stack_shape(values)
    first = next(iter(values.values()))
    array = np.empty(lead + first.shape, first.dtype)
    for index, value in values.items():
      array[index] = value
    set_path(params, path, array)
  return params


class HostValues:
  """Parameters of `spec`s on the host: a layer's stacked experts come over as one array (one gather, not one
  per expert) and are sliced on the host; the last two stacks are kept (an int8 kernel's and its scale's)."""

  def __init__(self, params: Mapping, config: ModelConfig):
    self.params, self.config, self._stacks = params, config, {}

  def __call__(self, spec: TensorSpec) -> np.ndarray:
    value = get_path(self.params, spec.flax_path)
    if len(spec.stack) <= int(self.config.scan_layers):  # not an expert's tensor
      return to_host(value[spec.stack])
    key = (spec.flax_path, spec.stack[:-1])
    if key not in self._stacks:
      self._stacks = dict(list(self._stacks.items())[-1:])
      self._stacks[key] = to_host(value[spec.stack[:-1]])
    return self._stacks[key][spec.stack[-1]]


def hf_tensor_from_flax(params: Mapping, spec: TensorSpec, config: ModelConfig, layout: HeadLayout,
                        host: HostValues | None = None) -> np.ndarray:
  """One HF tensor from Flax params (numpy or jax); an int8 kernel comes back dequantised (float32). Pass one
  `host` (HostValues) for a run of tensors, so a layer's experts are fetched once."""
  host = host or HostValues(params, config)
  value = host(spec)
  if spec.scale is not None:
    value = quant.dequantize(value, host(spec.scale), spec.contracted, np.float32)
  return np.ascontiguousarray(spec.from_flax(value, layout))


def hf_from_flax(params: Mapping, config: ModelConfig, layout: HeadLayout | None = None) -> dict[str, np.ndarray]:
  """Flax params (numpy or jax) -> HF-named numpy tensors, the head plan undone."""
  layout = layout or plan_heads(config.num_heads, config.num_kv_heads, 1)
  host = HostValues(params, config)
  return {spec.hf_name: hf_tensor_from_flax(params, spec, config, layout, host) for spec in tensor_specs(config)}
