"""Conversations from JSONL, tokenised with the checkpoint's chat template, trained on assistant tokens only.

    conversations = read_conversations("chats.jsonl")        # DataError naming file:line
    example = tokenize_conversation(tokenizer, conversations[0].messages)

Each line is `{"messages": [{"role": ..., "content": ...}, ...]}` with at least one assistant turn.
The loss covers each assistant message's content and its end-of-turn token (`<|im_end|>`), not
the role header before it nor the newline after it. The template is rendered as transformers
renders it (`checkpoints.chat_template`); an assistant turn's span is the text between the
conversation rendered up to it with the generation prompt and rendered through it, and a token is
trained when its characters overlap that span (the tokenizer's offsets).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from qwen_logical.training.state import TrainingError


class DataError(TrainingError):
  """Training data that cannot be read or used (the message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Conversation:
  where: str  # "file:line" (or "built-in:N"), for messages
  messages: list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Example:
  """tokens int32[n]; loss_mask float32[n]: 1 where the NEXT token is trained (the last entry is 0)."""

  tokens: np.ndarray
  loss_mask: np.ndarray
  where: str = ""

  def __len__(self) -> int:
    return int(self.tokens.size)


def check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
  """The messages of one conversation, checked: a list of {role, content} dicts with an assistant turn."""
  if not isinstance(messages, list) or not messages:
    raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects.")
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
        or not isinstance(message.get("content"), str):
      raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content', "
                      f"got {json.dumps(message)[:120]}.")
  if not any(m["role"] == "assistant" for m in messages):
    raise DataError(f"{where}: the conversation has no assistant turn, so nothing would be trained; "
                    "add {\"role\": \"assistant\", \"content\": ...} or drop the line.")
  return messages


def parse_line(line: str, where: str) -> Conversation:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f"{where}: not a JSON object ({e.msg} at column {e.colno}); each line must be "
                    "{\"messages\": [...]}.") from None
  if not isinstance(record, dict) or "messages" not in record:
    raise DataError(f"{where}: expected {{\"messages\": [...]}}, got {line.strip()[:120]}.")
  return Conversation(where, check_messages(record["messages"], where))


def read_conversations(path: str, *, lines: Iterable[int] | None = None) -> list[Conversation]:
  """The conversations of a JSONL file (blank lines skipped). `lines`: read only these 0-based
  indices of the non-blank lines (a process's part); default all."""
  if not os.path.isfile(path):
    raise DataError(f"--config.train.data={path}: no such file; give a JSONL file with one "
                    "{\"messages\": [...]} per line (or leave it empty for the built-in set).")
  wanted = None if lines is None else set(lines)
  out = []
  for index, (number, line) in enumerate(_nonblank_lines(path)):
    if wanted is None or index in wanted:
      out.append(parse_line(line, f"{path}:{number}"))
  if not out and wanted is None:
    raise DataError(f"{path} holds no conversations; each line must be {{\"messages\": [...]}}.")
  return out


def count_conversations(path: str) -> int:
  return sum(1 for _ in _nonblank_lines(path))


def _nonblank_lines(path: str):
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        yield number, line


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
  return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def end_of_turn_strings(tokenizer) -> list[str]:
  """The texts of the tokens that end an assistant turn (stop ids, then eos)."""
  ids = list(tokenizer.stop_ids) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
  return [t for t in (tokenizer.id_to_token(i) for i in ids) if t]


def assistant_spans(tokenizer, messages: Sequence[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
  """(the rendered conversation, [(start, end) character span of each assistant turn's trained text])."""
  text = _render(tokenizer, messages, add_generation_prompt=False)
  ends = end_of_turn_strings(tokenizer)
  spans = []
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
    through = _render(tokenizer, messages[:i + 1], add_generation_prompt=False)
    if not (through.startswith(before) and text.startswith(through)):
      raise DataError(f"{where}: the chat template does not render this conversation turn by turn (turn "
                      f"{i} changes the text before it), so the assistant tokens cannot be located.")
    turn = through[len(before):]
    found = [turn.find(e) + len(e) for e in ends if e in turn]
    stop = min(found) if found else len(turn.rstrip())
    spans.append((len(before), len(before) + stop))
  return text, spans


def tokenize_conversation(tokenizer, messages: Sequence[dict], where: str = "") -> Example:
  """The conversation's tokens and loss mask (1 at t where token t+1 lies in an assistant span)."""
  text, spans = assistant_spans(tokenizer, messages, where)
  encoding = tokenizer.backend.encode(text, add_special_tokens=False)
  tokens = np.asarray(encoding.ids, np.int32)
  trained = np.zeros(tokens.size, np.float32)
  for i, (start, end) in enumerate(encoding.offsets):
    trained[i] = any(end > a and start < b for a, b in spans)
  loss_mask = np.concatenate([trained[1:], np.zeros(1, np.float32)])
  return Example(tokens, loss_mask, where)
