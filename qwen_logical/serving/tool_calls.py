"""Tool calls in a Qwen2.5 reply: the `<tool_call>` blocks cut out of the text, whole or streamed.

    content, calls = parse_reply(text, known_names={"get_weather"})   # content: str | None
    message = {"content": content, "tool_calls": [call.as_dict() for call in calls]}

    stream = ToolCallStream(known_names={"get_weather"})
    for piece in pieces:                        # text deltas as the model writes them
      for delta in stream.push(piece) + (stream.finish() if last else []):
        send(delta.text or None, delta.call)    # a content delta, or one OpenAI tool-call delta
    reason = finish_reason(engine_reason, stream.calls)

Qwen2.5 models call tools by writing blocks of the form

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A block is well-formed when its text is a JSON object with a `name` (a tool name: 1-64 of
[a-zA-Z0-9_-], and one of `known_names` when given) and an object `arguments` (or a JSON string
holding one; left out means {}). Each well-formed block becomes a ToolCall whose `arguments` is the
JSON text of that object, compact and with non-ASCII text kept. Everything else - text around the
blocks, a block that is not JSON or names no known tool, an opening tag never closed - is content,
left as written; content is stripped of surrounding whitespace, and None when nothing is left.
A block ends at the first `</tool_call>` after its `<tool_call>`; a second `<tool_call>` before that
close makes the first one plain text.

parse_reply runs the same parser as ToolCallStream over the whole text, so a stream's content
deltas joined give parse_reply's content and its calls are parse_reply's calls (ids aside), however
the text was split.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from typing import Any, Collection, Sequence

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # what OpenAI allows a function's name


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """One parsed call: `id` ("call_" + 24 hex digits), the tool's `name`, `arguments` as JSON text."""

  id: str
  name: str
  arguments: str

  def as_dict(self) -> dict[str, Any]:
    """The call as an OpenAI assistant message lists it under `tool_calls`."""
    return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass(frozen=True)
class Delta:
  """One piece of a streamed reply: content `text`, or `call`, one entry of an OpenAI delta's `tool_calls`.

  A call streams as two Deltas: {"index", "id", "type", "function": {"name", "arguments": ""}}, then
  {"index", "function": {"arguments": <the whole arguments JSON>}}, once its block has closed.
  """

  text: str = ""
  call: dict[str, Any] | None = None


def new_call_id() -> str:
  """A fresh tool-call id: "call_" and 24 random hex digits."""
  return "call_" + secrets.token_hex(12)


def call_of(block: str, known_names: Collection[str] | None = None) -> ToolCall | None:
  """The ToolCall that the text between `<tool_call>` and `</tool_call>` holds, or None if malformed."""
  obj = _json_object(block)
  if obj is None:
    return None
  name, arguments = obj.get("name"), obj.get("arguments", {})
  if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
    return None
  if known_names is not None and name not in known_names:
    return None
  if isinstance(arguments, str):
    arguments = _json_object(arguments)
  if not isinstance(arguments, dict):
    return None
  return ToolCall(new_call_id(), name, _compact(arguments))


def _json_object(text: str) -> dict | None:
  """The JSON object `text` holds (NaN and Infinity refused), or None."""
  try:
    obj = json.loads(text, parse_constant=_no_constant)
  except (ValueError, RecursionError):
    return None
  return obj if isinstance(obj, dict) else None


def _no_constant(name: str):
  raise ValueError(f"{name} is not JSON")


def _compact(value: Any) -> str:
  """Compact JSON text keeping non-ASCII text (escaped only if it is not valid Unicode, e.g. a lone surrogate)."""
  text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
  return text


