"""Qwen3-MoE's routed experts: a router picks `num_experts_per_tok` of `num_experts` SwiGLU experts per token.

Dropless: every token reaches every expert it picks. A device sorts its (token, choice) pairs by expert
and runs each expert's rows as one group of a grouped product (no capacity factor, nothing dropped):
`jax.lax.ragged_dot` on accelerators (TPUs run it grouped; XLA's default GPU lowering may expand it, unmeasured
here); on XLA:CPU, which lowers ragged_dot to a masked product over every expert, a loop over blocks of one
expert's rows (`grouped_swiglu`). The experts' sharding is the rule
table's, like every other axis:

* `expert` splits the experts over mesh axes (expert parallelism), `expert_mlp` each expert's hidden
  dimension (tensor parallelism inside the experts); the validation rejects an expert count the shards
  do not divide.
* The product runs inside `shard_map` over the bound mesh: each device takes the rows routed to its own
  experts (the others weigh 0) and its slice of the hidden dimension. Where tokens and experts are split
  over the same mesh axis (experts over 'batch'), the tokens are all-gathered over it first and each
  device's outputs reduce-scattered back; over every other axis that splits experts or their hidden
  dimension the partial outputs are summed (one all-reduce, as after a tensor-parallel MLP).

The router's logits (activation_batch, activation_length, None) are sown as
intermediates/router_logits for the load-balancing loss (`training.loss`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen_logical.model import axes as ax
from qwen_logical.model.config import ModelConfig
from qwen_logical.model.params import constrain, kernel_param, logical_param
from qwen_logical.model.projections import bound_mesh_axes, dense, zero_after

ROUTER_LOGITS = "router_logits"  # the sown intermediate: f32[B, L, X] per layer
_ROWS_BY_GROUP = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def route(logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
  """Router logits [..., X] -> (weights f32[..., k], experts int32[..., k]) as transformers' Qwen3-MoE:
  softmax in float32, the k largest, renormalised to sum 1 when `normalize` (norm_topk_prob)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32)


def _converted(weights, dtype, after: jax.Array):
  """Stored expert weights in the compute dtype, converted only once `after` exists: XLA would otherwise
  hoist every layer's conversion to the start and hold them all (projections.dense does the same)."""
  return weights if weights.dtype == dtype else weights.astype(dtype) + zero_after(after).astype(dtype)


def _ragged_swiglu(rows, sizes, gate, up, down, dtype):
  """The experts' SwiGLU over `rows` [M, E] grouped by expert (int[X] `sizes`; rows past their sum are in no
  group) as three `ragged_dot`s. An int8 kernel's scales multiply the products' output channels, as
  projections.dense does."""
  grouped = lambda lhs, rhs: jax.lax.ragged_dot_general(lhs, rhs, sizes, _ROWS_BY_GROUP)
  expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(rows.shape[0]), side="right"),
                       sizes.shape[0] - 1)  # each row's group

  def product(x, kernel):
    y = grouped(x, _converted(kernel[0], dtype, x[None]))
    return y if kernel[1] is None else y * jnp.take(kernel[1], expert, axis=0).astype(dtype)

  hidden = jax.nn.silu(product(rows, gate)) * product(rows, up)
  return product(hidden.astype(dtype), down)


