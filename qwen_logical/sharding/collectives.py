"""Counts the collectives in compiled HLO text (what a rule table costs in communication)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
                "s8": 1, "u8": 1, "pred": 1, "s16": 2, "u16": 2}
# e.g. "%all-reduce.3 = f32[8,12,112]{2,1,0} all-reduce(...)" or async "...-start(".
_OP = re.compile(r"=\s*(?P<shape>\(?[^=]*?\)?)\s+(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\(")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
# A computation starts at an unindented line: "%name (params) -> type {" or "ENTRY %name ...".
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[^\s(]+)")
_CALLEE = re.compile(r"\b(?P<how>body|condition|calls|to_apply|true_computation|false_computation)=%(?P<name>[^\s,})]+)")
_BRANCHES = re.compile(r"branch_computations=\{(?P<names>[^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')


def shape_bytes(shape_text: str) -> int:
  """Bytes of the arrays in an HLO shape's text, e.g. 'f32[8,128]{1,0}' or a tuple of them."""
  total = 0
  for m in _ARRAY.finditer(shape_text):
    dims = [int(d) for d in m["dims"].split(",") if d]
    total += int(np.prod(dims, dtype=np.int64)) * _DTYPE_BYTES.get(m["dtype"], 4)
  return total


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {'count': n, 'bytes': b}} per execution of the compiled module.

  `count` is how many times each kind of collective runs: one inside a while loop
  with a known trip count (scanned layers) counts once per iteration. `bytes` is the
  result size per device, summed over those runs. A loop whose trip count XLA does
  not state is counted once per appearance.
  """
  ops: dict[str, Counter] = defaultdict(Counter)
  sizes: dict[str, Counter] = defaultdict(Counter)
  calls: dict[str, list[tuple[str, int]]] = defaultdict(list)  # caller -> [(callee, times)]
  entry, current = None, ""  # "": text outside any computation (a fragment, not a module)
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      m = _COMPUTATION.match(line)
      if m:
        current = m["name"]
        if line.startswith("ENTRY"):
          entry = current
      continue
    op = _OP.search(line)
    if op:
      ops[current][op["kind"]] += 1
      sizes[current][op["kind"]] += shape_bytes(op["shape"])
    trip = _TRIP_COUNT.search(line)
    for callee in _CALLEE.finditer(line):
      times = int(trip["n"]) if trip and callee["how"] in ("body", "condition") else 1
      calls[current].append((callee["name"], times))
    branches = _BRANCHES.search(line)
    if branches:
      calls[current] += [(n.strip().lstrip("%"), 1) for n in branches["names"].split(",") if n.strip()]

  runs: Counter = Counter()

  def visit(name: str, times: int, depth: int = 0) -> None:
    if depth > 64:  # HLO has no recursion; this only guards malformed text
      return
    runs[name] += times
    for callee, per_call in calls.get(name, ()):
      visit(callee, times * per_call, depth + 1)

  if entry is not None:
    visit(entry, 1)
  else:  # not a full module: count each appearance once
    runs.update({name: 1 for name in ops})
  counts: Counter = Counter()
  total_bytes: Counter = Counter()
  for name, kinds in ops.items():
    for kind, n in kinds.items():
      counts[kind] += n * runs[name]
      total_bytes[kind] += sizes[name][kind] * runs[name]
  return {kind: {"count": counts[kind], "bytes": total_bytes[kind]} for kind in KINDS}
