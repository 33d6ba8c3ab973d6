"""The engine's host state: what each cache row runs, its per-row decode state, and who gets a row next.

Row r's state (`programs.RowState`, one entry per cache row, passed to every decode dispatch): the
token to feed, the slot it goes to (`index`: the row holds tokens at slots [0, index), so the
position is index too), the request's seed and the step of the next draw (tokens drawn so far),
how many more it may draw (`budget`), its sampling settings and stop ids. A free row has budget 0:
the device draws nothing for it, and nothing reads what it writes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from qwen_logical.inference.programs import RowState
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

  @property
  def kind(self) -> str:
    """The cheapest sampler kind that serves every request of the call."""
    return kind_of(p.request.sampling for p in self.requests)

  def arrays(self, padding_row: int) -> dict[str, np.ndarray]:
    """Host arguments of the prefill program: tokens int[b, P] left-padded with 0, lengths, rows,
    seeds, streams, temperature, top_k, top_p [b]. Padding rows: one token, cache row `padding_row`
    (none)."""
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
    return dict(tokens=tokens, lengths=lengths, rows=rows, seeds=seeds, streams=np.zeros(b, np.int32),
                temperature=temperature, top_k=top_k, top_p=top_p)


class Rows:
  """The N cache rows: which request each runs and the RowState of the next decode dispatch."""

  def __init__(self, count: int):
    self.count = count
    self.running: list[Pending | None] = [None] * count
    self.state = RowState.empty(count)

  def free(self) -> list[int]:
    return [r for r, p in enumerate(self.running) if p is None]

  def active(self) -> list[int]:
    return [r for r, p in enumerate(self.running) if p is not None]

  def find(self, rid: int) -> int | None:
    return next((r for r, p in enumerate(self.running) if p is not None and p.rid == rid), None)

  def start(self, row: int, pending: Pending) -> None:
    """`pending` runs in `row` from now: its prompt is in slots [0, n); the prefill's token (step 0)
    is set by `first`."""
    request, st = pending.request, self.state
    self.running[row] = pending
    st.tokens[row], st.index[row], st.steps[row], st.streams[row], st.budget[row] = 0, len(request.tokens), 1, 0, 0
    st.seeds[row] = request.seed % 2 ** 32
    values = row_values([request.sampling])
    st.temperature[row], st.top_k[row], st.top_p[row] = (v[0] for v in values)
    st.stops[row] = -1
    head = list(request.stop_ids)[:st.stops.shape[1]]  # the device checks these; the host checks all
    st.stops[row, :len(head)] = head

  def first(self, row: int, token: int, finished: bool) -> None:
    """The prefill drew `token`: the row feeds it next, and may draw max_new_tokens - 1 more."""
    self.state.tokens[row] = token
    self.state.budget[row] = 0 if finished else self.running[row].request.max_new_tokens - 1

  def advance(self, rows: int, state: RowState) -> None:
    """Takes the state a decode dispatch over rows [0, rows) returned (host arrays)."""
    for name, value in vars(state).items():
      getattr(self.state, name)[:rows] = value

  def release(self, row: int) -> Pending:
    pending, self.running[row] = self.running[row], None
    empty = RowState.empty(1)
    for name, value in vars(empty).items():
      getattr(self.state, name)[row] = value[0]
    return pending

  def kind(self) -> str:
    """The cheapest sampler kind the running rows need: GREEDY if none samples, FILTERED if one
    filters, else SAMPLE (each row draws the same token under every kind that serves it)."""
    return kind_of(p.request.sampling for p in self.running if p is not None)

  def highest(self) -> int:
    """1 + the highest running row (0 if none): decode dispatches cover rows [0, highest) at least."""
    return max((r + 1 for r, p in enumerate(self.running) if p is not None), default=0)


def plan_prefills(waiting: list[Pending], free: list[int], bucket: Callable[[int], int], size: int) -> list[Prefill]:
  """Prefill calls that start the first len(free) waiting requests (first come, first served) in
  the free rows: calls of `size` rows (the fewest the mesh splits), each taking up to `size`
  requests of one prompt bucket, in the order the buckets first appear. One prefill shape per
  bucket keeps the programs to compile few."""
  taken = waiting[:len(free)]
  groups: dict[int, list[tuple[int, Pending]]] = {}
  for row, pending in zip(free, taken):
    groups.setdefault(bucket(len(pending.request.tokens)), []).append((row, pending))
  calls = []
  for b, group in groups.items():
    for i in range(0, len(group), size):
      part = group[i:i + size]
      calls.append(Prefill(b, size, tuple(r for r, _ in part), tuple(p for _, p in part)))
  return calls
