"""Gradients through the head layout: the model stays the canonical one after every step.

When the heads do not divide the model axis the layout pads query groups with zero heads and
repeats KV heads (`model.head_layout`). The loss of the layout model equals the canonical model's,
but its raw gradient does not keep that true: o_proj's padded rows get a gradient (the padded heads
attend uniformly, their outputs are not zero), and the copies of a KV head get different gradients.
`tie_gradients` maps the layout gradient to the gradient of the canonical model under the layout's
parameter tying: each layout head receives the sum over every layout head with the same canonical
source, padded heads receive zero. `canonical_norm` is the canonical gradient's global norm (each
copy counted once), so clipping is the same on every mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from qwen_logical.model import axes as ax
from qwen_logical.model.head_layout import KV, PADDING, QUERY, HeadLayout

_KINDS = {ax.HEADS: QUERY, ax.KV_HEADS: KV}


def tie_matrix(layout: HeadLayout, kind: str) -> np.ndarray:
  """f32[N, N] over the layout heads of `kind`: 1 where both heads hold the same canonical head."""
  source = layout.source(kind)
  return ((source[:, None] == source[None, :]) & (source[:, None] != PADDING)).astype(np.float32)


def copy_weights(layout: HeadLayout, kind: str) -> np.ndarray:
  """f32[N]: 1 / (copies of the head's canonical head), 0 for padding (each canonical head counts once)."""
  source = layout.source(kind)
  counts = np.array([np.sum(source == s) for s in source], np.float32)
  return np.where(source == PADDING, 0.0, 1.0 / counts).astype(np.float32)


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def _head_dims(spec: PartitionSpec) -> list[tuple[int, str]]:
  return [(dim, _KINDS[name]) for dim, name in enumerate(tuple(spec)) if name in _KINDS]


def _along(x: jax.Array, dim: int, vector: np.ndarray) -> jax.Array:
  shape = [1] * x.ndim
  shape[dim] = vector.size
  return jnp.asarray(vector).reshape(shape)


def tie_gradients(grads, logical_specs, layout: HeadLayout):
  """Layout gradients -> the canonical model's gradient laid out again (see the module docstring).

  `logical_specs`: tree of PartitionSpec of logical names, the structure of `grads`. A no-op when
  the layout is the identity.
  """
  if layout.is_identity:
    return grads

  def tie(spec, g):
    for dim, kind in _head_dims(spec):
      matrix = tie_matrix(layout, kind)
      if not np.array_equal(matrix, np.eye(len(matrix), dtype=np.float32)):
        g = jnp.moveaxis(jnp.tensordot(g, jnp.asarray(matrix, g.dtype), axes=[[dim], [0]]), -1, dim)
    return g

  return jax.tree_util.tree_map(tie, logical_specs, grads, is_leaf=_is_spec)


def canonical_norm(grads, logical_specs, layout: HeadLayout) -> jax.Array:
  """f32[]: the global norm of tied layout gradients as the canonical model counts it."""

  def squares(spec, g):
    g2 = jnp.square(g.astype(jnp.float32))
    if not layout.is_identity:
      for dim, kind in _head_dims(spec):
        g2 = g2 * _along(g2, dim, copy_weights(layout, kind))
    return jnp.sum(g2)

  leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      squares, logical_specs, grads, is_leaf=_is_spec))
  return jnp.sqrt(sum(leaves, jnp.zeros((), jnp.float32)))
