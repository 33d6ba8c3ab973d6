"""Counts the collectives in compiled HLO text (what a rule table costs in communication)."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
                "s8": 1, "u8": 1, "pred": 1, "s16": 2, "u16": 2}
# e.g. "%all-reduce.3 = f32[8,12,112]{2,1,0} all-reduce(...)" or async "...-start(".
_OP = re.compile(r"=\s*(?P<shape>\(?[^=]*?\)?)\s+(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\(")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


def _bytes(shape_text: str) -> int:
  total = 0
  for m in _ARRAY.finditer(shape_text):
    dims = [int(d) for d in m["dims"].split(",") if d]
    total += int(np.prod(dims, dtype=np.int64)) * _DTYPE_BYTES.get(m["dtype"], 4)
  return total


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {'count': n, 'bytes': result bytes per device}} over every computation in the module.

  A collective inside a while body (scanned layers) is counted once, as it appears.
  """
  counts: Counter = Counter()
  sizes: Counter = Counter()
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if m:
      counts[m["kind"]] += 1
      sizes[m["kind"]] += _bytes(m["shape"])
  return {kind: {"count": counts[kind], "bytes": sizes[kind]} for kind in KINDS}

