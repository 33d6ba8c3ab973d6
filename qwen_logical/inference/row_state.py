"""Per-row decode state: what each cache row feeds next, where, how it draws, when it stops."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from qwen_logical.inference.batch_plan import STOP_SLOTS


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowState:
  """What each of n rows decodes next (host numpy or device arrays, all [n] but stops [n, T])."""

  tokens: np.ndarray  # i32: the token to feed next
  index: np.ndarray  # i32: its slot and position (the row holds tokens at slots [0, index))
  seeds: np.ndarray  # u32
  streams: np.ndarray  # i32: the key stream within the seed (generate: the batch row; serving: 0)
  steps: np.ndarray  # i32: tokens drawn so far (the next draw's step)
  budget: np.ndarray  # i32: tokens the row may still draw (0: not running)
  temperature: np.ndarray  # f32
  top_k: np.ndarray  # i32
  top_p: np.ndarray  # f32
  stops: np.ndarray  # i32[n, T]: ids that end the row (-1 pads)

  @classmethod
  def empty(cls, rows: int, stop_slots: int = STOP_SLOTS) -> "RowState":
    zeros = lambda dtype: np.zeros(rows, dtype)
    return cls(zeros(np.int32), zeros(np.int32), zeros(np.uint32), zeros(np.int32), zeros(np.int32),
               zeros(np.int32), zeros(np.float32), zeros(np.int32), np.ones(rows, np.float32),
               np.full((rows, stop_slots), -1, np.int32))

  def head(self, rows: int) -> "RowState":
    """Copies of rows [0, rows)."""
    return jax.tree_util.tree_map(lambda a: np.array(a[:rows]), self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Drawn:
  """Tokens a program drew and their log-probabilities (of the raw logits): tokens i32[n, ...],
  logprobs f32[n, ...], and the TOP_LOGPROBS most likely ids i32[n, ..., T] with theirs f32[n, ..., T]
  (zeros unless a row asked for top log-probabilities)."""

  tokens: np.ndarray
  logprobs: np.ndarray
  top_ids: np.ndarray
  top_logprobs: np.ndarray
