"""Who gets a cache row this round, and how their prompts get there: a request whose prompt starts
with a prefix some row holds (`prefix_cache`) has that row's keys copied into its own row (or takes
the row itself when it is free) and computes only the rest (an `extend` call); any other request
is prefilled whole (`scheduler.plan_prefills`).

    hits, prefills = plan_round(waiting, free_rows, prefix, shapes)

A request that could reuse the keys of a prompt being prefilled this round (whole shared blocks, the
rest short enough for an extend call) waits one round: the choices of an `n > 1` request share one
prefill this way.
Requests that need every prompt position's logits (echo) are always prefilled whole.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwen_logical.serving import events
from qwen_logical.serving.prefix_cache import BLOCK, PrefixCache
from qwen_logical.serving.protocol import COPY, EXTEND, PREFILL, Call
from qwen_logical.serving.scheduler import Pending, Prefill, plan_prefills, row_arrays


@dataclasses.dataclass(frozen=True)
class Hit:
  """A request that reuses `donor`'s first slots in cache `row`, computing its prompt's last `bucket`
  tokens from slot `start`; `copy` when the donor is another row."""

  pending: Pending
  row: int
  donor: int
  start: int
  bucket: int

  @property
  def copy(self) -> bool:
    return self.donor != self.row


def cacheable(pending: Pending) -> bool:
  return not pending.request.echo  # echo needs every prompt position's logits


def _would_reuse(pending: Pending, prompt_being_prefilled, shapes) -> bool:
  """Whether `pending` could take its prefix from a prompt being prefilled now (then it waits a round)."""
  mine, theirs = np.asarray(pending.request.tokens), np.asarray(prompt_being_prefilled)
  n = min(len(mine) - 1, len(theirs))
  differ = np.flatnonzero(mine[:n] != theirs[:n])
  common = (int(differ[0]) if differ.size else n) // BLOCK * BLOCK
  return cacheable(pending) and common >= BLOCK and shapes.extend_bucket(len(mine) - common) is not None


def plan_round(waiting: list[Pending], free: list[int], prefix: PrefixCache, shapes) -> tuple[list[Hit], list[Prefill]]:
  """The hits (one extend call each, after their copies) and prefill calls that start waiting
  requests in the free rows this round, first come first served."""
  available = prefix.order(free)
  hits: list[Hit] = []
  misses: list[tuple[int, Pending]] = []
  for pending in waiting:
    if not available:
      break
    prompt = pending.request.tokens
    if any(_would_reuse(pending, p.request.tokens, shapes) for _, p in misses):
      continue  # its prefix is being computed now: next round it is cached
    taken = [r for r, _ in misses] + [h.row for h in hits]
    donor, length = prefix.match(prompt, exclude=taken) if cacheable(pending) else (None, 0)
    bucket = shapes.extend_bucket(len(prompt) - length) if donor is not None else None
    if bucket is not None and bucket <= len(prompt):
      row = donor if donor in available else available[0]
      available.remove(row)
      hits.append(Hit(pending, row, donor, len(prompt) - bucket, bucket))
      prefix.count(len(prompt), len(prompt) - bucket)
    else:
      misses.append((available.pop(0), pending))
      prefix.count(len(prompt), 0)
  prefills = plan_prefills([p for _, p in misses], [r for r, _ in misses], shapes.bucket, shapes.prefill_rows)
  return hits, prefills


class Admissions:
  """The Engine's admission calls (the engine thread): prefills, and prefix-cache hits (copy, extend)."""

  def _take(self, requests, rows) -> None:
    with self._cv:
      for p in requests:
        self._queue.remove(p)
      self._active += len(requests)
      self._counts["prefills"] += 1
      self._counts["prompt_tokens"] += sum(len(p.request.tokens) for p in requests)
    for row, p in zip(rows, requests):
      self.rows.start(row, p)
      self.prefix.hold(row, p.request.tokens)

  def _admit(self, prefill) -> None:
    self._take(prefill.requests, prefill.rows)
    echo = any(p.request.echo for p in prefill.requests)
    result = self._call(Call(PREFILL, prefill.kind, prefill.arrays(self.slots, self.vocab_size), flag=int(echo)))
    drawn, prompts = result if echo and result is not None else (result, None)
    for i, (row, p) in enumerate(zip(prefill.rows, prefill.requests) if result is not None else ()):
      scores = events.prompt_logprobs(prompts, i, p.request) if p.request.echo else None
      self._first(row, drawn, i, scores)

  def _extend(self, hit) -> bool:
    """A prefix-cache hit: the donor row's keys copied (unless the row is the donor's), the rest computed;
    False if a call failed (the cache then starts again from zeros: the round's other hits must not run)."""
    p, bucket = hit.pending, hit.bucket
    if hit.copy and self._call(Call(COPY, limit=hit.donor, flag=hit.row)) is False:
      return False
    self._take([p], [hit.row])
    p.cached = hit.start
    batch, prompt = self.shapes.prefill_rows, p.request.tokens
    tokens = np.zeros((batch, self.programs.length), np.int32)  # the whole prompt, left-padded
    tokens[0, self.programs.length - len(prompt):] = prompt
    arrays = row_arrays([p], [hit.row], batch, self.slots, self.vocab_size)
    starts = np.full(batch, hit.start, np.int32)
    drawn = self._call(Call(EXTEND, p.request.sampling.kind, dict(tokens=tokens, starts=starts, **arrays), flag=bucket))
    if drawn is None:
      return False
    self._first(hit.row, drawn, 0, None)
    return True

  def _first(self, row: int, drawn, i: int, prompt_logprobs) -> None:
    token = int(drawn.tokens[i])
    self.rows.first(row, token, finished=False)
    self._deliver(row, token, events.token_logprobs(drawn, (i,), self.rows.running[row].request), prompt_logprobs)
