"""One accepted HTTP request while it runs: a Completion per choice (n), the queue their engine events
arrive on, each choice's reply parsing, and what the metrics count when it ends."""

from __future__ import annotations

import asyncio
import time

from qwen_logical.serving import openai_bodies
from qwen_logical.serving.choice_stream import ChoiceReply
from qwen_logical.serving.completions import Completion, Output

CLIENT_CLOSED = 499  # the status metrics count a request under when its client went away
GONE = object()  # queued when the client disconnects


class Run:
  """One accepted request: a Completion per choice, the queue their engine events arrive on (tagged
  with the choice's index), each choice's text and tool-call parsing, its metrics."""

  def __init__(self, serving, parsed, endpoint: str):
    self.serving, self.parsed, self.endpoint = serving, parsed, endpoint
    tokenizer = serving.served.tokenizer
    self.choices = [Completion(serving.engine, parsed.choice(i), tokenizer, parsed.stop)
                    for i in range(parsed.choices)]
    self.replies = [ChoiceReply(parsed.tools, parsed.reasoning) for _ in self.choices]
    self.events: asyncio.Queue = asyncio.Queue()
    self.timer = serving.metrics.timer()
    self.outputs: list[list[Output]] = [[] for _ in self.choices]
    self.id, self.created = openai_bodies.new_id(parsed), int(time.time())
    self._loop = asyncio.get_running_loop()
    self._closed = False
    self.gone = False  # the client disconnected
    self.status = 200  # what the metrics count a streamed answer under

  @property
  def done(self) -> bool:
    return all(c.done for c in self.choices)

  def last(self) -> list[Output]:
    """Each choice's latest Output (usage so far)."""
    return [o[-1] for o in self.outputs if o]

  def submit(self) -> None:
    """Submits every choice (QueueFullError / ServingError: the ones submitted are cancelled)."""
    try:
      for i, choice in enumerate(self.choices):
        choice.submit(lambda event, i=i: self.notify(i, event))
    except Exception:
      for choice in self.choices:
        choice.cancel()
      raise

  def notify(self, index: int, event) -> None:
    """The engine's callback (engine thread); the arrival time goes along, for the latency metrics."""
    try:
      self._loop.call_soon_threadsafe(self.events.put_nowait, (index, event, time.perf_counter()))
    except RuntimeError:  # the event loop has closed: nobody waits for this request any more
      pass

  async def next(self) -> tuple[int, Output] | None:
    """(choice index, its next Output); None when an event adds nothing, or when the client has gone (then done)."""
    index, event, at = await self.events.get()
    if event is GONE:
      self.gone = True
      for choice in self.choices:
        choice.cancel()
      return None
    output = self.choices[index].on_event(event)
    if output is None:
      return None
    self.outputs[index].append(output)
    if output.token_ids:
      self.timer.token(len(output.token_ids), at)
    return index, output

  def close(self, status: int, count: bool = True) -> None:
    """Ends the request (cancelled in the engine unless it finished) and counts it (unless `count` is
    False: the guard counts the 500 of an exception); idempotent."""
    if self._closed:
      return
    self._closed = True
    if not self.done:
      for choice in self.choices:
        choice.cancel()
      status = CLIENT_CLOSED
    self.serving.inflight -= 1
    last = self.last()
    if count:
      usage = openai_bodies.usage(last, self.parsed) if last else {}
      self.serving.metrics.finished(self.endpoint, status, usage.get("prompt_tokens", 0),
                                    usage.get("completion_tokens", 0), usage.get("prompt_tokens_details",
                                                                                  {}).get("cached_tokens", 0))
