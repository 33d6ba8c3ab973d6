"""What each choice of a request shows: its text split into reasoning (a leading `<think>` block, when
the server splits it), content and tool calls, and the streamed chunks of each Output (reasoning and
text deltas, log-probabilities, tool-call deltas, finish reason).

    reply = ChoiceReply(parsed.tools, parsed.reasoning)    # per choice
    for chunk in stream_chunks(parsed, run, i, output, pieces, offsets): ...
    content, calls, reasoning = reply.whole(text)          # the non-streamed reply

Reasoning is split first; tool calls are parsed from the content that follows it.
"""

from __future__ import annotations

from qwen_logical.serving import openai_bodies, tool_calls
from qwen_logical.serving.reasoning import ReasoningSplitter, split_reasoning
from qwen_logical.serving.token_text import TextPosition


class ChoiceReply:
  """A choice's reply under the request's tools (None or tool_choice "none": all text is content) and
  reasoning split (`reasoning`: None, off; else whether the prompt opened the `<think>` block)."""

  def __init__(self, tools, reasoning: bool | None = None):
    self.on = tools is not None and tools.parses_calls
    self.names, self.max_calls = (tools.names, tools.max_calls) if self.on else ((), None)
    self._stream = tool_calls.ToolCallStream(self.names, self.max_calls) if self.on else None
    self.opened = reasoning
    self._thinking = ReasoningSplitter(reasoning) if reasoning is not None else None

  @property
  def calls(self) -> list:
    """The tool calls streamed so far."""
    return self._stream.calls if self.on else []

  def push(self, text: str, last: bool) -> tuple[str, list, str]:
    """(content delta, tool-call deltas, reasoning delta) of a text delta; `last`: the reply ends here."""
    reasoning = ""
    if self._thinking is not None:
      reasoning, text = self._thinking.push(text)
      if last:
        more, rest = self._thinking.finish()
        reasoning, text = reasoning + more, text + rest
    if not self.on:
      return text, [], reasoning
    deltas = self._stream.push(text) + (self._stream.finish() if last else [])
    return "".join(d.text for d in deltas if d.text), [d.call for d in deltas if d.call is not None], reasoning

  def whole(self, text: str) -> tuple[str | None, list, str | None]:
    """(content or None, ToolCalls, reasoning or None) of a whole reply."""
    reasoning = None
    if self.opened is not None:
      reasoning, text = split_reasoning(text, self.opened)
      if reasoning is not None and not text:
        return None, [], reasoning
    if not self.on:
      return text, [], reasoning
    return (*tool_calls.parse_reply(text, self.names, self.max_calls), reasoning)


def stream_chunks(parsed, run, i: int, output, pieces, offsets: list[TextPosition]):
  """The chunks of choice i's Output: the echoed prompt first (completions with echo), then its delta;
  offsets[i]: where choice i's text has got to (its tokens' `text_offset`)."""
  body = lambda **kw: openai_bodies.chunk_body(parsed, run.id, run.created, i, **kw)
  if parsed.kind == "completion" and parsed.options.echo and len(run.outputs[i]) == 1:  # the choice's first
    yield body(text=parsed.prompt_text(i), logprobs=openai_bodies.logprobs_of(parsed, pieces,
                                                                               output.prompt_logprobs or [], 0))
    offsets[i] = TextPosition(len(parsed.prompt_text(i)))
  if parsed.score_only:
    if output.finish_reason:
      yield body(finish_reason=output.finish_reason)
    return
  reply = run.replies[i]
  text, calls, reasoning = reply.push(output.text, output.finish_reason is not None)
  logprobs = openai_bodies.logprobs_of(parsed, pieces, output.logprobs, offsets[i]) if output.logprobs else None
  reason = tool_calls.finish_reason(output.finish_reason, reply.calls)
  if text or reasoning or reason or logprobs or calls or (parsed.return_token_ids and output.token_ids):
    yield body(text=text, finish_reason=reason, token_ids=output.token_ids, logprobs=logprobs, tool_calls=calls,
               reasoning=reasoning)
