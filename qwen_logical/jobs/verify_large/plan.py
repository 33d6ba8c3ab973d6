"""What the large-model verification runs: its combinations (config data) and the verdict's settings.

config.verify.combinations lists the runs, comma-separated, each

    MESH:TABLE[:int8][:NAME=AXES,...]     e.g. "1x8:tensor_parallel,2x4:tensor_parallel:int8,
                                                8x1:fsdp:int8:activation_batch=None"

MESH is batch x model, TABLE a rule table, `int8` stores the weights int8 (compared with the
1x1 int8 reference; without it they are stored as --config.model.quantization says, and
compared with the 1x1 reference stored the same way), and
NAME=AXES entries are rule overrides for this combination alone, applied after
--config.rule_overrides. A comma starts a new combination only where MESH: follows it.
"""

from __future__ import annotations

import dataclasses
import re

from ml_collections import ConfigDict

from qwen_logical.jobs.common.build import JobError
from qwen_logical.jobs.verify.verdict import Tolerances
from qwen_logical.model.quantization import INT8
from qwen_logical.sharding.mesh import parse_mesh_shape
from qwen_logical.sharding.rules import get_table, parse_overrides

FLAG = "--config.verify.combinations"
_NEXT_COMBINATION = re.compile(r",\s*(?=\d+\s*[xX*]\s*\d+\s*:)")
REFERENCE_MESH = "1x1"
REFERENCE_TABLE = "tensor_parallel"  # on one device every table is the same


@dataclasses.dataclass(frozen=True)
class Combination:
  """One run: a mesh, a rule table (with its own overrides) and the weights' storage."""

  mesh: str
  table: str
  quantization: str = ""  # "" (weights in param_dtype) or "int8"
  overrides: str = ""  # 'name=axes,...' for this combination only

  @property
  def devices(self) -> int:
    batch, model = parse_mesh_shape(self.mesh)
    return batch * model

  @property
  def rules_label(self) -> str:
    """The table as reports show it: 'tp_fsdp[activation_batch=None]'."""
    return self.table + (f"[{self.overrides}]" if self.overrides else "")

  @property
  def label(self) -> str:
    return f"{self.mesh} {self.rules_label}" + (f" {self.quantization}" if self.quantization else "")

  def rule_overrides(self, global_overrides: str) -> dict:
    """--config.rule_overrides, then this combination's own."""
    return {**parse_overrides(global_overrides), **parse_overrides(self.overrides)}


def reference_for(quantization: str) -> Combination:
  return Combination(REFERENCE_MESH, REFERENCE_TABLE, quantization)


def parse_combination(text: str, quantization: str = "") -> Combination:
  """'2x4:tp_fsdp:int8:activation_batch=None' -> Combination; JobError naming the flag otherwise.

  Without an `int8` field the weights are stored as `quantization` (--config.model.quantization).
  """
  fields = [f.strip() for f in text.split(":")]
  if len(fields) < 2 or not fields[1]:
    raise JobError(f"{FLAG}: {text!r} is not MESH:TABLE[:int8][:NAME=AXES,...], e.g. '2x4:tp_fsdp:int8'.")
  parse_mesh_shape(fields[0])
  overrides = ""
  for field in fields[2:]:
    if field == INT8:
      quantization = INT8
    elif "=" in field:
      overrides = field
    else:
      raise JobError(f"{FLAG}: field {field!r} of {text!r} is neither 'int8' nor rule overrides "
                     "('name=axes,...'); the form is MESH:TABLE[:int8][:NAME=AXES,...].")
  combination = Combination(fields[0], fields[1], quantization, overrides)
  get_table(combination.table, combination.rule_overrides(""))  # an unknown table or axis fails now, not later
  return combination


def parse_combinations(text: str, quantization: str = "") -> tuple[Combination, ...]:
  parts = [part for part in _NEXT_COMBINATION.split(text.strip()) if part.strip()]
  combinations = tuple(parse_combination(part, quantization) for part in parts)
  if not combinations:
    raise JobError(f"{FLAG} is empty; list runs such as '1x8:tensor_parallel,2x4:tp_fsdp'.")
  return combinations


@dataclasses.dataclass(frozen=True)
class Plan:
  """The combinations, the forward batch, the host-memory fraction and the verdict's tolerances."""

  combinations: tuple[Combination, ...]
  batch_size: int
  seq_len: int
  host_memory_fraction: float
  tolerances: Tolerances
  keep_dir: str  # where the logits stay after the job ("" = a temporary directory, removed)

  @classmethod
  def from_config(cls, config: ConfigDict) -> "Plan":
    v = config.verify
    if not 0 < v.host_memory_fraction <= 1:
      raise JobError(f"--config.verify.host_memory_fraction={v.host_memory_fraction} must be in (0, 1].")
    tolerances = Tolerances(rtol=v.rtol, atol=v.atol, min_pcc=v.min_pcc, max_kl=v.max_kl, top_k=v.top_k,
                            min_top_k_overlap=v.min_top_k_overlap)
    combinations = parse_combinations(v.combinations, config.model.get("quantization", ""))
    return cls(combinations, v.batch_size, v.seq_len, v.host_memory_fraction, tolerances, v.get("keep_dir", ""))

  @property
  def references(self) -> tuple[Combination, ...]:
    """One 1x1 reference per weight storage the combinations use, in order of first use."""
    storages = dict.fromkeys(c.quantization for c in self.combinations)
    return tuple(reference_for(q) for q in storages)
