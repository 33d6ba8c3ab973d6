"""Each token's own bytes and the strings OpenAI's log-probability objects show for it.

    pieces = TokenPieces(tokenizer)
    pieces.raw(id)            # b'\\xe4\\xbd' (a byte-level BPE token may hold part of a character)
    pieces.text(id)           # the token as text; 'bytes:\\xe4\\xbd' when its bytes are not whole UTF-8
    pieces.offsets(ids, 0)    # each token's character offset in the text of `ids`

Qwen's tokenizers are byte-level BPE: each vocabulary string spells bytes with one printable
character per byte (bytes outside the printable ranges are shifted up past U+0100), so a token's
bytes are its string mapped back; added tokens (<|im_end|>, ...) are their text's UTF-8. Without a
tokenizer, a token shows as 'token_id:N'.
"""

from __future__ import annotations

import codecs
import functools

import tokenizers


@functools.lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
  """The byte each character of a byte-level vocabulary string stands for."""
  printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  table, shifted = {}, 0
  for byte in range(256):
    if byte in printable:
      table[chr(byte)] = byte
    else:
      table[chr(256 + shifted)] = byte
      shifted += 1
  return table


class TokenPieces:
  """Bytes and display strings of one tokenizer's tokens (None: token ids only)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    backend = getattr(tokenizer, "backend", None)
    self._byte_level = isinstance(getattr(backend, "decoder", None), tokenizers.decoders.ByteLevel)
    self._added = ({i: t.content for i, t in backend.get_added_tokens_decoder().items()} if backend is not None
                   else {})

  @functools.lru_cache(maxsize=65536)
  def raw(self, token: int) -> bytes:
    if self.tokenizer is None:
      return f"token_id:{token}".encode()
    if token in self._added:
      return self._added[token].encode()
    if self._byte_level:
      piece, table = self.tokenizer.id_to_token(token) or "", _byte_of_char()
      return bytes(table[c] for c in piece if c in table)
    return self.tokenizer.decode([token]).encode()

  def text(self, token: int) -> str:
    raw = self.raw(token)
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError:
      return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

  def offsets(self, ids, start=0) -> list[int]:
    """Each token's character offset in the text the tokens spell (decoded as a whole), from `start`
    (a number, or a TextPosition that goes on from where the last tokens ended)."""
    position = start if isinstance(start, TextPosition) else TextPosition(start)
    offsets = []
    for token in ids:
      offsets.append(position.at)
      position.advance(self.raw(int(token)))
    return offsets


class TextPosition:
  """Characters spelled so far by a stream of token bytes (a character split over tokens counts once)."""

  def __init__(self, at: int = 0):
    self.at = at
    self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

  def advance(self, raw: bytes) -> None:
    self.at += len(self._decoder.decode(raw))