class ToolCallStream:
  """Splits a reply streamed as text deltas into content deltas and tool-call deltas.

  `push(text)` -> the Deltas that text settles; `finish()` -> the rest, at the end of the reply.
  Text that may still begin `<tool_call>` is held back until the next delta decides; a block is held
  until it closes, then sent as a call (or, if malformed, as content). Leading whitespace of the
  content is dropped and whitespace is held until more content follows it, so the content deltas
  joined are exactly parse_reply's content. `known_names`: the tools a call may name (None: any);
  `max_calls`: calls past this many are dropped (1 for parallel_tool_calls=false). `calls`: the
  ToolCalls sent so far.
  """

  def __init__(self, known_names: Collection[str] | None = None, max_calls: int | None = None):
    self.known_names = None if known_names is None else frozenset(known_names)
    self.max_calls = max_calls
    self.calls: list[ToolCall] = []
    self._held = ""       # outside a block: a tail that may begin OPEN; inside: the block's text so far
    self._inside = False
    self._seen = 0        # inside: how much of the block was searched for tags already
    self._started = False  # some non-whitespace content was sent
    self._spaces = ""     # whitespace held until more content follows it

  def push(self, text: str) -> list[Delta]:
    """The Deltas that `text`, the reply's next piece, settles (often none, or a part of it)."""
    out: list[Delta] = []
    self._held += text
    while True:
      if not self._inside:
        start = self._held.find(OPEN)
        if start < 0:
          keep = _open_tail(self._held)
          self._content(self._held[:len(self._held) - keep], out)
          self._held = self._held[len(self._held) - keep:]
          return out
        self._content(self._held[:start], out)
        self._held, self._inside, self._seen = self._held[start + len(OPEN):], True, 0
        continue
      since = max(0, self._seen - len(CLOSE) + 1)  # a tag ending in the new text may start this far back
      end, again = self._held.find(CLOSE, since), self._held.find(OPEN, since)
      if again >= 0 and (end < 0 or again < end):  # a new block starts: the open tag before it is text
        self._content(OPEN + self._held[:again], out)
        self._held, self._seen = self._held[again + len(OPEN):], 0
        continue
      if end < 0:
        self._seen = len(self._held)
        return out
      block, self._held, self._inside = self._held[:end], self._held[end + len(CLOSE):], False
      call = call_of(block, self.known_names)
      if call is None:
        self._content(OPEN + block + CLOSE, out)
      elif self.max_calls is None or len(self.calls) < self.max_calls:
        self._call(call, out)

  def finish(self) -> list[Delta]:
    """The Deltas of what is still held (a partial tag, an unclosed block: content) at the reply's end."""
    out: list[Delta] = []
    self._content(OPEN + self._held if self._inside else self._held, out)
    self._held, self._inside, self._spaces = "", False, ""
    return out

  def _content(self, text: str, out: list[Delta]) -> None:
    if not self._started:
      text = text.lstrip()
    body = text.rstrip()
    if not body:
      self._spaces += text
      return
    out.append(Delta(text=self._spaces + body))
    self._spaces, self._started = text[len(body):], True

  def _call(self, call: ToolCall, out: list[Delta]) -> None:
    index = len(self.calls)
    self.calls.append(call)
    out.append(Delta(call={"index": index, "id": call.id, "type": "function",
                           "function": {"name": call.name, "arguments": ""}}))
    out.append(Delta(call={"index": index, "function": {"arguments": call.arguments}}))


def _open_tail(text: str) -> int:
  """Length of the longest tail of `text` that `<tool_call>` begins with (0 if none)."""
  for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
    if OPEN.startswith(text[-n:]):
      return n
  return 0


def parse_reply(text: str, known_names: Collection[str] | None = None,
                max_calls: int | None = None) -> tuple[str | None, list[ToolCall]]:
  """(content or None, ToolCalls) of a whole reply; the arguments as ToolCallStream takes them."""
  stream = ToolCallStream(known_names, max_calls)
  deltas = stream.push(text) + stream.finish()
  return "".join(d.text for d in deltas) or None, stream.calls


def finish_reason(reason: str | None, calls: Sequence[ToolCall]) -> str | None:
  """The OpenAI finish_reason: "tool_calls" when the model stopped by itself after calling a tool."""
  return "tool_calls" if calls and reason == "stop" else reason
