"""Automatic prefix caching: which tokens' keys and values each cache row holds, so a request whose
prompt starts with them reuses them instead of computing them again.

    cache = PrefixCache(rows=8, limit=2047)
    row, length = cache.match(prompt)         # the row holding the longest cached prefix (whole blocks)
    cache.hold(row, tokens); cache.order(free_rows)

A row holds the tokens it was fed: its prompt from the moment it is prefilled, then each token it
decodes; when its request ends the row keeps them (a free row is a cache entry) until another
request takes the row. Matches count whole blocks of BLOCK tokens and leave at least one prompt
token to compute (its logits draw the first new token); a match may come from a running row (its
first slots never change) or a free one. Free rows are given to new requests least recently used
first, so under memory pressure (every row wanted) the oldest cached prefixes go first.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

BLOCK = 16  # tokens per cache block: prefixes are reused in whole blocks


class PrefixCache:
  """The cached tokens of `rows` cache rows; prefixes are reused up to `limit` slots."""

  def __init__(self, rows: int, limit: int):
    self.limit = int(limit)
    self.held = [np.zeros(0, np.int32) for _ in range(rows)]
    self._used = [0] * rows  # when each row was last filled or matched (a counter)
    self._clock = itertools.count(1)
    self.queries = self.hits = 0  # prompts looked up; of them, found a prefix
    self.prompt_tokens = self.cached_tokens = 0  # tokens of the prompts looked up; of them, reused

  def match(self, prompt: Sequence[int], exclude: Sequence[int] = ()) -> tuple[int | None, int]:
    """(the row holding the longest cached prefix of `prompt`, its length in whole blocks, at most
    len(prompt) - 1 and `limit`), or (None, 0)."""
    prompt = np.asarray(prompt, np.int32)
    most = min(len(prompt) - 1, self.limit) // BLOCK * BLOCK
    best, length = None, 0
    for row, held in enumerate(self.held):
      if row in exclude or len(held) < BLOCK or most < BLOCK:
        continue
      n = min(len(held), most)
      differ = np.flatnonzero(held[:n] != prompt[:n])
      common = (int(differ[0]) if differ.size else n) // BLOCK * BLOCK
      if common > length:
        best, length = row, common
    return best, length

  def count(self, prompt_tokens: int, reused: int) -> None:
    """Counts one looked-up prompt and the tokens it reused (for the metrics)."""
    self.queries += 1
    self.hits += reused > 0
    self.prompt_tokens += prompt_tokens
    self.cached_tokens += reused

  def hold(self, row: int, tokens: Sequence[int]) -> None:
    """Row `row` now holds keys for exactly `tokens` (slots [0, len))."""
    self.held[row] = np.asarray(tokens, np.int32)[:self.limit]
    self.touch(row)

  def extend(self, row: int, tokens: Sequence[int]) -> None:
    """Row `row` was fed `tokens` after what it held."""
    room = self.limit - len(self.held[row])
    if room > 0 and len(tokens):
      self.held[row] = np.concatenate([self.held[row], np.asarray(tokens[:room], np.int32)])

  def touch(self, row: int) -> None:
    self._used[row] = next(self._clock)

  def order(self, free: Sequence[int]) -> list[int]:
    """The free rows, the one to give up first (empty, then least recently used) first."""
    return sorted(free, key=lambda r: (len(self.held[r]) > 0, self._used[r]))
