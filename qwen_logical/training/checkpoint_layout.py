"""Moving a saved train state onto another head layout and layer form.

A checkpoint holds the arrays as the saving run laid them out: its head layout (padded query
heads, repeated KV heads) and its layer form (`layers_<i>/...` leaves, or one `layers/...` stack).
Another mesh or rule table may lay the same model out differently. Each array's logical axes are
saved with it, so a target array is rebuilt from the saved ones:

* head axes (`heads`, `kv_heads`): target head j takes the first saved head holding the same
  canonical head (copies are equal: the training step ties them), padding is zero;
* layer form: a target stack gathers the saved `layers_<i>` leaves; a target `layers_<i>` leaf
  takes slice i of a saved stack.

Arrays are restored in shardings that fit their saved shapes on the target mesh (the target
table's split where it divides, else replicated along that dimension) and converted there.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_logical.model import axes as ax
from qwen_logical.model.head_layout import KV, PADDING, QUERY, HeadLayout
from qwen_logical.sharding import tree_paths

_KINDS = {ax.HEADS: QUERY, ax.KV_HEADS: KV}


def fitting_sharding(shape: Sequence[int], names: Sequence[str | None], partitioner) -> jax.sharding.Sharding:
  """The rule table's sharding of logical `names`, replicated along each dimension it does not divide."""
  rules = partitioner.table.rules
  spec = tuple(nn.logical_to_mesh_axes(tuple(names), rules))
  spec += (None,) * (len(shape) - len(spec))
  names = tuple(names) + (None,) * (len(shape) - len(names))
  fitted = []
  for size, entry, name in zip(shape, spec, names):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    count = int(np.prod([partitioner.mesh_shape[a] for a in axes])) if axes else 1
    fitted.append(name if size % count == 0 else None)
  return partitioner.sharding(fitted)


def head_map(saved: HeadLayout, target: HeadLayout, kind: str) -> tuple[np.ndarray, np.ndarray]:
  """(saved index, keep) per target head of `kind`: the first saved head with the same canonical
  head, and False where the target head is padding."""
  saved_source, target_source = saved.source(kind), target.source(kind)
  first = {int(s): i for i, s in reversed(list(enumerate(saved_source))) if s != PADDING}
  keep = target_source != PADDING
  index = np.array([first[int(s)] if s != PADDING else 0 for s in target_source], np.int32)
  return index, keep


def relayout_heads(x: jax.Array, names: Sequence[str | None], saved: HeadLayout, target: HeadLayout) -> jax.Array:
  """`x` with each head axis moved from the saved head layout to the target's."""
  for dim, name in enumerate(names):
    kind = _KINDS.get(name)
    if kind is None or np.array_equal(saved.source(kind), target.source(kind)):
      continue
    index, keep = head_map(saved, target, kind)
    x = jnp.take(x, jnp.asarray(index), axis=dim)
    shape = [1] * x.ndim
    shape[dim] = keep.size
    x = x * jnp.asarray(keep.reshape(shape), x.dtype)
  return x


def _saved_source(path: str, saved: Mapping[str, jax.Array], num_layers: int):
  """(the saved arrays that make target `path` as [(saved path, slice index or None)], whether they
  are stacked): one per layer for a target stack of saved `layers_<i>` leaves, else one. None if the
  checkpoint has no such array."""
  if path in saved:
    return [(path, None)], False
  position, layer = tree_paths.layer_position(path)
  if position is None:
    return None
  if layer is not None:  # a target layers_<i> leaf from a saved stack
    stacked = tree_paths.with_layer(path, tree_paths.STACK)
    return ([(stacked, layer)], False) if stacked in saved else None
  pieces = [tree_paths.with_layer(path, tree_paths.layer_key(i)) for i in range(num_layers)]
  return ([(p, None) for p in pieces], True) if all(p in saved for p in pieces) else None


def convert(saved: Mapping[str, jax.Array], saved_axes: Mapping[str, Sequence], saved_layout: HeadLayout,
            target: Mapping[str, jax.ShapeDtypeStruct], target_layout: HeadLayout,
            num_layers: int) -> tuple[dict, list[str]]:
  """({target path: array in its target sharding}, problems) for every target array that can be
  made from the saved ones; problems name the others (missing, or another shape or dtype)."""
  out, problems = {}, []
  for path, struct in target.items():
    found = _saved_source(path, saved, num_layers)
    if found is None:
      problems.append(f"{path} {tuple(struct.shape)}: not in the checkpoint")
      continue
    sources, stack = found
    pieces = []
    for source, index in sources:
      x, names = saved[source], list(saved_axes[source])
      if index is not None:
        x, names = x[index], names[1:]
      pieces.append(relayout_heads(x, names, saved_layout, target_layout))
    value = jnp.stack(pieces) if stack else pieces[0]
    if tuple(value.shape) != tuple(struct.shape) or value.dtype != struct.dtype:
      problems.append(f"{path}: checkpoint {tuple(value.shape)} {value.dtype}, this run "
                      f"{tuple(struct.shape)} {struct.dtype}")
      continue
    out[path] = jax.device_put(value, struct.sharding)
  return out, problems
