"""The head layout plan: how attention heads are laid out so that they split over T shards.

Qwen2.5-7B has 28 query / 4 KV heads and 0.5B has 14 / 2; neither splits 8 ways.
With K KV heads, G = H / K query heads per group and T shards of the heads axis:

* K % T == 0: nothing to do (every shard holds whole groups).
* T % K == 0: repeat each KV head r = T / K times and pad each query group with
  zero heads up to G_pad = r * ceil(G / r), so every shard holds G_pad / r query
  heads and exactly one KV head. Padded heads have zero q/k-side weights and zero
  rows in o_proj, so the output is exactly that of the unpadded model.
* otherwise: no exact layout exists; `HeadLayoutError` lists the options.

The plan is applied in one place (`to_layout` / `from_layout`) to canonical,
HF-shaped head dimensions, for random init and checkpoints alike.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from qwen_logical.common.errors import QwenLogicalError

PADDING = -1  # source index of a zero (padded) query head


class HeadLayoutError(QwenLogicalError):
  """The heads cannot be split over the requested number of shards."""


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
  def layout_num_heads(self) -> int:
    return self.num_kv_heads * self.padded_group_size

  @property
  def layout_num_kv_heads(self) -> int:
    return self.num_kv_heads * self.kv_repeat

  @property
  def is_identity(self) -> bool:
    return self.kv_repeat == 1 and self.padded_group_size == self.group_size

  def query_head_source(self) -> np.ndarray:
    """int[layout_num_heads]: the canonical query head of each layout head, PADDING for zeros."""
    source = np.full(self.layout_num_heads, PADDING, dtype=np.int64)
    for group in range(self.num_kv_heads):
      for member in range(self.group_size):
        source[group * self.padded_group_size + member] = group * self.group_size + member
    return source

  def kv_head_source(self) -> np.ndarray:
    """int[layout_num_kv_heads]: the canonical KV head of each layout KV head."""
    return np.repeat(np.arange(self.num_kv_heads), self.kv_repeat)

  def describe(self) -> str:
    if self.is_identity:
      return (f"heads {self.num_heads} query / {self.num_kv_heads} KV split {self.shards} ways "
              "as they are (no padding, no repetition)")
    return (f"heads {self.num_heads} query / {self.num_kv_heads} KV on {self.shards} shards: "
            f"KV heads repeated x{self.kv_repeat} -> {self.layout_num_kv_heads}, query groups "
            f"padded {self.group_size} -> {self.padded_group_size} -> {self.layout_num_heads} "
            f"query heads; attention cost x{self.layout_num_heads / self.num_heads:.3f} "
            f"(q/o projections and scores), KV projections and cache x{self.kv_repeat}")

  # --- applying the plan to arrays -------------------------------------------------
  def to_layout(self, array: np.ndarray, axis: int, kind: str) -> np.ndarray:
    """Maps a canonical head axis (`kind` 'query' or 'kv') to the layout; padding is zeros."""
    if kind == "kv":
      return np.take(array, self.kv_head_source(), axis=axis)
    if kind != "query":
      raise ValueError(f"kind must be 'query' or 'kv', got {kind!r}")
    source = self.query_head_source()
    out = np.take(array, np.maximum(source, 0), axis=axis)
    mask_shape = [1] * array.ndim
    mask_shape[axis] = source.size
    return np.where((source != PADDING).reshape(mask_shape), out, np.zeros((), array.dtype))

  def from_layout(self, array: np.ndarray, axis: int, kind: str) -> np.ndarray:
    """Inverse of `to_layout`: keeps the first copy of each KV head, drops padded query heads."""
    if kind == "kv":
      keep = np.arange(self.num_kv_heads) * self.kv_repeat
    elif kind == "query":
      keep = np.nonzero(self.query_head_source() != PADDING)[0]
    else:
      raise ValueError(f"kind must be 'query' or 'kv', got {kind!r}")
    return np.take(array, keep, axis=axis)


def plan_heads(num_heads: int, num_kv_heads: int, shards: int) -> HeadLayout:
  """The layout that splits (num_heads, num_kv_heads) over `shards` exactly."""
  if shards <= 0 or num_heads % num_kv_heads:
    raise HeadLayoutError(f"Invalid head split: {num_heads} query / {num_kv_heads} KV heads, {shards} shards.")
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
      f"(e.g. --config.mesh=1x{max(d for d in divisors if d <= shards)}), or a rule table that does "
      "not shard heads (--config.rules=fsdp or data_parallel).")
