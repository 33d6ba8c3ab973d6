"""LoRA: low-rank adapters on chosen kernels, trained while the base model stays frozen.

A kernel W [out..., in...] (HF's [out, in] order, the contracted dimensions last:
`quantization.contracted_axes`) gets two adapters

    A [r, in...]   logical (lora_rank, the kernel's in names)    hash-initialised, std 1/sqrt(3 fan_in)
    B [out..., r]  logical (the kernel's out names, lora_rank)   zeros

(with scanned layers both lead with `layers`; an expert kernel's with `expert` too: an adapter per expert), and
the model runs on the effective kernel
W + (alpha / r) * B @ A, in W's layout. `lora_rank` is replicated by every rule table; the in / out
dimensions keep their kernel's logical names, so each table splits an adapter like its kernel.
The training step ties head-carrying gradients through the head layout; A's init gives padded
heads zeros and repeated KV heads equal values (`sharding.init.param_values`), so the adapters
stay those of the canonical model on every mesh.

The trainable tree holds the adapters only, nested like the params:
`trainable['layers_0']['attention']['q_kernel_lora_a']`. `frozen` is `{'base': params as stored,
'lora_scale': f32[]}`. `combine(trainable, frozen)` returns a tree of the base's structure:
each target kernel in float32 (an int8 kernel dequantised, its `<kernel>_scale` returned as ones),
every other leaf as stored, which the same model consumes (`projections.dense` picks its product
per leaf dtype). The base leaves are never written.
"""

from __future__ import annotations

import functools
import math
import string
import zlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from qwen_logical.common.errors import QwenLogicalError
from qwen_logical.model import axes as ax
from qwen_logical.model import quantization as quant
from qwen_logical.sharding import programs, validation
from qwen_logical.sharding.init import param_values
from qwen_logical.sharding.tree_paths import layer_index, layer_kind_path, path_keys

TARGETS = {"q": "q_kernel", "k": "k_kernel", "v": "v_kernel", "o": "o_kernel",
           "gate": "gate_kernel", "up": "up_kernel", "down": "down_kernel"}
A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"

Params = Any


class LoraError(QwenLogicalError):
  """LoRA settings that cannot apply to this model (rank, alpha, target names)."""


def settings_of(train_cfg) -> tuple[int, float, tuple[str, ...]]:
  """(rank, alpha, target kernel names) from config.train: lora_rank, lora_alpha (default 2 * rank),
  lora_targets (comma-separated subset of q,k,v,o,gate,up,down; default all)."""
  rank = int(getattr(train_cfg, "lora_rank", 0) or 0)
  if rank <= 0:
    raise LoraError(f"config.train.lora_rank={rank}: LoRA needs a positive rank (0 trains every parameter).")
  alpha = getattr(train_cfg, "lora_alpha", None)
  alpha = float(2 * rank if alpha in (None, 0) else alpha)
  targets = getattr(train_cfg, "lora_targets", None) or ",".join(TARGETS)
  names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
  unknown = [t for t in names if t not in TARGETS]
  if unknown or not names:
    raise LoraError(f"config.train.lora_targets={targets!r}: unknown target(s) {unknown}; use a "
                    f"comma-separated subset of {','.join(TARGETS)}.")
  return rank, alpha, tuple(TARGETS[t] for t in dict.fromkeys(names))


def _split(kernel_name: str, names: tuple, shape: tuple):
  """(lead, out, in) parts of a kernel's logical names or shape: lead is the stacking axes, () or some of
  (layers, expert): every expert of a mixture gets adapters of its own."""
  lead = next((n for n, name in enumerate(names) if name not in (ax.LAYERS, ax.EXPERT)), len(names))
  n_in = len(quant.contracted_axes(kernel_name))
  return (tuple(shape[:lead]), tuple(shape[lead:len(shape) - n_in]), tuple(shape[len(shape) - n_in:]))


