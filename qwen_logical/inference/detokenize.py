"""Incremental detokenisation: the text each new token adds, in time linear in the output.

Decoding the whole row on every step costs O(n) per step, O(n^2) per row. Here each step decodes
a short window instead: the tokens of the previous text chunk (context for tokenizers whose
pieces depend on their neighbours) and the tokens not yet shown. A step whose text ends inside a
multi-byte character (decode gives U+FFFD there) shows nothing and waits for the tokens that
complete it, so the window spans at most the tokens since the last complete character plus the
previous chunk. For byte-level BPE (Qwen2's tokenizer) the deltas join to exactly the whole
row's decode.
"""

from __future__ import annotations

from typing import Iterable

_INCOMPLETE = "\ufffd"


def decode(tokenizer, ids: list[int]) -> str:
  """tokenizer.decode(ids) without special tokens (for tokenizers whose decode takes ids only, as is)."""
  try:
    return tokenizer.decode(ids, skip_special_tokens=True)
  except TypeError:
    return tokenizer.decode(ids)


class IncrementalDetokenizer:
  """Text deltas of one growing token sequence.

  `add(token)` returns the text that token adds ('' while a character is incomplete);
  `finish()` returns what is left (incomplete characters as U+FFFD, as the whole decode shows
  them). Ids in `skip_ids` (stop ids) are left out, as the final text leaves them out.
  `decoded_tokens` counts the tokens passed to decode, the cost.
  """

  def __init__(self, tokenizer, skip_ids: Iterable[int] = ()):
    self.tokenizer = tokenizer
    self.skip_ids = frozenset(skip_ids)
    self.ids: list[int] = []
    self._pieces: list[str] = []  # everything returned so far
    self._start = 0  # window start: the first token of the last chunk shown
    self._shown = 0  # tokens [0, _shown) are shown
    self.decoded_tokens = 0

  @property
  def text(self) -> str:
    """The text returned so far."""
    return "".join(self._pieces)

  def _decode(self, ids: list[int]) -> str:
    self.decoded_tokens += len(ids)
    return decode(self.tokenizer, ids)

  def add(self, token: int) -> str:
    if token not in self.skip_ids:
      self.ids.append(int(token))
    return self._advance(final=False)

  def finish(self) -> str:
    return self._advance(final=True)

  def _advance(self, final: bool) -> str:
    if self._shown == len(self.ids):
      return ""
    window = self._decode(self.ids[self._start:])
    if window.endswith(_INCOMPLETE) and not final:
      return ""
    shown = self._decode(self.ids[self._start:self._shown]) if self._shown > self._start else ""
    delta = window[len(shown):]
    self._start, self._shown = self._shown, len(self.ids)
    self._pieces.append(delta)
    return delta
