"""The text layer of serving: prompts to token ids, engine tokens to text, stop strings, finish reasons.

    ids = chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}])    # the checkpoint's chat template
    ids = chat_prompt(tokenizer, messages, variables={"enable_thinking": False})   # template variables
    run = Completion(engine, EngineRequest(tuple(ids), 64, SamplingParams()), tokenizer, stop=["\\n\\n"])
    for output in run.stream():                                          # blocks; Output per new text
      print(output.text, end="")
    whole = Completion(engine, request, tokenizer).result()              # one Output: text, usage, reason

No HTTP here: the HTTP layer feeds the engine's TokenEvents to `Completion.on_event` itself (from
its event loop) and turns each Output into a response chunk. Text comes from the incremental
detokenizer (stop ids left out); a stop string ends the request as soon as it appears in the text,
also when it spans several tokens: the text is cut before it, the engine request is cancelled
(its slot frees at the next step) and the finish reason is "stop". Streamed text holds back only
a tail that could still grow into a stop string.
"""

from __future__ import annotations

import dataclasses
import queue
from typing import Any, Callable, Iterator, Mapping, Sequence

from qwen_logical.checkpoints.tokenizer_files import TokenizerError
from qwen_logical.common.errors import QwenLogicalError
from qwen_logical.inference.detokenize import IncrementalDetokenizer


class RequestError(QwenLogicalError):
  """A request the server cannot run as given; `param` names the request field at fault (or None)."""

  def __init__(self, message: str, param: str | None = None):
    super().__init__(message)
    self.param = param


# What a tokenizer or a chat template raises on input it cannot take (e.g. a lone surrogate: TypeError).
_UNTAKEN = (TypeError, ValueError, LookupError, AttributeError, RecursionError)
NO_TOKENIZER = ("this server has no tokenizer, so it takes token ids only: send `prompt` as a list of "
                "ints to /v1/completions, or restart it with --config.checkpoint=DIR or --config.tokenizer=DIR "
                "(a directory with tokenizer.json)")


def chat_prompt(tokenizer, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None,
                variables: Mapping[str, Any] | None = None) -> list[int]:
  """Token ids of a conversation (and the tools it may call) under the tokenizer's chat template,
  with the assistant header; `variables` reach the template by name (e.g. {"enable_thinking": False})."""
  if tokenizer is None:
    raise RequestError(f"Chat needs text: {NO_TOKENIZER}.", "messages")
  try:
    return tokenizer.encode_chat(messages, **dict(variables or {}), **({"tools": tools} if tools else {}))
  except TokenizerError as e:
    raise RequestError(str(e), "messages") from e
  except _UNTAKEN as e:  # the template or the tokenizer choked on what the client sent
    raise RequestError(f"The messages cannot be rendered and tokenized: {type(e).__name__}: {e}", "messages") from e


def text_prompt(tokenizer, text: str) -> list[int]:
  """Token ids of a plain-text prompt (as transformers' tokenizer(text) gives them)."""
  if tokenizer is None:
    raise RequestError(f"A text prompt needs a tokenizer: {NO_TOKENIZER}.", "prompt")
  try:
    return tokenizer.encode(text)
  except (TokenizerError, *_UNTAKEN) as e:
    raise RequestError(f"The prompt cannot be tokenized: {type(e).__name__}: {e}", "prompt") from e


class StopStrings:
  """Cuts a stream of text deltas at the first stop string.

  `push(delta)` -> (text safe to show, stopped). Text that could still become a stop string (the
  longest tail that is a prefix of one) is held back until the next delta decides; `flush()`
  returns it at the end. A stop string found anywhere in held + new text stops the stream there.
  """

  def __init__(self, stops: Sequence[str] = ()):
    self.stops = tuple(s for s in stops if s)
    self.held = ""

  def push(self, delta: str) -> tuple[str, bool]:
    text, self.held = self.held + delta, ""
    hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
    if hits:
      return text[:min(hits)], True
    keep = self._tail(text)
    self.held = text[len(text) - keep:] if keep else ""
    return text[:len(text) - keep], False

  def _tail(self, text: str) -> int:
    """Length of the longest tail of `text` that a stop string starts with."""
    longest = min(max((len(s) for s in self.stops), default=1) - 1, len(text))
    for n in range(longest, 0, -1):
      tail = text[-n:]
      if any(s.startswith(tail) for s in self.stops):
        return n
    return 0

  def flush(self) -> str:
    held, self.held = self.held, ""
    return held


