"""The engine's host state: what each cache row runs, its per-row arrays, and who gets a row next.

Row r's arrays (one entry per cache row, passed to every decode step): the token to feed, the
slot it goes to (`index`: the row holds tokens at slots [0, index), so the position is index
too), the request's seed and the step of the token to draw (tokens drawn so far), and its
sampling settings. A free row feeds token 0 at slot 0 greedily; nothing reads what it writes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from qwen_logical.inference.sampling import SamplingParams, kind_of, row_values
from qwen_logical.serving.requests import EngineRequest


@dataclasses.dataclass
class Pending:
  """An accepted request: waiting in the queue, then running in a row."""

  rid: int
  request: EngineRequest
  callback: Callable
  produced: int = 0  # tokens generated so far

  def add(self, token: int) -> str | None:
    """Counts a new token; its finish reason ("stop", "length") or None if the request goes on."""
    self.produced += 1
    if token in self.request.stop_ids:
      return "stop"
    return "length" if self.produced >= self.request.max_new_tokens else None


@dataclasses.dataclass(frozen=True)
class Prefill:
  """One prefill call: `requests` inserted into cache `rows`, their prompts padded to `bucket`."""

  bucket: int
  batch: int  # prefill rows: len(requests) padded up (a power of two, a multiple of the batch split)
  rows: tuple[int, ...]
  requests: tuple[Pending, ...]

  def arrays(self, padding_row: int) -> dict[str, np.ndarray]:
    """Host arguments of the prefill program: tokens int[b, P] left-padded with 0, lengths, rows,
    seeds, temperature, top_k, top_p [b]. Padding rows: one token, cache row `padding_row` (none)."""
    b, count = self.batch, len(self.requests)
    tokens = np.zeros((b, self.bucket), np.int32)
    for i, p in enumerate(self.requests):
      tokens[i, self.bucket - len(p.request.tokens):] = p.request.tokens
    lengths = np.ones(b, np.int32)
    lengths[:count] = [len(p.request.tokens) for p in self.requests]
    rows = np.full(b, padding_row, np.int32)
    rows[:count] = self.rows
    seeds = np.zeros(b, np.uint32)
    seeds[:count] = [p.request.seed % 2 ** 32 for p in self.requests]
    settings = [p.request.sampling for p in self.requests] + [SamplingParams()] * (b - count)
    temperature, top_k, top_p = row_values(settings)
    return dict(tokens=tokens, lengths=lengths, rows=rows, seeds=seeds, temperature=temperature, top_k=top_k,
                top_p=top_p)


class Rows:
  """The N cache rows: which request each runs and the per-row arrays of the next decode step."""

  def __init__(self, count: int):
    self.count = count
    self.running: list[Pending | None] = [None] * count
    self.token = np.zeros(count, np.int32)
    self.index = np.zeros(count, np.int32)
    self.seed = np.zeros(count, np.uint32)
    self.step = np.zeros(count, np.int32)
    self.temperature = np.zeros(count, np.float32)
    self.top_k = np.zeros(count, np.int32)
    self.top_p = np.ones(count, np.float32)

  def free(self) -> list[int]:
    return [r for r, p in enumerate(self.running) if p is None]

  def active(self) -> list[int]:
    return [r for r, p in enumerate(self.running) if p is not None]

  def find(self, rid: int) -> int | None:
    return next((r for r, p in enumerate(self.running) if p is not None and p.rid == rid), None)

  def start(self, row: int, pending: Pending) -> None:
    """`pending` runs in `row` from now: its prompt is in slots [0, n); the prefill's token (step 0),
    set in `token` once drawn, goes to slot n next."""
    request = pending.request
    self.running[row] = pending
    self.token[row], self.index[row], self.step[row] = 0, len(request.tokens), 1
    self.seed[row] = request.seed % 2 ** 32
    values = row_values([request.sampling])
    self.temperature[row], self.top_k[row], self.top_p[row] = (v[0] for v in values)

  def advance(self, row: int, token: int) -> None:
    self.token[row], self.index[row], self.step[row] = token, self.index[row] + 1, self.step[row] + 1

  def release(self, row: int) -> Pending:
    pending, self.running[row] = self.running[row], None
    self.token[row] = self.index[row] = self.seed[row] = self.step[row] = self.top_k[row] = 0
    self.temperature[row], self.top_p[row] = 0.0, 1.0
    return pending

  def kind(self) -> str:
    """The cheapest decode sampler kind the running rows need: GREEDY if none samples, FILTERED
    if one filters, else SAMPLE (each row draws the same token under every kind that serves it)."""
    return kind_of(p.request.sampling for p in self.running if p is not None)

  def highest(self) -> int:
    """1 + the highest running row (0 if none): decode steps cover rows [0, highest) at least."""
    return max((r + 1 for r, p in enumerate(self.running) if p is not None), default=0)

  def decode_arrays(self, rows: int) -> dict[str, np.ndarray]:
    """Copies of the per-row arrays of cache rows [0, rows)."""
    return dict(tokens=self.token[:rows].copy(), index=self.index[:rows].copy(), seeds=self.seed[:rows].copy(),
                steps=self.step[:rows].copy(), temperature=self.temperature[:rows].copy(),
                top_k=self.top_k[:rows].copy(), top_p=self.top_p[:rows].copy())


def plan_prefills(waiting: list[Pending], free: list[int], bucket: Callable[[int], int],
                  batch: Callable[[int], int]) -> list[Prefill]:
  """Prefill calls that start the first len(free) waiting requests (first come, first served) in
  the free rows: one call per prompt bucket, in the order the buckets first appear."""
  taken = waiting[:len(free)]
  groups: dict[int, list[tuple[int, Pending]]] = {}
  for row, pending in zip(free, taken):
    groups.setdefault(bucket(len(pending.request.tokens)), []).append((row, pending))
  return [Prefill(b, batch(len(g)), tuple(r for r, _ in g), tuple(p for _, p in g)) for b, g in groups.items()]