def block_rows(pairs: int, experts: int) -> int:
  """Rows per block of `_blocked_swiglu`: about the mean rows per expert, a power of two in [8, 128]."""
  mean = max(1, pairs // max(experts, 1))
  return int(min(128, max(8, 1 << (mean - 1).bit_length())))


def _blocked_swiglu(rows, sizes, gate, up, down, dtype):
  """`_ragged_swiglu` as a loop over blocks of rows of one expert each (each group starts a block), every
  block reading and converting only its own expert's weights. XLA:CPU lowers ragged_dot to a masked product
  over every expert (measured 2026-12-04: 16 groups cost 23x one dense product of the same rows); this costs
  the rows plus at most one partial block per expert. A static loop (blocks past the used ones skip their
  work), so it differentiates like any scan."""
  m, e = rows.shape
  count = sizes.shape[0]
  block = block_rows(m, count)
  capacity = -(-m // block) + count  # blocks the rows can need
  blocks_of = (sizes + block - 1) // block
  ends = jnp.cumsum(sizes)
  group = jnp.searchsorted(ends, jnp.arange(m), side="right")  # each sorted row's expert (count: none)
  known = jnp.minimum(group, count - 1)
  slot = (jnp.cumsum(blocks_of) - blocks_of)[known] * block + jnp.arange(m) - (ends - sizes)[known]
  slot = jnp.where(group < count, slot, capacity * block)  # rows in no group go nowhere
  padded = jnp.zeros((capacity * block, e), rows.dtype).at[slot].set(rows, mode="drop")
  expert_of_block = jnp.minimum(jnp.searchsorted(jnp.cumsum(blocks_of), jnp.arange(capacity), side="right"),
                                count - 1)
  used = jnp.sum(blocks_of)

  def run_block(b, out):
    x = jax.lax.dynamic_slice_in_dim(padded, b * block, block)
    pick = lambda array: jax.lax.dynamic_index_in_dim(array, expert_of_block[b], keepdims=False)

    def product(a, kernel):  # an int8 kernel's scales multiply the output channels, as projections.dense
      y = jnp.einsum("oi,bi->bo", pick(kernel[0]).astype(dtype), a)
      return y if kernel[1] is None else y * pick(kernel[1]).astype(dtype)

    hidden = jax.nn.silu(product(x, gate)) * product(x, up)
    return jax.lax.dynamic_update_slice_in_dim(out, product(hidden.astype(dtype), down), b * block, 0)

  out = jax.lax.fori_loop(0, capacity, lambda b, out: jax.lax.cond(b < used, run_block, lambda b, o: o, b, out),
                          jnp.zeros((capacity * block, e), dtype))
  return jnp.take(out, slot, axis=0, mode="fill", fill_value=0)


def grouped_swiglu(rows, sizes, gate, up, down, dtype, method: str | None = None):
  """rows [M, E] sorted by expert, int[X] sizes, kernels (weights, scale | None) -> [M, E]; rows in no group
  give zeros or anything (callers mask them). `method`: "ragged" (accelerators), "blocks" (XLA:CPU), None:
  per the default backend."""
  method = method or ("blocks" if jax.default_backend() == "cpu" else "ragged")
  return (_blocked_swiglu if method == "blocks" else _ragged_swiglu)(rows, sizes, gate, up, down, dtype)


def _local_experts(x, weights, experts, gate, up, down, *, first_expert, dtype):
  """One device's contribution: x [T, E], weights/experts [T, k] -> y [T, E] from its own experts.

  gate/up (x_local, f_local, E), down (x_local, E, f_local) as stored (weights, scale | None): experts
  [first_expert, first_expert + x_local).
  """
  tokens, top_k = experts.shape
  count = gate[0].shape[0]
  local = experts.reshape(-1) - first_expert
  mine = (local >= 0) & (local < count)
  group = jnp.where(mine, local, count)  # others sort last, in no group
  order = jnp.argsort(group, stable=True)
  sizes = jnp.zeros((count + 1,), jnp.int32).at[group].add(1)[:count]
  rows = jnp.take(x, order // top_k, axis=0)  # [T*k, E]: each routed pair's token, grouped by expert
  out = grouped_swiglu(rows, sizes, gate, up, down, dtype)  # [T*k, E]
  weighted = out * weights.reshape(-1)[order].astype(out.dtype)[:, None]
  weighted = jnp.where(mine[order][:, None], weighted, 0)  # rows in no group: whatever the product left
  return jnp.zeros((tokens, x.shape[1]), out.dtype).at[order // top_k].add(weighted)


def _mesh_axes(name: str, mesh) -> tuple[str, ...]:
  """The mesh axes of logical `name` under the bound rules that split it (of size > 1)."""
  return tuple(a for a in bound_mesh_axes((name,))[0] if mesh.shape[a] > 1)


def routed_experts(x, weights, experts, gate, up, down, dtype):
  """x [B, L, E], weights f32[B, L, k], experts int[B, L, k], kernels (weights, scale | None):
  gate/up (expert, expert_mlp, embed), down (expert, embed, expert_mlp) -> [B, L, E].

  Without a bound mesh the whole computation runs on one device."""
  b, l, e = x.shape
  k = experts.shape[-1]
  run = lambda x, w, i, g, u, d, first=0: _local_experts(
      x.reshape(-1, e), w.reshape(-1, k), i.reshape(-1, k), g, u, d, first_expert=first, dtype=dtype).reshape(x.shape)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return run(x, weights, experts, gate, up, down)
  tokens, split, inner = (_mesh_axes(name, mesh) for name in (ax.ACTIVATION_BATCH, ax.EXPERT, ax.EXPERT_MLP))
  gathered = tuple(a for a in tokens if a in split + inner)  # tokens split where experts are too
  summed = tuple(a for a in split + inner if a not in tokens)
  row = P(tokens or None)
  kernel_spec = lambda kernel, spec, scale_spec: (spec, None if kernel[1] is None else scale_spec)

  def device(x, w, i, g, u, d):
    if gathered:
      x, w, i = (jax.lax.all_gather(a, gathered, axis=0, tiled=True) for a in (x, w, i))
    first = jax.lax.axis_index(split) * g[0].shape[0] if split else 0
    y = run(x, w, i, g, u, d, first)
    if gathered:
      y = jax.lax.psum_scatter(y, gathered, scatter_dimension=0, tiled=True)
    return jax.lax.psum(y, summed) if summed else y

  expert, hidden = split or None, inner or None
  in_specs = (row, row, row, kernel_spec(gate, P(expert, hidden, None), P(expert, hidden)),
              kernel_spec(up, P(expert, hidden, None), P(expert, hidden)),
              kernel_spec(down, P(expert, None, hidden), P(expert, None)))
  return jax.shard_map(device, in_specs=in_specs, out_specs=row, check_vma=False)(x, weights, experts, gate, up, down)


class MixtureOfExperts(nn.Module):
  """Qwen3-MoE's sparse MLP. Params: router_kernel (expert, embed) in param_dtype (never int8: it decides
  the routing); gate/up_kernel (expert, expert_mlp, embed), down_kernel (expert, embed, expert_mlp), HF's
  per-expert [out, in] weights stacked on a leading expert axis."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, L, E] (activation_batch, activation_length, activation_embed) -> [B, L, E]."""
    cfg = self.config
    n, f, e, dtype = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size, cfg.dtype
    router = logical_param(self, "router_kernel", (n, e), (ax.EXPERT, ax.EMBED), cfg.param_dtype)
    gate = kernel_param(self, "gate_kernel", (n, f, e), (ax.EXPERT, ax.EXPERT_MLP, ax.EMBED), cfg)
    up = kernel_param(self, "up_kernel", (n, f, e), (ax.EXPERT, ax.EXPERT_MLP, ax.EMBED), cfg)
    down = kernel_param(self, "down_kernel", (n, e, f), (ax.EXPERT, ax.EMBED, ax.EXPERT_MLP), cfg)
    logits = constrain(dense(x, (router, None), dtype, (ax.EXPERT, ax.EMBED)),
                       (ax.ACTIVATION_BATCH, ax.ACTIVATION_LENGTH, None))
    self.sow("intermediates", ROUTER_LOGITS, logits.astype(jnp.float32))
    weights, experts = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    y = routed_experts(constrain(x, ax.EMBED_ACTIVATION), weights, experts, gate, up, down, dtype)
    return constrain(y, ax.EMBED_ACTIVATION)
