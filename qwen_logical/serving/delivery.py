"""The Engine's side of each request: its tokens (and their log-probabilities) to its callback as
TokenEvents, its grammar fed, its finish, its row released (the row keeps the tokens it was fed,
for the prefix cache). Runs on the engine thread."""

from __future__ import annotations

import collections

from absl import logging

from qwen_logical.serving.requests import TokenEvent
from qwen_logical.serving.scheduler import Pending


class Deliveries:
  """Mixed into the Engine: delivering tokens and final events, releasing rows."""

  def _deliver(self, row: int, token: int, logprobs=(None, ()), prompt_logprobs=None) -> None:
    pending = self.rows.running[row]
    reason = pending.add(token)
    if pending.request.grammar is not None:
      pending.request.grammar.accept(token)
    with self._cv:
      self._counts["tokens"] += 1
    self._notify(pending, TokenEvent(pending.rid, token, reason, len(pending.request.tokens), pending.produced,
                                     None, *logprobs, prompt_logprobs, pending.cached))
    if reason is not None:
      self._release(row)
      with self._cv:
        self._counts["finished"] += 1

  def _release(self, row: int) -> Pending:
    with self._cv:
      self._active -= 1
    pending = self.rows.release(row)
    self.prefix.extend(row, pending.tokens[:-1])  # the row keeps every token it was fed
    self.prefix.touch(row)
    return pending

  def _finish(self, pending: Pending, reason: str, error: str | None = None) -> None:
    """The final event of a request that ends without a token."""
    with self._cv:
      self._counts["finished"] += 1
    self._notify(pending, TokenEvent(pending.rid, None, reason, len(pending.request.tokens), pending.produced,
                                     error, cached_tokens=pending.cached))

  def _end_all(self, reason: str, error: str | None = None) -> None:
    with self._cv:
      waiting, self._queue = list(self._queue), collections.deque()
    for p in waiting:
      self._finish(p, reason, error)
    for row in self.rows.active():
      self._finish(self._release(row), reason, error)

  @staticmethod
  def _notify(pending: Pending, event: TokenEvent) -> None:
    try:
      pending.callback(event)
    except Exception:  # noqa: BLE001 (one caller's broken callback must not stop the others)
      logging.exception("The callback of request %d failed on %s", pending.rid, event)
