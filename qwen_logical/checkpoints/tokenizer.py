"""Tokenizer: a Hugging Face Qwen2.5 tokenizer directory, without transformers.

    tok = Tokenizer.from_directory("Qwen2.5-7B-Instruct")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # str
    ids = tok.encode(prompt, add_special_tokens=False)                      # list[int]
    text = tok.decode(generated, skip_special_tokens=True)
    tok.stop_ids, tok.pad_id                                                # (151645, 151643), 151643

Encode and decode are exactly the `tokenizers` library's results on `tokenizer.json` (which is
what transformers returns for Qwen2 tokenizers). Which files are read and how they are checked:
`qwen_logical.checkpoints.tokenizer_files`; how the chat template renders:
`qwen_logical.checkpoints.chat_template` (with every named special token as a variable).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tokenizers

from qwen_logical.checkpoints.chat_template import ChatTemplate
from qwen_logical.checkpoints.tokenizer_files import (CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TokenizerError,
                                                      read_directory)

__all__ = ["Tokenizer", "TokenizerError"]


class Tokenizer:
  """A Qwen2.5 tokenizer: encode/decode through `tokenizers`, chat template, stop and pad ids.

  Build it with `Tokenizer.from_directory(path)`. Ids are plain Python ints.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, special_tokens: Mapping[str, str] | None = None,
               chat_template: str | None = None, stop_ids: Iterable[int] = (), pad_id: int | None = None,
               generation_config: Mapping[str, Any] | None = None, source: str = "the tokenizer"):
    self.backend = backend
    self.special_tokens: dict[str, str] = dict(special_tokens or {})
    self.chat_template = chat_template
    self.stop_ids: tuple[int, ...] = tuple(int(i) for i in stop_ids)
    self.pad_id = pad_id
    self.generation_config: dict[str, Any] = dict(generation_config or {})
    self.source = source
    self._compiled: ChatTemplate | None = None

  @classmethod
  def from_directory(cls, path: str | os.PathLike) -> "Tokenizer":
    """The tokenizer of a Hugging Face Qwen2 / Qwen2.5 model directory.

    `tokenizer.json` is required; `tokenizer_config.json` and `generation_config.json` are read
    when present (see the module docstring). Raises TokenizerError naming the file and the fix.
    """
    return cls(**read_directory(os.fspath(path)))

  # --------------------------------------------------------------------------- vocabulary

  @property
  def vocab_size(self) -> int:
    """Tokens the tokenizer knows, added tokens included (`len()` of the HF tokenizer).

    The model's embedding usually has more rows (151936 / 152064 for Qwen2.5): take that size
    from config.json, not from here.
    """
    return self.backend.get_vocab_size(with_added_tokens=True)

  def __len__(self) -> int:
    return self.vocab_size

  @property
  def eos_id(self) -> int | None:
    """The id of tokenizer_config.json's `eos_token` (None when it names none)."""
    return self.token_to_id(self.special_tokens["eos_token"]) if "eos_token" in self.special_tokens else None

  @property
  def bos_id(self) -> int | None:
    """The id of `bos_token`; None for Qwen2.5, which prepends nothing."""
    return self.token_to_id(self.special_tokens["bos_token"]) if "bos_token" in self.special_tokens else None

  @property
  def special_ids(self) -> frozenset[int]:
    """Ids of every special added token (what `skip_special_tokens` drops)."""
    return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self.backend.id_to_token(int(token_id))

  # --------------------------------------------------------------------------- text <-> ids

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; special tokens written in the text (e.g. `<|im_end|>`) become their ids.

    `add_special_tokens` applies the tokenizer's post-processor (Qwen2.5 adds nothing; chat
    prompts are conventionally encoded with False, as transformers does).
    """
    if not isinstance(text, str):
      raise TokenizerError(f"encode takes a str, got {type(text).__name__}; use encode_batch for a list.")
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text (unpadded; lengths differ)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
      raise TokenizerError("encode_batch takes a list of str; use encode for a single text.")
    return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """The text of `ids` (one sequence of ints: a list, or a 1-D numpy or JAX array)."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if not all(isinstance(i, (int, np.integer)) for i in ids):
      raise TokenizerError("decode takes one sequence of int token ids; use decode_batch for a batch.")
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
    return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

  # --------------------------------------------------------------------------- chat

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                          tools: Sequence[Mapping[str, Any]] | None = None, **template_vars: Any) -> str:
    """The prompt text of a conversation, as transformers' `apply_chat_template(tokenize=False)`.

    `messages` are dicts like `{"role": "user", "content": "Hi"}`. `add_generation_prompt`
    appends the assistant header (`<|im_start|>assistant\\n`) the model continues from; note
    transformers' default is False. `tools` are JSON schemas; `template_vars` reach the
    template as variables and override the special-token variables of the same name.
    """
    if self.chat_template is None:
      raise TokenizerError(
          f"{os.path.join(self.source, TOKENIZER_CONFIG_FILE)} has no chat_template (nor is there a "
          f"{CHAT_TEMPLATE_FILE}), so chat messages cannot be formatted: this is a base model's "
          "tokenizer. Use an -Instruct model directory, or prompt with plain text via encode().")
    if self._compiled is None or self._compiled.source != self.chat_template:  # compiled on first use
      self._compiled = ChatTemplate(self.chat_template, os.path.join(self.source, TOKENIZER_CONFIG_FILE))
    return self._compiled.render(messages, add_generation_prompt, tools, {**self.special_tokens, **template_vars})

  def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                  **template_vars: Any) -> list[int]:
    """Token ids of the rendered conversation (encoded without added special tokens, as transformers)."""
    prompt = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **template_vars)
    return self.encode(prompt, add_special_tokens=False)

  def __repr__(self) -> str:
    return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, stop_ids={self.stop_ids}, "
            f"pad_id={self.pad_id}, chat_template={'yes' if self.chat_template else 'no'})")