def adapter_table(partitioner, rank: int, kernels: tuple[str, ...]) -> dict[tuple[str, ...], tuple]:
  """path of each adapter -> (shape, logical names), for every target kernel of the partitioner's params."""
  table = {}
  shapes = jax.tree_util.tree_leaves_with_path(partitioner.param_shapes)
  specs = jax.tree_util.tree_leaves(partitioner.logical_specs,
                                    is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  for (path, shape), spec in zip(shapes, specs):
    keys = path_keys(path)
    if keys[-1] not in kernels:
      continue
    names = tuple(spec)
    lead, out, inp = _split(keys[-1], names, tuple(shape.shape))
    lead_n, out_n, in_n = _split(keys[-1], names, names)
    table[keys[:-1] + (keys[-1] + A_SUFFIX,)] = (lead + (rank,) + inp, lead_n + (ax.LORA_RANK,) + in_n)
    table[keys[:-1] + (keys[-1] + B_SUFFIX,)] = (lead + out + (rank,), lead_n + out_n + (ax.LORA_RANK,))
  return table


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def init_adapters(partitioner, table: Mapping[tuple[str, ...], tuple], seed: int,
                  b_std: float | None = None) -> Params:
  """The adapters, made in their shards by one program: A from the init's counter hash of (seed,
  adapter, layer, canonical coordinates) through the head layout (std 1/sqrt(3 fan_in)), B zeros (or
  hashed with standard deviation `b_std`, to test a trained state); float32."""

  def make(seed):
    out = {}
    for path, (shape, names) in table.items():
      is_b = path[-1].endswith(B_SUFFIX)
      if is_b and not b_std:
        out[path] = jnp.zeros(shape, jnp.float32)
        continue
      fan_in = math.prod(shape[names.index(ax.LORA_RANK) + 1:])
      key = zlib.crc32(layer_kind_path(path).encode())
      out[path] = param_values(seed, jnp.int32(layer_index(path) or 0), shape=shape, logical=names,
                               layout=partitioner.layout, key=key,
                               std=b_std if is_b else (3 * fan_in) ** -0.5, dtype=jnp.float32)
    return _nest(out)

  axes = _nest({path: names for path, (_, names) in table.items()})
  return partitioner.program(make, out_axes=axes, name="lora_init")(np.uint32(seed % 2**32))


def _delta(a: jax.Array, b: jax.Array, kernel_name: str) -> jax.Array:
  """B [lead, out..., r] @ A [lead, r, in...] -> [lead, out..., in...], float32 at full precision."""
  n_lead = a.ndim - 1 - len(quant.contracted_axes(kernel_name))
  letters = iter(string.ascii_letters)
  take = lambda n: "".join(next(letters) for _ in range(n))
  lead, rank, out, inp = take(n_lead), take(1), take(b.ndim - n_lead - 1), take(a.ndim - n_lead - 1)
  return jnp.einsum(f"{lead}{out}{rank},{lead}{rank}{inp}->{lead}{out}{inp}", b, a,
                    precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def combine(trainable: Params, frozen: Mapping[str, Any], kernel_axes: Params | None = None) -> Params:
  """The params the model runs on: the base with each adapted kernel replaced by W + scale * B @ A.

  Adapted kernels come back float32 (int8: dequantised, and their `<kernel>_scale` as ones, so the
  model's product scales by one); every other leaf is the base's own. `kernel_axes` (the
  partitioner's logical specs) pins each effective kernel to its base's layout; it needs the rules
  bound (inside the training step); None leaves the layout to the compiler.
  """
  base, scale = frozen["base"], frozen["lora_scale"]
  out = jax.tree_util.tree_map(lambda x: x, base)  # a new tree; the base's leaves are not copied

  def visit(adapters, node, params_node, axes_node):
    for key, value in adapters.items():
      if isinstance(value, Mapping):
        visit(value, node[key], params_node[key], None if axes_node is None else axes_node[key])
      elif key.endswith(A_SUFFIX):
        name = key[:-len(A_SUFFIX)]
        b = adapters[name + B_SUFFIX]
        kernel, kernel_scale = params_node[name], params_node.get(quant.scale_name(name))
        if kernel_scale is None:
          weights = kernel.astype(jnp.float32)
        else:
          weights = quant.dequantize(kernel, kernel_scale, quant.contracted_axes(name), jnp.float32, jnp)
          node[quant.scale_name(name)] = jnp.ones_like(kernel_scale)
        weights = weights + scale.astype(jnp.float32) * _delta(value, b, name)
        if axes_node is not None:
          weights = nn.with_logical_constraint(weights, tuple(axes_node[name]))
        node[name] = weights

  visit(trainable, out, base, kernel_axes)
  return out


def merge(partitioner, trainable: Params, frozen: Mapping[str, Any]) -> Params:
  """The fine-tuned params for export (`checkpoints.export.export_checkpoint` with the base's
  `partitioner`): the base's structure, adapted kernels float32 with the adapters merged in."""
  return partitioner.program(combine, out_axes=programs.PARAMS, name="lora_merge")(trainable, frozen)


def check_adapters(partitioner, table: Mapping[tuple[str, ...], tuple]) -> None:
  """RuleError (naming the adapter, dimension and remedy) if an adapter does not split over the mesh."""
  problems = []
  for path, (shape, names) in table.items():
    problems += validation.check_array(f"LoRA adapter {'/'.join(path)} {shape}", shape, names,
                                       partitioner.table, partitioner.mesh_shape)
  validation.raise_if(problems, partitioner.table, partitioner.mesh_shape)


def setup(partitioner, params: Params, train_cfg):
  """(trainable, frozen, combine, trainable_axes, trainable_shapes) for LoRA on `params`.

  trainable: the adapters (float32, in their shards); frozen: {'base': params, 'lora_scale': f32[]};
  combine(trainable, frozen) -> the params the model runs on; trainable_axes / trainable_shapes:
  trees of logical PartitionSpec / ShapeDtypeStruct of the adapters (for the state's shardings).
  """
  rank, alpha, kernels = settings_of(train_cfg)
  table = adapter_table(partitioner, rank, kernels)
  if not table:
    raise LoraError(f"no kernel named {list(kernels)} in the model; check config.train.lora_targets.")
  check_adapters(partitioner, table)
  trainable = init_adapters(partitioner, table, int(getattr(train_cfg, "seed", 0) or 0))
  replicated = partitioner.sharding(())
  frozen = {"base": params, "lora_scale": jax.device_put(np.float32(alpha / rank), replicated)}
  boxed = _nest({p: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)
                 for p, (shape, names) in table.items()})
  axes, shapes = nn.get_partition_spec(boxed), nn.meta.unbox(boxed)  # as the partitioner's own
  count = sum(math.prod(shape) for shape, _ in table.values())
  logging.info("LoRA rank %d, alpha %g on %s: %d adapters, %.2f M trainable parameters", rank, alpha,
               ",".join(k.split("_")[0] for k in kernels), len(table), count / 1e6)
  return trainable, frozen, functools.partial(combine, kernel_axes=partitioner.logical_specs), axes, shapes
