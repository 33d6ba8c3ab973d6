"""Rule tables: plain data mapping each logical axis name to mesh axes.

A table is an ordered tuple of `(logical_name, mesh_axes)` where `mesh_axes` is
a mesh axis name, a tuple of them (sharded over their product), or None
(replicated). Tables name the mesh axes of `qwen_logical.mesh` and nothing else;
`validation.py` checks a table against a model and a mesh before anything compiles.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence, Union

from qwen_logical.model import axes as ax
from qwen_logical.sharding.mesh import BATCH, MODEL
from qwen_logical.common.errors import QwenLogicalError

MeshAxes = Union[None, str, tuple[str, ...]]


class RuleError(QwenLogicalError):
  """A rule table that is malformed, unknown, or does not fit the model and mesh."""


@dataclasses.dataclass(frozen=True)
class RuleTable:
  """A named rule table. `rules` is what `flax.linen.logical_axis_rules` takes."""

  name: str
  rules: tuple[tuple[str, MeshAxes], ...]
  description: str = ""
  # What the strategy promises: parameter axes it shards, as (logical name, mesh axes).
  # Overrides keep the promise, so the verification suite can flag an override that
  # silently replicates what the table claims to split.
  claims: tuple[tuple[str, MeshAxes], ...] = ()

  def mapping(self) -> dict[str, MeshAxes]:
    return dict(self.rules)

  def mesh_axes(self, logical_name: str) -> tuple[str, ...]:
    """The mesh axes `logical_name` is sharded over, as a tuple (empty: replicated)."""
    return as_axes(self.mapping().get(logical_name))

  def claimed_axes(self, logical_name: str) -> tuple[str, ...]:
    """The mesh axes this strategy claims to shard parameter axis `logical_name` over."""
    return as_axes(dict(self.claims).get(logical_name))

  def with_overrides(self, overrides: Mapping[str, MeshAxes]) -> "RuleTable":
    """A copy with some entries replaced; every overridden name must be in the vocabulary."""
    unknown = sorted(set(overrides) - set(ax.ALL_AXES))
    if unknown:
      raise RuleError(f"Rule override(s) for unknown logical axis name(s) {unknown}; "
                      f"known names: {', '.join(ax.ALL_AXES)}.")
    if not overrides:
      return self
    rules = tuple((name, _normalize(overrides[name]) if name in overrides else value)
                  for name, value in self.rules)
    known = {name for name, _ in rules}
    rules += tuple((name, _normalize(v)) for name, v in overrides.items() if name not in known)
    desc = ", ".join(f"{k}={format_mesh_axes(_normalize(v))}" for k, v in overrides.items())
    return RuleTable(f"{self.name}+overrides", rules, f"{self.description} (overridden: {desc})",
                     self.claims)


def as_axes(value: MeshAxes | Sequence[str]) -> tuple[str, ...]:
  """Mesh axes as a tuple, from a rule value or a PartitionSpec entry (None -> (), 'model' -> ('model',))."""
  if value is None:
    return ()
  return (value,) if isinstance(value, str) else tuple(value)


def _normalize(value: MeshAxes | Sequence[str]) -> MeshAxes:
  if value is None or isinstance(value, str):
    return None if value in (None, "", "None", "none") else value
  value = tuple(value)
  if not value:
    return None
  return value[0] if len(value) == 1 else value


def format_mesh_axes(value: MeshAxes) -> str:
  if value is None:
    return "None"
  return value if isinstance(value, str) else "+".join(value)


def _table(name: str, description: str, **entries: MeshAxes) -> RuleTable:
  missing = set(ax.ALL_AXES) - set(entries)
  assert not missing, f"table {name} lacks {missing}"
  claims = tuple((k, entries[k]) for k in ax.PARAMETER_AXES if entries[k] is not None)
  return RuleTable(name, tuple((k, entries[k]) for k in ax.ALL_AXES), description, claims)


# Every name starts replicated; lora_rank (LoRA adapters' rank, a few dozen at most) stays so in every
# table, while the adapters' in / out dimensions keep their kernel's names and split like it.
_NO_SHARDING = {name: None for name in ax.ALL_AXES}
_ALL_DEVICES = (BATCH, MODEL)

TENSOR_PARALLEL = _table(
    "tensor_parallel",
    "Megatron-style tensor parallelism over 'model' (heads, mlp, vocab and each expert's mlp split; "
    "one all-reduce after attention and one after the MLP), data parallelism over 'batch'",
    **{**_NO_SHARDING,
       ax.VOCAB: MODEL, ax.HEADS: MODEL, ax.KV_HEADS: MODEL, ax.MLP: MODEL, ax.EXPERT_MLP: MODEL,
       ax.ACTIVATION_BATCH: BATCH, ax.ACTIVATION_HEADS: MODEL, ax.ACTIVATION_KV_HEADS: MODEL,
       ax.ACTIVATION_MLP: MODEL, ax.ACTIVATION_VOCAB: MODEL,
       ax.CACHE_BATCH: BATCH, ax.CACHE_KV_HEADS: MODEL})

DATA_PARALLEL = _table(
    "data_parallel",
    "pure data parallelism: parameters replicated, the batch split over every device",
    **{**_NO_SHARDING, ax.ACTIVATION_BATCH: _ALL_DEVICES, ax.CACHE_BATCH: _ALL_DEVICES})

FSDP = _table(
    "fsdp",
    "fully sharded data parallelism: every weight split along 'embed' over every device "
    "and gathered per layer, the batch split over every device",
    **{**_NO_SHARDING, ax.EMBED: _ALL_DEVICES,
       ax.ACTIVATION_BATCH: _ALL_DEVICES, ax.CACHE_BATCH: _ALL_DEVICES})

TP_FSDP = _table(
    "tp_fsdp",
    "2-D: tensor parallelism over 'model' and FSDP over 'batch' (weights split along "
    "'embed' over 'batch' and gathered per layer)",
    **{**TENSOR_PARALLEL.mapping(), ax.EMBED: BATCH})

EXPERT_PARALLEL = _table(
    "expert_parallel",
    "expert parallelism: a mixture-of-experts layer's experts split over every device (each device "
    "runs its experts on the tokens routed to them; one all-gather of the tokens over 'batch' and "
    "one reduction of the outputs), attention and dense layers as tensor_parallel. "
    "expert=model or expert=batch (+ expert_mlp=model) in rule_overrides split them one way only",
    **{**TENSOR_PARALLEL.mapping(), ax.EXPERT: _ALL_DEVICES, ax.EXPERT_MLP: None})

TABLES: dict[str, RuleTable] = {t.name: t for t in (TENSOR_PARALLEL, DATA_PARALLEL, FSDP, TP_FSDP, EXPERT_PARALLEL)}
ALIASES = {"tp": "tensor_parallel", "megatron": "tensor_parallel", "dp": "data_parallel",
           "2d": "tp_fsdp", "tp+fsdp": "tp_fsdp", "ep": "expert_parallel"}


def get_table(name: str, overrides: Mapping[str, MeshAxes] | str | None = None) -> RuleTable:
  """The named table (aliases allowed) with `overrides` applied."""
  key = ALIASES.get(name.lower(), name.lower())
  if key not in TABLES:
    raise RuleError(f"Unknown rule table {name!r}; known tables: {', '.join(TABLES)} "
                    f"(aliases: {', '.join(ALIASES)}).")
  if isinstance(overrides, str):
    overrides = parse_overrides(overrides)
  return TABLES[key].with_overrides(dict(overrides or {}))


def parse_overrides(text: str) -> dict[str, MeshAxes]:
  """Parses 'mlp=None,embed=batch+model' into {'mlp': None, 'embed': ('batch', 'model')}."""
  result: dict[str, MeshAxes] = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    if "=" not in item:
      raise RuleError(f"Rule override {item!r} is not 'logical_name=mesh_axis'; "
                      "e.g. --config.rule_overrides='mlp=None,embed=batch+model'.")
    name, value = (s.strip() for s in item.split("=", 1))
    result[name] = _normalize(tuple(v.strip() for v in value.split("+")) if "+" in value else value)
  return result

