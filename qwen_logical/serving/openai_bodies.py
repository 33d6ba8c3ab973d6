"""OpenAI response bodies (plain dicts): whole completions, streamed chunks, usage, errors, models.

    completion_body(parsed, request_id, created, outputs)          # one choice per Output
    chunk_body(parsed, request_id, created, index, text=..., ...)  # one streamed choice delta
    usage_chunk(parsed, request_id, created, outputs), error_body(message, param)

Choices carry `logprobs` in the API's shape when asked (chat: content items with bytes and
top_logprobs; completions: tokens, token_logprobs, top_logprobs, text_offset), tool calls parsed
from the reply (`tool_calls`), the reply's reasoning (`reasoning_content`, when the server splits it),
and `usage.prompt_tokens_details.cached_tokens` the prompt tokens served from the prefix cache.
"""

from __future__ import annotations

import secrets
from typing import Any, Sequence

from qwen_logical.serving import tool_calls
from qwen_logical.serving.completions import Output
from qwen_logical.serving.openai_logprobs import chat_logprobs, completion_logprobs
from qwen_logical.serving.request_body import printable


def new_id(parsed) -> str:
  return ("chatcmpl-" if parsed.kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(outputs: Sequence[Output], parsed) -> dict[str, Any]:
  """Usage of a request's choices (n per prompt): each prompt once, every choice's completion tokens."""
  prompt = (sum(len(ids) for ids, _ in parsed.prompts) if parsed.prompts
            else outputs[0].prompt_tokens if outputs else 0)
  completion = 0 if parsed.score_only else sum(o.completion_tokens for o in outputs)
  n = parsed.options.n  # each prompt's choices share its prefill: its cached tokens count once
  cached = sum(max(o.cached_tokens for o in outputs[p:p + n]) for p in range(0, len(outputs), n))
  return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
          "prompt_tokens_details": {"cached_tokens": cached}}


def _envelope(parsed, request_id: str, created: int, chunk: bool) -> dict[str, Any]:
  kind = {"chat": "chat.completion", "completion": "text_completion"}[parsed.kind]
  return {"id": request_id, "object": kind + (".chunk" if chunk and parsed.kind == "chat" else ""),
          "created": created, "model": parsed.model, "system_fingerprint": None}


def logprobs_of(parsed, pieces, entries, offset: int = 0) -> dict | None:
  if parsed.options.logprobs is None:
    return None
  if parsed.kind == "chat":
    return chat_logprobs(pieces, entries)
  return completion_logprobs(pieces, entries, offset)


def completion_body(parsed, request_id: str, created: int, outputs: Sequence[Output], pieces,
                    replies: Sequence[tuple[str | None, list, str | None]] | None = None) -> dict:
  """The non-streamed response: one choice per Output (choice i's whole text, reason and log-probabilities);
  `replies`: per choice (content, tool calls, reasoning) when the request had tools or the server splits
  reasoning (then each message has `reasoning_content`, None when the reply did not reason)."""
  choices = []
  for i, output in enumerate(outputs):
    reason = output.finish_reason
    if parsed.kind == "chat":
      content, calls, reasoning = replies[i] if replies else (output.text, [], None)
      message = {"role": "assistant", "content": content}
      if parsed.reasoning is not None:
        message["reasoning_content"] = reasoning
      if calls:
        message["tool_calls"] = [call.as_dict() for call in calls]
      reason = tool_calls.finish_reason(reason, calls)
      choice = {"index": i, "message": message, "logprobs": logprobs_of(parsed, pieces, output.logprobs),
                "finish_reason": reason}
    else:
      text, entries = _echoed(parsed, output, i)
      choice = {"index": i, "text": text, "logprobs": logprobs_of(parsed, pieces, entries), "finish_reason": reason}
    if parsed.return_token_ids:
      choice["token_ids"] = [] if parsed.score_only else output.token_ids
    choices.append(choice)
  return {**_envelope(parsed, request_id, created, False), "choices": choices,
          "usage": usage(outputs, parsed)}


def _echoed(parsed, output: Output, i: int) -> tuple[str, list]:
  """Completion choice i's text and log-probability entries, its prompt's first with echo."""
  text, entries = ("", []) if parsed.score_only else (output.text, output.logprobs)
  if parsed.options.echo:
    text = parsed.prompt_text(i) + text
    entries = list(output.prompt_logprobs or []) + list(entries)
  return text, entries


def chunk_body(parsed, request_id: str, created: int, index: int = 0, text: str | None = None,
               finish_reason: str | None = None, token_ids: list[int] | None = None, first: bool = False,
               logprobs: dict | None = None, tool_calls: list | None = None, reasoning: str | None = None) -> dict:
  """One streamed chunk of choice `index`: a text delta and/or the finish reason (chat: `first`
  carries the role), its tokens' log-probabilities, tool-call deltas, a reasoning delta."""
  if parsed.kind == "chat":
    delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
    if reasoning:
      delta["reasoning_content"] = reasoning
    if tool_calls:
      delta["tool_calls"] = tool_calls
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
  else:
    choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
  if parsed.return_token_ids:
    choice["token_ids"] = token_ids or []
  body = {**_envelope(parsed, request_id, created, True), "choices": [choice]}
  if parsed.include_usage:
    body["usage"] = None
  return body


def usage_chunk(parsed, request_id: str, created: int, outputs: Sequence[Output]) -> dict:
  """The last chunk with stream_options.include_usage: no choices, the usage."""
  return {**_envelope(parsed, request_id, created, True), "choices": [], "usage": usage(outputs, parsed)}


def error_body(message: str, param: str | None = None, error_type: str = "invalid_request_error",
               code: str | None = None) -> dict:
  """The OpenAI error shape; text that came from the client is escaped where UTF-8 could not carry it."""
  return {"error": {"message": printable(message), "type": error_type,
                    "param": None if param is None else printable(param), "code": code}}


def models_body(served) -> dict:
  return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                      "owned_by": "qwen_logical", "max_model_len": served.context}]}
