"""Checks a rule table against a mesh and a model's arrays before anything compiles.

Flax resolves rules leniently (an axis used twice silently falls through, a
non-divisible constraint silently replicates); these checks turn each of those
into an error naming the array, the dimension and the remedy.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

from qwen_logical.model import axes as ax
from qwen_logical.sharding.rules import RuleError, RuleTable, format_mesh_axes

_REMEDY = ("pick another rule table (--config.rules=...), another mesh shape (--config.mesh=...), "
           "or override the entry (--config.rule_overrides='{name}=None' replicates it)")


def check_table(table: RuleTable, mesh_shape: Mapping[str, int]) -> None:
  """Names and mesh axes: every vocabulary name has a rule, every rule a known name and mesh axes."""
  problems = []
  names = [name for name, _ in table.rules]
  unknown = [n for n in names if n not in ax.ALL_AXES]
  if unknown:
    problems.append(f"rule(s) for unknown logical name(s) {unknown} (known: {', '.join(ax.ALL_AXES)})")
  missing = [n for n in ax.ALL_AXES if n not in names]
  if missing:
    problems.append(f"no rule for logical name(s) {missing} the model uses; add them "
                    "(None to replicate)")
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    problems.append(f"logical name(s) {repeated} have more than one rule; give each exactly one")
  for name in names:
    for mesh_axis in table.mesh_axes(name):
      if mesh_axis not in mesh_shape:
        problems.append(f"rule {name} -> {mesh_axis!r} names a mesh axis the mesh lacks "
                        f"(mesh axes: {', '.join(mesh_shape)})")
  head_rules = {n: table.mesh_axes(n) for n in ax.HEAD_CARRYING_AXES}
  if len(set(head_rules.values())) > 1:
    shown = ", ".join(f"{n}={format_mesh_axes(v or None)}" for n, v in head_rules.items())
    problems.append(f"head-carrying axes must be split alike ({shown}); the head layout plan is "
                    "computed from one split")
  if problems:
    raise RuleError(f"Rule table {table.name!r} does not fit mesh "
                    f"{dict(mesh_shape)}:\n  - " + "\n  - ".join(problems))


def mesh_axes_size(mesh_shape: Mapping[str, int], mesh_axes: Iterable[str]) -> int:
  return math.prod(mesh_shape[a] for a in mesh_axes)


def check_array(label: str, shape: Sequence[int], logical: Sequence[str | None],
                table: RuleTable, mesh_shape: Mapping[str, int]) -> list[str]:
  """Problems with sharding one array of `shape` named `logical` by `table` (empty: fits)."""
  problems = []
  if len(shape) != len(logical):
    return [f"{label}: {len(logical)} logical names {tuple(logical)} for a rank-{len(shape)} array"]
  used: dict[str, str] = {}
  for dim, (size, name) in enumerate(zip(shape, logical)):
    if name is None:
      continue
    if name not in ax.ALL_AXES:
      problems.append(f"{label}: dimension {dim} uses unknown logical name {name!r}")
      continue
    mesh_axes = table.mesh_axes(name)
    for mesh_axis in mesh_axes:
      if mesh_axis in used:
        problems.append(
            f"{label}: mesh axis {mesh_axis!r} is used twice in one spec ({used[mesh_axis]} and "
            f"{name} both map to it); Flax would silently leave one unsharded. Map one of them "
            "to another mesh axis or None")
      used[mesh_axis] = name
    shards = mesh_axes_size(mesh_shape, [a for a in mesh_axes if a in mesh_shape])
    if size % shards:
      problems.append(
          f"{label}: dimension {dim} ({name}) has size {size}, not divisible by the "
          f"{shards} devices of mesh axes {format_mesh_axes(mesh_axes or None)}; "
          + _REMEDY.format(name=name))
  return problems


def raise_if(problems: list[str], table: RuleTable, mesh_shape: Mapping[str, int]) -> None:
  if problems:
    raise RuleError(f"Rule table {table.name!r} does not fit mesh {dict(mesh_shape)}:\n  - "
                    + "\n  - ".join(problems))