@dataclasses.dataclass
class Output:
  """What one engine event adds to a completion.

  text: the new text to show ('' while a character or a possible stop string is incomplete).
  token_ids: the new token ids (the stop id included, as usage counts it).
  finish_reason: None while running; "stop" | "length", or the engine's "cancelled" | "error".
  prompt_tokens, completion_tokens: usage so far (tokens after a stop string are not counted).
  logprobs: (token id, log-probability, top alternatives) per new token, when the request asked.
  prompt_logprobs: the same per prompt token (the first's log-probability None), on an echo
    request's first Output; cached_tokens: prompt tokens served from the prefix cache.
  """

  text: str
  token_ids: list[int]
  finish_reason: str | None
  prompt_tokens: int
  completion_tokens: int
  error: str | None = None
  logprobs: list = dataclasses.field(default_factory=list)
  prompt_logprobs: list | None = None
  cached_tokens: int = 0


class Completion:
  """One engine request seen as text.

  Drive it either with `stream()` / `result()` (blocking, from any thread), or as the HTTP layer
  does: `submit(notify)` with a thread-safe `notify(TokenEvent)`, then `on_event(event)` for each
  event in order, from one consumer, until `done`.
  """

  def __init__(self, engine, request, tokenizer=None, stop: Sequence[str] = ()):
    self.engine = engine
    self.request = request
    self.rid: int | None = None
    self.done = False
    self.finish_reason: str | None = None
    self._stops = StopStrings(stop)
    self._text = IncrementalDetokenizer(tokenizer, request.stop_ids) if tokenizer is not None else None
    self._usage = (len(request.tokens), 0)

  def submit(self, notify: Callable[[Any], None]) -> int:
    """Submits the request (QueueFullError / ServingError from the engine); its events go to `notify`."""
    self.rid = self.engine.submit(self.request, notify)
    return self.rid

  def cancel(self) -> None:
    """Ends the request in the engine (its slot frees at the next step); later events are ignored."""
    if not self.done and self.rid is not None:
      self.engine.cancel(self.rid)
    self.done = True

  def on_event(self, event) -> Output | None:
    """The Output of one TokenEvent, or None once the completion is done."""
    if self.done:
      return None
    self._usage = (event.prompt_tokens, event.completion_tokens)
    new = [event.token] if event.token is not None else []
    text, stopped = self._add(event.token) if event.token is not None else ("", False)
    reason = "stop" if stopped else event.finish_reason
    if reason is not None and not stopped:
      more, stopped = self._finish_text()
      text += more
      reason = "stop" if stopped else reason
    if stopped and event.finish_reason is None:
      self.engine.cancel(self.rid)  # the engine would go on: the text has ended
    if reason is not None:
      self.done, self.finish_reason = True, reason
    logprobs = [(event.token, event.logprob, event.top_logprobs)] if event.logprob is not None else []
    prompt = None
    if event.prompt_logprobs is not None:
      prompt = [(t, None if s is None else s[0], () if s is None else s[1])
                for t, s in zip(self.request.tokens, event.prompt_logprobs)]
    return Output(text, new, reason, *self._usage, error=event.error, logprobs=logprobs, prompt_logprobs=prompt,
                  cached_tokens=event.cached_tokens)

  def _add(self, token: int) -> tuple[str, bool]:
    if self._text is None:
      return "", False
    return self._stops.push(self._text.add(token))

  def _finish_text(self) -> tuple[str, bool]:
    if self._text is None:
      return "", False
    text, stopped = self._stops.push(self._text.finish())
    return (text, True) if stopped else (text + self._stops.flush(), False)

  def stream(self, timeout: float | None = None) -> Iterator[Output]:
    """Submits and yields each Output until the last; leaving the loop early cancels the request.

    `timeout`: seconds to wait for any one event (queue.Empty after that).
    """
    events: queue.Queue = queue.Queue()
    self.submit(events.put)
    try:
      while not self.done:
        output = self.on_event(events.get(timeout=timeout))
        if output is not None:
          yield output
    finally:
      self.cancel()

  def result(self, timeout: float | None = None) -> Output:
    """Runs the request to its end: one Output with the whole text and token ids and the final usage."""
    outputs = list(self.stream(timeout))
    return merge(outputs)


def merge(outputs: Sequence[Output]) -> Output:
  """One Output of a whole completion from its Outputs in order (the last one's reason and usage)."""
  last = outputs[-1]
  prompt = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
  return Output("".join(o.text for o in outputs), [t for o in outputs for t in o.token_ids], last.finish_reason,
                last.prompt_tokens, last.completion_tokens, last.error, [e for o in outputs for e in o.logprobs],
                prompt, last.cached_tokens)
