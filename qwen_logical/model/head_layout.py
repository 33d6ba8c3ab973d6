"""The head layout plan: how attention heads are laid out so that they split over T shards.

Qwen2.5-7B has 28 query / 4 KV heads and 0.5B has 14 / 2; neither splits 8 ways.
With K KV heads, G = H / K query heads per group and T shards of the heads axis:

* K % T == 0: nothing to do (every shard holds whole groups).
* T % K == 0: repeat each KV head r = T / K times and pad each query group with
  zero heads up to G_pad = r * ceil(G / r), so every shard holds G_pad / r query
  heads and exactly one KV head. Padded heads have zero q-side weights and zero
  rows in o_proj, so the output is exactly that of the unpadded model.
* otherwise: no exact layout exists; `HeadLayoutError` lists the options.

The plan is one index map, `HeadLayout.source(kind)`: for each layout head of a
kind (QUERY or KV), its canonical (HF) head, or PADDING for a zero head. This
module holds the only code that moves heads, all of it read from that map:
`source` (which the random init, sharding/init.py, hashes through), `read_heads`
(checkpoint loading, slice by slice), `to_canonical` (export), and `num_layout_heads`
(every layout-shaped dimension: parameters, activations, the KV cache).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from qwen_logical.common.errors import QwenLogicalError

QUERY = "query"  # the kind of a head axis: query heads (q, o projections)
KV = "kv"  # KV heads (k, v projections and the KV cache)
KINDS = (QUERY, KV)
PADDING = -1  # source of a zero (padded) query head

Run = tuple[int, int, int]  # (start, stop, first source head or PADDING)


class HeadLayoutError(QwenLogicalError):
  """The heads cannot be split over the requested number of shards."""


def _copy(out: np.ndarray, source: np.ndarray) -> None:
  np.copyto(out, source, casting="unsafe")


@dataclasses.dataclass(frozen=True)
class HeadLayout:
  """Mesh layout of the attention heads.

  Attributes:
    num_heads: canonical query heads H.
    num_kv_heads: canonical KV heads K.
    shards: T, the number of shards of the heads axis.
    kv_repeat: r, copies of each KV head.
    padded_group_size: G_pad, query heads per KV group after padding.
  """

  num_heads: int
  num_kv_heads: int
  shards: int
  kv_repeat: int
  padded_group_size: int

  @property
  def group_size(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def is_identity(self) -> bool:
    return self.kv_repeat == 1 and self.padded_group_size == self.group_size

  # --- the index map --------------------------------------------------------------
  def source(self, kind: str) -> np.ndarray:
    """int[layout heads of `kind`]: the canonical head each layout head holds, PADDING for zeros.

    Query: group g's members sit at g * G_pad + [0, G), padding after them, so layout
    query head j attends with layout KV head j // (G_pad / r) of the same group.
    KV: each canonical head r times in a row.
    """
    if kind == KV:
      return np.repeat(np.arange(self.num_kv_heads), self.kv_repeat)
    if kind != QUERY:
      raise ValueError(f"head kind must be {QUERY!r} or {KV!r}, got {kind!r}")
    member = np.arange(self.padded_group_size)[None, :]
    first = (np.arange(self.num_kv_heads) * self.group_size)[:, None]
    return np.where(member < self.group_size, first + member, PADDING).reshape(-1)

  def num_layout_heads(self, kind: str) -> int:
    """Size of a layout head axis of `kind` (parameters, activations and the KV cache)."""
    return self.source(kind).size

  @property
  def layout_num_heads(self) -> int:
    return self.num_layout_heads(QUERY)

  @property
  def layout_num_kv_heads(self) -> int:
    return self.num_layout_heads(KV)

  def describe(self) -> str:
    if self.is_identity:
      return (f"heads {self.num_heads} query / {self.num_kv_heads} KV split {self.shards} ways "
              "as they are (no padding, no repetition)")
    return (f"heads {self.num_heads} query / {self.num_kv_heads} KV on {self.shards} shards: "
            f"KV heads repeated x{self.kv_repeat} -> {self.layout_num_kv_heads}, query groups "
            f"padded {self.group_size} -> {self.padded_group_size} -> {self.layout_num_heads} "
            f"query heads; attention cost x{self.layout_num_heads / self.num_heads:.3f} "
            f"(q/o projections and scores), KV projections and cache x{self.kv_repeat}")

  # --- moving heads: load, export --------------------------------------------------
  def runs(self, kind: str, heads: slice = slice(None)) -> list[Run]:
    """Maximal runs of the layout heads `heads` that copy consecutive canonical heads (or pad).

    Returns (start, stop, first canonical head or PADDING) with start/stop counted from
    heads.start: layout heads [start, stop) of the slice hold canonical heads
    [first, first + stop - start), or zeros.
    """
    runs: list[Run] = []
    for position, head in enumerate(self.source(kind)[heads].tolist()):
      if runs:
        start, stop, first = runs[-1]
        if (head == PADDING) == (first == PADDING) and (head == PADDING or head == first + stop - start):
          runs[-1] = (start, position + 1, first)
          continue
      runs.append((position, position + 1, head))
    return runs

  def read_heads(self, kind: str, canonical: np.ndarray, axis: int, heads: slice, out: np.ndarray,
                 copy: Callable[[np.ndarray, np.ndarray], None] = _copy) -> None:
    """Writes layout heads `heads` (along `axis`) of a canonical array into `out`.

    `canonical` holds the canonical heads on `axis` (any other dimensions already sliced
    to `out`'s); it may be a memory map: only the heads the slice needs are read, one
    contiguous run at a time. `copy(target, source)` converts the dtype.
    """
    before = (slice(None),) * axis
    for start, stop, first in self.runs(kind, heads):
      target = out[before + (slice(start, stop),)]
      if first == PADDING:
        target[...] = 0
      else:
        copy(target, canonical[before + (slice(first, first + stop - start),)])

  def to_canonical(self, kind: str, array: np.ndarray, axis: int) -> np.ndarray:
    """Layout head axis -> canonical: the first layout copy of each canonical head, padding dropped."""
    heads, first_copy = np.unique(self.source(kind), return_index=True)
    return np.take(array, first_copy[heads != PADDING], axis=axis)


def plan_heads(num_heads: int, num_kv_heads: int, shards: int) -> HeadLayout:
  """The layout that splits (num_heads, num_kv_heads) over `shards` exactly."""
  if shards <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
    raise HeadLayoutError(f"Invalid head split: {num_heads} query / {num_kv_heads} KV heads, {shards} "
                          "shards; query heads must be a multiple of KV heads and shards positive.")
  group = num_heads // num_kv_heads
  if num_kv_heads % shards == 0:
    return HeadLayout(num_heads, num_kv_heads, shards, kv_repeat=1, padded_group_size=group)
  if shards % num_kv_heads == 0:
    repeat = shards // num_kv_heads
    return HeadLayout(num_heads, num_kv_heads, shards, kv_repeat=repeat,
                      padded_group_size=repeat * math.ceil(group / repeat))
  divisors = [d for d in range(1, shards + 1) if num_kv_heads % d == 0 or d % num_kv_heads == 0]
  raise HeadLayoutError(
      f"{num_kv_heads} KV heads cannot be split exactly over {shards} shards of the heads axis "
      f"(neither divides the other). Options: a mesh whose heads axis has one of {divisors} devices "
      f"(e.g. --config.mesh=1x{max(divisors)}), or a rule table that does "
      "not shard heads (--config.rules=fsdp or data_parallel).")
