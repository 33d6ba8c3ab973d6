"""Parameter paths: pytree key paths as names, and the layer a path belongs to.

The one owner of `layers_<i>` parsing. Unrolled layers are the top-level modules `layers_0`,
`layers_1`, ...; scanned layers are one stack, `layers`, whose leading axis is the layer. A path is
a '/'-joined string ('layers_3/mlp/up_kernel'), a tuple of its keys, or a pytree key path; the
layer component may sit anywhere in it (an optimizer moment's path ends with its parameter's).
"""

from __future__ import annotations

import re

STACK = "layers"  # the scanned layers' module (its leaves lead with the `layers` logical axis)
_UNROLLED = re.compile(r"layers_(\d+)")


def path_keys(path) -> tuple[str, ...]:
  """A pytree key path as its dict keys, e.g. ('layers', 'attention', 'q_kernel')."""
  return tuple(str(getattr(k, "key", k)) for k in path)


def path_str(path) -> str:
  """A pytree key path as 'layers/attention/q_kernel'."""
  return "/".join(path_keys(path))


def _parts(path) -> tuple[str, ...]:
  return tuple(path.split("/")) if isinstance(path, str) else path_keys(path)


def layer_key(index: int | str) -> str:
  """The module of unrolled layer `index`: 3 -> 'layers_3' ('*' -> 'layers_*', any layer in a summary)."""
  return f"layers_{index}"


def layer_position(path) -> tuple[int | None, int | None]:
  """(which component of `path` names its layer, that layer's index): (0, 3) for
  'layers_3/mlp/up_kernel', (0, None) for the scanned stack 'layers/mlp/up_kernel', (None, None)
  for a path outside the layers ('final_norm/scale')."""
  for position, part in enumerate(_parts(path)):
    match = _UNROLLED.fullmatch(part)
    if match:
      return position, int(match[1])
    if part == STACK:
      return position, None
  return None, None


def layer_index(path) -> int | None:
  """The unrolled layer of `path`: 'layers_3/mlp/up_kernel' -> 3; None for the scanned stack and
  for paths outside the layers."""
  return layer_position(path)[1]


def with_layer(path, component: str) -> str:
  """`path` (with a layer component) with that component replaced: a layer_key or STACK."""
  parts = list(_parts(path))
  position, _ = layer_position(parts)
  if position is None:
    raise ValueError(f"parameter path {'/'.join(parts)!r} names no layer")
  parts[position] = component
  return "/".join(parts)


def within_layer(path) -> str:
  """`path` below its layer component: 'layers_3/mlp/up_kernel' and 'layers/mlp/up_kernel' ->
  'mlp/up_kernel'; a path outside the layers '/'-joined, unchanged."""
  parts = _parts(path)
  position, _ = layer_position(parts)
  return "/".join(parts if position is None else parts[position + 1:])


def layer_kind_path(path) -> str:
  """The path of the layer's kind, as one init program or a scanned stack names it:
  'layers_3/mlp/up_kernel' -> 'layers/mlp/up_kernel'; any other path '/'-joined, unchanged."""
  return with_layer(path, STACK) if layer_index(path) is not None else "/".join(_parts(path))
