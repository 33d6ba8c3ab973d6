"""The engine's host state: what each cache row runs, its per-row decode state, and who gets a row next.

Row r's state (`programs.RowState`, one entry per cache row, passed to every decode dispatch): the
token to feed, the slot it goes to (`index`: the row holds tokens at slots [0, index), so the
position is index too), the request's seed and the step of the next draw (tokens drawn so far),
how many more it may draw (`budget`), its sampling settings and stop ids, and its logit processing
(`RowExtras`). A free row has budget 0 and feeds the cache's scratch slot: the device draws nothing
for it, and what it writes there overwrites no cached prefix.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from qwen_logical.inference.logit_processing import RowExtras
from qwen_logical.inference.programs import RowState
from qwen_logical.inference.sampling import SamplingParams, kind_of, row_values
from qwen_logical.serving.requests import EngineRequest


@dataclasses.dataclass
class Pending:
  """An accepted request: waiting in the queue, then running in a row."""

  rid: int
  request: EngineRequest
  callback: Callable
  cached: int = 0  # prompt tokens that came from the prefix cache
  tokens: list = dataclasses.field(default_factory=list)  # the tokens generated so far

  @property
  def produced(self) -> int:
    return len(self.tokens)

  def add(self, token: int) -> str | None:
    """Counts a new token; its finish reason ("stop", "length") or None if the request goes on."""
    self.tokens.append(token)
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

  def arrays(self, padding_row: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Host arguments of the prefill program: tokens int[b, P] left-padded with 0, lengths, rows,
    seeds, streams, temperature, top_k, top_p [b], stops [b, T] and the RowExtras fields. Padding
    rows: one token, cache row `padding_row` (none)."""
    b, count = self.batch, len(self.requests)
    tokens = np.zeros((b, self.bucket), np.int32)
    for i, p in enumerate(self.requests):
      tokens[i, self.bucket - len(p.request.tokens):] = p.request.tokens
    lengths = np.ones(b, np.int32)
    lengths[:count] = [len(p.request.tokens) for p in self.requests]
    return dict(tokens=tokens, lengths=lengths, **row_arrays(self.requests, self.rows, b, padding_row, vocab_size))


def row_arrays(requests, rows, batch: int, padding_row: int, vocab_size: int) -> dict[str, np.ndarray]:
  """The per-row arguments of a prefill or extend call of `batch` rows for `requests` in cache `rows`."""
  count = len(requests)
  cache_rows = np.full(batch, padding_row, np.int32)
  cache_rows[:count] = rows
  seeds = np.zeros(batch, np.uint32)
  seeds[:count] = [p.request.seed % 2 ** 32 for p in requests]
  settings = [p.request.sampling for p in requests] + [SamplingParams()] * (batch - count)
  temperature, top_k, top_p = row_values(settings)
  state, extras = RowState.empty(batch), RowExtras.empty(batch, vocab_size)
  for i, p in enumerate(requests):
    set_row(state, extras, i, p.request)
    if p.request.grammar is not None:  # the first token's mask (decode dispatches fill the rows' own)
      p.request.grammar.fill(extras.mask[i])
  return dict(rows=cache_rows, seeds=seeds, streams=np.zeros(batch, np.int32), temperature=temperature, top_k=top_k,
              top_p=top_p, stops=state.stops, **vars(extras))


def set_row(state: RowState, extras: RowExtras, row: int, request: EngineRequest) -> None:
  """Row `row`'s stop ids and logit processing from `request` (host arrays)."""
  state.stops[row] = -1
  head = list(request.stop_ids)[:state.stops.shape[1]]  # the device checks these; the host checks all
  state.stops[row, :len(head)] = head
  x = request.processing
  extras.set_row(row, x.presence_penalty, x.frequency_penalty, x.repetition_penalty, x.min_tokens, x.logit_bias,
                 -1 if request.logprobs is None else request.logprobs)
  extras.constrained[row] = int(request.grammar is not None)


class Rows:
  """The N cache rows: which request each runs and the RowState of the next decode dispatch."""

  def __init__(self, count: int, vocab_size: int, scratch: int):
    self.count, self.scratch = count, scratch
    self.running: list[Pending | None] = [None] * count
    self.state = RowState.empty(count)
    self.state.index[:] = scratch
    self.extras = RowExtras.empty(count, vocab_size)

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
    set_row(st, self.extras, row, request)

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
    empty.index[:] = self.scratch
    for name, value in vars(empty).items():
      getattr(self.state, name)[row] = value[0]
    self.extras.set_row(row)
    return pending

  def constrained(self) -> list[int]:
    """The running rows whose requests follow a grammar."""
    return [r for r, p in enumerate(self.running) if p is not None and p.request.grammar is not None]

  def plain(self) -> bool:
    """Whether some running row needs plain decode steps (logit processing, log-probabilities or a grammar)."""
    return any(p is not None and needs_plain_steps(p.request) for p in self.running)

  def kind(self) -> str:
    """The cheapest sampler kind the running rows need: GREEDY if none samples, FILTERED if one
    filters, else SAMPLE (each row draws the same token under every kind that serves it)."""
    return kind_of(p.request.sampling for p in self.running if p is not None)

  def highest(self) -> int:
    """1 + the highest running row (0 if none): decode dispatches cover rows [0, highest) at least."""
    return max((r + 1 for r, p in enumerate(self.running) if p is not None), default=0)


def needs_plain_steps(request: EngineRequest) -> bool:
  return (request.processing != type(request.processing)() or request.logprobs is not None
          or request.grammar is not None)


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
