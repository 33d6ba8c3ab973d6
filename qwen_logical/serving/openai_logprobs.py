"""OpenAI's log-probability objects, from the engine's per-token values.

An entry is (token id, log-probability or None, ((id, log-probability), ...) top alternatives).

    chat_logprobs(pieces, entries)                     # {"content": [...], "refusal": None}
    completion_logprobs(pieces, entries, offset=0)     # {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
"""

from __future__ import annotations

from typing import Sequence

from qwen_logical.serving.token_text import TokenPieces

Entry = tuple  # (int, float | None, tuple[tuple[int, float], ...])


def _chat_item(pieces: TokenPieces, token: int, logprob: float) -> dict:
  return {"token": pieces.text(token), "logprob": logprob, "bytes": list(pieces.raw(token))}


def chat_logprobs(pieces: TokenPieces, entries: Sequence[Entry]) -> dict:
  """The `logprobs` of a chat choice (or chunk) for these tokens."""
  content = [{**_chat_item(pieces, token, lp), "top_logprobs": [_chat_item(pieces, t, v) for t, v in top]}
             for token, lp, top in entries]
  return {"content": content, "refusal": None}


def completion_logprobs(pieces: TokenPieces, entries: Sequence[Entry], offset: int = 0) -> dict:
  """The `logprobs` of a completion choice (or chunk): its tokens from character `offset` of the text."""
  tops = []
  for _, lp, top in entries:
    if lp is None:
      tops.append(None)
      continue
    shown: dict[str, float] = {}
    for t, v in top:
      shown.setdefault(pieces.text(t), v)  # two ids may show alike: the likelier one stands
    tops.append(shown)
  return {"tokens": [pieces.text(t) for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
          "top_logprobs": tops, "text_offset": pieces.offsets([t for t, _, _ in entries], offset)}
