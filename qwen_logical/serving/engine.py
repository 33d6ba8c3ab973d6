"""The continuous-batching engine: a fixed number of slots over one preallocated, sharded KV cache.

    engine = Engine(partitioner, params, slots=8, context=2048, queue_size=64)
    rid = engine.submit(EngineRequest(tokens, max_new_tokens=64, sampling=SamplingParams(0.7)), callback)
    engine.start()                        # the scheduler loop in a background thread
    engine.cancel(rid); engine.stats(); engine.stop(deadline_s=10)

Each round of the scheduler (one thread): cancelled requests leave (their slot is free at once);
waiting requests take the free slots, first come first served: a prompt whose first blocks a row
holds (the prefix cache: finished requests leave their keys in their rows, least recently used
given up first) copies them and computes only the rest, any other is prefilled (one call per
request where the mesh allows, `shapes`) into its cache row (`admission`); then one decode dispatch
advances every running slot by up to K steps (`decode_steps`, stops checked on the device; a
step is one token, or a speculative round), over rows [0, n) only (n: the decode size covering the
highest running row). Each new token goes to the request's callback as a TokenEvent; a stop id or
max_new_tokens ends the request and frees its slot. A request may ask for log-probabilities, logit
processing (penalties, logit bias, min_tokens) and a grammar mask (`EngineRequest`); rows that do
take plain steps (not speculative rounds), and a dispatch holding a grammar's row one step, its mask
filled on the host between steps. Requests beyond the free slots wait in a queue
of `queue_size` (QueueFullError beyond it). Programs: inference's (`executor`), shapes: `shapes`,
host state: `scheduler`; nothing compiles after `warmup` (but an echo prefill, on first use).

Multi-process: process 0 builds the Engine and serves; every other process builds it the same
way and calls `follow()`, which runs the calls process 0 sends (`protocol`) until it stops.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from absl import logging

from qwen_logical.common.host import is_main_process
from qwen_logical.inference.programs import CachePrograms, default_decode_steps
from qwen_logical.inference.speculative import Speculation, SpeculativePrograms
from qwen_logical.serving import events
from qwen_logical.serving.admission import Admissions, plan_round
from qwen_logical.serving.delivery import Deliveries
from qwen_logical.serving.executor import execute, new_cache
from qwen_logical.serving.prefix_cache import PrefixCache
from qwen_logical.serving.protocol import COPY, DECODE, EXTEND, NOOP, PREFILL, RESET, STOP, Call, Channel
from qwen_logical.serving.requests import (EngineRequest, EngineStats, QueueFullError, ServingError, TokenEvent,
                                           check_request, check_settings)
from qwen_logical.serving.scheduler import Pending, Rows
from qwen_logical.serving.shapes import EngineShapes
from qwen_logical.sharding import distributed
from qwen_logical.sharding.partitioner import Params, Partitioner

__all__ = ["Engine", "EngineRequest", "EngineStats", "QueueFullError", "ServingError", "TokenEvent"]


class Engine(Admissions, Deliveries):
  """Serves EngineRequests on `slots` cache rows of `context` tokens (prompt plus new tokens).

  slots must be a multiple of what splits the cache rows over the mesh (programs.batch_multiple).
  decode_steps / join_steps: steps per decode dispatch (K; default per platform) / while a slot is free;
  speculation: prompt lookup (`inference.speculative`), a step is then a round.
  log_every_s: seconds between progress lines; keepalive_s: how often process 0 tells idle peers it lives.
  """

  def __init__(self, partitioner: Partitioner, params: Params, slots: int = 8, context: int = 2048,
               queue_size: int = 64, *, decode_steps: int | None = None, join_steps: int | None = None,
               log_every_s: float = 5.0, keepalive_s: float = 1.0, speculation: Speculation | None = None):
    check_settings(partitioner, slots, context, queue_size)
    self.partitioner, self.params, self.context = partitioner, params, int(context)
    self.slots, self.queue_size = int(slots), int(queue_size)
    steps, on = decode_steps or default_decode_steps(), speculation is not None and speculation.on
    self.programs = (SpeculativePrograms(partitioner, self.slots, self.context, steps, None, speculation, True) if on
                     else CachePrograms(partitioner, self.slots, self.context, steps, processing=True))
    self.shapes = EngineShapes(self.programs, self.slots, self.context, join_steps)
    self.vocab_size = partitioner.config.vocab_size
    self.rows, largest = Rows(self.slots, self.vocab_size, self.programs.scratch), self.shapes.prefill_rows
    self.prefix = PrefixCache(self.slots, self.programs.scratch)
    self.channel = Channel(max(self.slots, largest), (largest, self.programs.length), self.vocab_size)
    self.log_every_s, self.keepalive_s, self._cv = log_every_s, keepalive_s, threading.Condition()
    self._queue: collections.deque[Pending] = collections.deque()
    self._cancels: set[int] = set()
    self._next_rid = self._active = 0  # ids given so far; rows running a request
    self._stopping, self._deadline, self._failed, self._thread = False, 0.0, None, None
    self._cache = None  # the device cache (and history), made when the scheduler (or follow) starts
    self._counts = collections.Counter()
    self._last_log, self._rate = (time.monotonic(), 0), 0.0  # (time, tokens_total) of the last log; tokens/s

  # --- the contract -------------------------------------------------------------------------
  @property
  def compilations(self) -> int:
    """Programs compiled so far (none in steady state once every bucket has been seen)."""
    return self.programs.compilations

  def check(self, request: EngineRequest) -> None:
    """Raises ServingError naming the field if `request` cannot run here."""
    check_request(request, self.context, self.partitioner.config.vocab_size)

  def submit(self, request: EngineRequest, callback: Callable[[TokenEvent], None]) -> int:
    """Queues `request`; returns its id. Thread-safe. callback(TokenEvent) runs on the engine thread."""
    self.check(request)
    with self._cv:
      if self._stopping or self._failed:
        raise ServingError("The engine is shutting down and takes no new requests"
                           + (f" (it failed: {self._failed})." if self._failed else "."))
      if len(self._queue) - (self.slots - self._active) >= self.queue_size:
        raise QueueFullError(f"All {self.slots} slots are busy and {self.queue_size} requests are waiting "
                             "(queue_size); try again later.")
      rid, self._next_rid = self._next_rid, self._next_rid + 1
      self._queue.append(Pending(rid, request, callback))
      self._counts["requests"] += 1
      self._cv.notify_all()
    return rid

  def cancel(self, rid: int) -> None:
    """Ends request `rid` at the next step (final event "cancelled"); unknown or finished ids are ignored."""
    with self._cv:
      self._cancels.add(rid)
      self._cv.notify_all()

  def warmup(self) -> int:
    """Compiles every program the engine can need (`shapes.warmup_builds`); returns how many were
    made now. Runs nothing."""
    return self.programs.warmup(self.shapes.warmup_builds())

  def start(self) -> None:
    """Runs the scheduler in a background thread (process 0)."""
    if self._thread is not None:
      raise ServingError("The engine has already been started.")
    self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
    self._thread.start()

  def stop(self, deadline_s: float = 0.0) -> None:
    """Takes no new requests, lets accepted ones run for up to `deadline_s` seconds, cancels the
    rest and ends the scheduler (and, with several processes, every follower)."""
    with self._cv:
      self._stopping, self._deadline = True, time.monotonic() + max(0.0, deadline_s)
      self._cv.notify_all()
    if self._thread is None:  # never started: nothing ran, nothing will
      self._end_all("cancelled")
      self.channel.send(Call(STOP))
      return
    self._thread.join()

  def stats(self) -> EngineStats:
    with self._cv:
      c, x = self._counts, self.prefix
      return EngineStats(
          queued=len(self._queue), active=self._active, slots=self.slots, context=self.context,
          tokens_total=c["tokens"], prompt_tokens_total=c["prompt_tokens"], requests_total=c["requests"],
          finished_total=c["finished"], prefills=c["prefills"], prefix_queries=x.queries, prefix_hits=x.hits,
          prefix_prompt_tokens=x.prompt_tokens, prefix_cached_tokens=x.cached_tokens, decode_steps=c["decode_steps"],
          dispatches=c["dispatches"], compilations=self.compilations, tokens_per_s=self._rate)

  def follow(self) -> None:
    """On every process but 0: runs process 0's program calls until it stops."""
    if is_main_process():
      raise ServingError("engine.follow() runs on processes other than 0; process 0 serves (engine.start()).")
    distributed.exit_on_peer_failure(self._follow)

  # --- the scheduler ------------------------------------------------------------------------
  def _follow(self) -> None:
    self._cache = new_cache(self.programs)
    while (call := self.channel.receive()).op != STOP:
      self._execute(call)

  def _run(self) -> None:
    try:
      distributed.exit_on_peer_failure(self._loop)
    except Exception as e:  # noqa: BLE001 (a bug: every request learns of it, the engine stops)
      logging.exception("The engine failed")
      with self._cv:
        self._failed = f"{type(e).__name__}: {e}"
      self._end_all("error", self._failed)
      self.channel.send(Call(STOP))

  def _loop(self) -> None:
    self._cache = new_cache(self.programs)
    while self._round():
      self._log()
    self._end_all("cancelled")
    self.channel.send(Call(STOP))

  def _round(self) -> bool:
    """One scheduler round; False once stopping and nothing is left to run."""
    with self._cv:
      if not self._has_work():
        self._cv.wait(self.keepalive_s if self.channel.needed else self.log_every_s)
      if self._stopping and (time.monotonic() >= self._deadline or not self._has_work()):
        return False
      cancels, self._cancels = self._cancels, set()
      gone = [p for p in self._queue if p.rid in cancels]
      for p in gone:
        self._queue.remove(p)
      waiting = list(self._queue)
    for p in gone:
      self._finish(p, "cancelled")
    for row in [r for r in self.rows.active() if self.rows.running[r].rid in cancels]:
      self._finish(self._release(row), "cancelled")
    if not waiting and not self.rows.active():
      self.channel.send(Call(NOOP))
      return True
    hits, prefills = plan_round(waiting, self.rows.free(), self.prefix, self.shapes)
    for hit in hits:
      if not self._extend(hit):
        break  # a failed call zeroed the cache: the other hits' donors hold nothing now
    for prefill in prefills:
      self._admit(prefill)
    if self.rows.active():
      self._decode()
    return True

  def _has_work(self) -> bool:
    return bool(self._queue or self._cancels or self._active)

  def _decode(self) -> None:
    n = self.shapes.decode_rows(self.rows.highest())
    running = {row: self.rows.running[row] for row in self.rows.active()}
    constrained = self.rows.constrained()
    for row in constrained:  # the grammar's mask for the next token: one step in this dispatch
      running[row].request.grammar.fill(self.rows.extras.mask[row])
    limit = 1 if constrained else self.shapes.decode_limit(len(self.rows.free()))
    arrays = {**vars(self.rows.state.head(n)), **vars(self.rows.extras.head(n))}
    result = self._call(Call(DECODE, self.rows.kind(), arrays, limit, flag=int(self.rows.plain())))
    if result is None:
      return
    drawn, produced, state = result
    self.rows.advance(n, state)
    with self._cv:
      self._counts["decode_steps"] += int(produced.max(initial=0))
      self._counts["dispatches"] += 1
    for j in range(int(produced.max(initial=0))):  # in step order, as the tokens were drawn
      for row, pending in running.items():
        if j < produced[row] and self.rows.running[row] is pending:
          self._deliver(row, int(drawn.tokens[row, j]), events.token_logprobs(drawn, (row, j), pending.request))

  def _call(self, call: Call):
    """Sends `call` to the followers and runs it; its tokens on the host, or None if it failed
    (every running request then ends with "error" and the cache starts again from zeros)."""
    self.channel.send(call)
    try:
      return self._execute(call)
    except Exception as e:  # noqa: BLE001 (a peer failure goes up; anything else fails the requests)
      if distributed.peer_failure(e):
        raise
      logging.exception("A %s program failed", {PREFILL: "prefill", EXTEND: "extend", COPY: "copy"}.get(call.op,
                                                                                                   "decode"))
      for row in self.rows.active():
        self._finish(self._release(row), "error", f"{type(e).__name__}: {e}")
      self.channel.send(Call(RESET))
      self._execute(Call(RESET))
      for row in range(self.slots):  # the cache restarts from zeros: no row holds a prefix
        self.prefix.hold(row, ())
      return False if call.op == COPY else None

  def _execute(self, call: Call):
    if call.op == RESET:
      self._cache = None  # the old buffers may have been donated to the failed call
    self._cache, result = execute(self.programs, self.params, self._cache, call)
    return result

  def _log(self) -> None:
    now, (last, tokens) = time.monotonic(), self._last_log
    if now - last < self.log_every_s:
      return
    stats = self.stats()
    self._rate = (stats.tokens_total - tokens) / (now - last)
    self._last_log = (now, stats.tokens_total)
    if stats.tokens_total > tokens or stats.active or stats.queued:
      logging.info("Engine: %d queued, %d/%d slots active, %.1f tokens/s, %d tokens, %d requests done, "
                   "%d compilations", stats.queued, stats.active, self.slots, self._rate, stats.tokens_total,
                   stats.finished_total, stats.compilations)

