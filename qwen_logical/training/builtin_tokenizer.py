"""A byte-level tokenizer with a ChatML template, built in code: the fine-tuning default needs no download.

Every UTF-8 byte is one token (ids 0-255, in the byte-level alphabet's order), then `<|endoftext|>`
(256), `<|im_start|>` (257) and `<|im_end|>` (258), as the special tokens of a Qwen2.5-Instruct
tokenizer; the chat template is ChatML in Qwen2.5-Instruct's style. `write_directory` writes the
three files of a Hugging Face tokenizer directory, so an exported model runs with `main.py --config.
checkpoint=DIR --config.chat=true`.
"""

from __future__ import annotations

import json
import os

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from qwen_logical.checkpoints.tokenizer import Tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the model's vocab may be larger (rows never produced)

CHAT_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if loop.first and message['role'] == 'system' %}
        {%- continue %}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def _backend() -> tokenizers.Tokenizer:
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  backend = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  backend.decoder = decoders.ByteLevel()
  backend.post_processor = processors.ByteLevel(trim_offsets=False)
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  return backend


def _files(backend: tokenizers.Tokenizer) -> dict[str, dict]:
  ids = {t: backend.token_to_id(t) for t in SPECIAL_TOKENS}
  decoder = {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True} for t in SPECIAL_TOKENS}
  config = {"added_tokens_decoder": decoder, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
            "clean_up_tokenization_spaces": False, "model_max_length": 32768,
            "tokenizer_class": "Qwen2Tokenizer", "chat_template": CHAT_TEMPLATE}
  generation = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}
  return {"tokenizer_config.json": config, "generation_config.json": generation}


def byte_tokenizer() -> Tokenizer:
  """The built-in tokenizer (stop ids <|im_end|>, <|endoftext|>; pad <|endoftext|>)."""
  backend = _backend()
  ids = {t: backend.token_to_id(t) for t in SPECIAL_TOKENS}
  return Tokenizer(backend, special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                   chat_template=CHAT_TEMPLATE, stop_ids=(ids["<|im_end|>"], ids["<|endoftext|>"]),
                   pad_id=ids["<|endoftext|>"], source="the built-in byte tokenizer")


def write_directory(directory: str) -> list[str]:
  """Writes tokenizer.json, tokenizer_config.json and generation_config.json into `directory`."""
  os.makedirs(directory, exist_ok=True)
  backend = _backend()
  written = [os.path.join(directory, "tokenizer.json")]
  backend.save(written[0])
  for name, content in _files(backend).items():
    written.append(os.path.join(directory, name))
    with open(written[-1], "w", encoding="utf-8") as f:
      json.dump(content, f, ensure_ascii=False, indent=2)
  return written
