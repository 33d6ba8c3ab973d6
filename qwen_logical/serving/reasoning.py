"""Qwen3's reasoning split out of a chat reply: the text of a leading `<think>...</think>` block is the
message's `reasoning_content`, the rest its `content` (as vLLM's qwen3 reasoning parser splits it).

    reasoning, content = split_reasoning("<think>\\nWhy...\\n</think>\\n\\nHello")   # ("Why...", "Hello")
    splitter = ReasoningSplitter(opened=prompt_opens_thinking(prompt_tail))
    for piece in pieces:                                   # text deltas as the model writes them
      reasoning_delta, content_delta = splitter.push(piece)
    reasoning_delta, content_delta = splitter.finish()

A reply reasons when it begins (after whitespace) with `<think>`, or when its prompt ended inside an
open `<think>` (some Qwen3 templates put `<think>\\n` into the generation prompt). The block ends at
the first `</think>`; a block never closed (the reply cut short) is reasoning to its end. The
reasoning is stripped of the newlines around it, the content of the newlines it starts with; a
reply that does not reason is content, unchanged. Streamed, text that could still be a tag, or
newlines that could still be stripped, wait for the next piece, so the pieces of any split of a
reply join to `split_reasoning` of the whole.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
PARSERS = ("", "qwen3")  # serve.reasoning_parser: "" off, "qwen3" a leading <think>...</think> block


def check_parser(name: str) -> str:
  """The reasoning parser `name` (serve.reasoning_parser), or ValueError naming the accepted ones."""
  if name not in PARSERS:
    raise ValueError(f"--config.serve.reasoning_parser={name!r} is not a reasoning parser: use \"qwen3\" (split "
                     "a leading <think>...</think> block into reasoning_content) or \"\" (off).")
  return name


def prompt_opens_thinking(prompt_tail: str) -> bool:
  """Whether a prompt ending in `prompt_tail` leaves a `<think>` block open for the reply."""
  return prompt_tail.rstrip().endswith(OPEN)


class ReasoningSplitter:
  """Splits a reply's text deltas into (reasoning delta, content delta); `opened`: the prompt opened
  the block."""

  def __init__(self, opened: bool = False):
    self.opened = opened
    self.state = "start"  # start -> reasoning_lead -> reasoning -> content_lead -> content, or start -> content
    self.held = ""

  def push(self, text: str) -> tuple[str, str]:
    """(reasoning, content) that a text delta settles; text that could still be a tag waits."""
    reasoning, content = "", ""
    text, self.held = self.held + text, ""
    while text:
      if self.state == "start":
        head = text.lstrip()
        if head.startswith(OPEN):
          self.state, text = "reasoning_lead", head[len(OPEN):]
        elif not head or OPEN.startswith(head):
          self.held, text = text, ""
        else:
          self.state = "reasoning_lead" if self.opened else "content"
      elif self.state == "reasoning_lead":
        text = text.lstrip("\n")
        self.state = "reasoning" if text else self.state
      elif self.state == "reasoning":
        end = text.find(CLOSE)
        if end >= 0:
          reasoning += text[:end].rstrip("\n")
          self.state, text = "content_lead", text[end + len(CLOSE):]
        else:
          shown = text[:len(text) - _tag_start(text, CLOSE)].rstrip("\n")
          reasoning += shown
          self.held, text = text[len(shown):], ""
      elif self.state == "content_lead":
        text = text.lstrip("\n")
        self.state = "content" if text else self.state
      else:
        content, text = content + text, ""
    return reasoning, content

  def finish(self) -> tuple[str, str]:
    """(reasoning, content) of what is still held at the reply's end (a block never closed is reasoning)."""
    held, self.held = self.held, ""
    state, self.state = self.state, "content"
    if state == "start" and not self.opened:
      return "", held
    if state == "start":  # the prompt opened the block: what is held is reasoning (a `<think>` tag aside)
      head = held.lstrip()
      return (head[len(OPEN):] if head.startswith(OPEN) else held).strip("\n"), ""
    return held.rstrip("\n"), ""


def _tag_start(text: str, tag: str) -> int:
  """Length of the longest tail of `text` that `tag` starts with (a tag that may be cut by the next piece)."""
  for n in range(min(len(tag) - 1, len(text)), 0, -1):
    if tag.startswith(text[-n:]):
      return n
  return 0


def split_reasoning(text: str, opened: bool = False) -> tuple[str | None, str]:
  """(reasoning or None, content) of a whole reply; the same parser as ReasoningSplitter's stream."""
  splitter = ReasoningSplitter(opened)
  reasoning, content = splitter.push(text)
  more, rest = splitter.finish()
  return (reasoning + more) or None, content + rest
