"""The files of a Hugging Face Qwen2.5 tokenizer directory, read and checked against each other.

- `tokenizer.json` (required): the byte-level BPE, loaded by the `tokenizers` library.
- `tokenizer_config.json`: the named special tokens (`eos_token`, `pad_token`, ... as strings or
  `{"content": ...}` dicts), `added_tokens_decoder`, and the Jinja `chat_template` (a
  `chat_template.jinja` file beside it takes precedence, as in transformers).
- `generation_config.json`: `eos_token_id` (an int or a list) gives the stop ids and
  `pad_token_id` the pad id; each falls back to the tokenizer's `eos_token` / `pad_token`.

Every problem is a TokenizerError naming the file and the fix.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import tokenizers

from qwen_logical.common.errors import QwenLogicalError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# The named special tokens transformers passes to chat templates (when set), in its order.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                        "mask_token")

# Special tokens transformers' Qwen2Tokenizer assumes when tokenizer_config.json leaves the key out
# (an explicit null keeps the token unset).
_CLASS_DEFAULTS = {
    "Qwen2Tokenizer": {"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}
_CLASS_DEFAULTS["Qwen2TokenizerFast"] = _CLASS_DEFAULTS["Qwen2Tokenizer"]

_DOWNLOAD_HINT = ("download the model's tokenizer files, e.g. `huggingface-cli download "
                  "Qwen/Qwen2.5-7B-Instruct tokenizer.json tokenizer_config.json generation_config.json "
                  "--local-dir DIR`")


class TokenizerError(QwenLogicalError):
  """A tokenizer directory, chat template or conversation that cannot be used as asked."""


def read_directory(directory: str) -> dict[str, Any]:
  """The `Tokenizer` constructor's arguments, read from a model directory (see the module docstring)."""
  if not os.path.isdir(directory):
    raise TokenizerError(f"Tokenizer directory {directory} does not exist (or is not a directory); "
                         "point to a Hugging Face Qwen2.5 model directory holding tokenizer.json, "
                         "tokenizer_config.json and generation_config.json.")
  backend = _load_backend(directory)
  config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
  config = _read_json(config_path, required=False) or {}
  _check_added_tokens(backend, config.get("added_tokens_decoder"), config_path)
  special = _named_special_tokens(backend, config, config_path)
  template = _select_template(config.get("chat_template"), config_path)
  template_path = os.path.join(directory, CHAT_TEMPLATE_FILE)
  if os.path.exists(template_path):  # transformers' newer layout; it wins over the config's
    with open(template_path, encoding="utf-8") as f:
      template = f.read()
  gen_path = os.path.join(directory, GENERATION_CONFIG_FILE)
  gen = _read_json(gen_path, required=False) or {}
  stop_ids, pad_id = _stop_and_pad_ids(backend, special, gen, gen_path)
  return dict(backend=backend, special_tokens=special, chat_template=template, stop_ids=stop_ids,
              pad_id=pad_id, generation_config=gen, source=directory)


def _read_json(path: str, required: bool) -> dict[str, Any] | None:
  """The JSON object in `path`; None when absent and not required; TokenizerError otherwise."""
  if not os.path.exists(path):
    if required:
      raise TokenizerError(f"No {os.path.basename(path)} at {path}; {_DOWNLOAD_HINT}.")
    return None
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise TokenizerError(f"{path} is not valid JSON ({e}); the file is truncated or corrupt: "
                         f"{_DOWNLOAD_HINT}.") from e
  except OSError as e:
    raise TokenizerError(f"Cannot read {path}: {e}.") from e
  if not isinstance(data, dict):
    raise TokenizerError(f"{path} holds a JSON {type(data).__name__}, not an object; "
                         f"{_DOWNLOAD_HINT}.")
  return data


def _token_content(value: Any, key: str, where: str) -> str | None:
  """A special token given as a string, an AddedToken-style dict with "content", or null."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  raise TokenizerError(f"{where}: {key}={value!r} is neither a string nor a dict with a string "
                       "\"content\"; write the token text, e.g. \"<|im_end|>\".")


def _token_ids(value: Any, key: str, where: str, vocab_size: int) -> tuple[int, ...]:
  """An id field that may be an int or a non-empty list of ints, each inside the vocabulary."""
  ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
  if (not isinstance(ids, list) or not ids
      or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
    raise TokenizerError(f"{where}: {key}={value!r} must be a token id or a non-empty list of "
                         "token ids, e.g. [151645, 151643].")
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise TokenizerError(f"{where}: {key} holds id(s) {bad} outside the tokenizer's {vocab_size} "
                         "tokens; the file belongs to another model: use the generation_config.json "
                         "that came with this tokenizer.")
  return tuple(dict.fromkeys(ids))


def _select_template(template: Any, where: str) -> str | None:
  """A chat template given as a string, or as a list of {"name", "template"} (the "default" one)."""
  if template is None or isinstance(template, str):
    return template
  if isinstance(template, list) and all(isinstance(t, Mapping) and "name" in t and "template" in t
                                        for t in template):
    named = {t["name"]: t["template"] for t in template}
    if "default" in named:
      return named["default"]
    raise TokenizerError(f"{where}: chat_template holds templates {sorted(named)} and none named "
                         "\"default\"; name the one to use \"default\".")
  raise TokenizerError(f"{where}: chat_template must be a string or a list of "
                       f"{{\"name\", \"template\"}} objects, got {type(template).__name__}.")


def _check_added_tokens(backend: tokenizers.Tokenizer, decoder: Any, where: str) -> None:
  """Adds tokenizer_config.json's `added_tokens_decoder` tokens tokenizer.json lacks; checks the ids."""
  if decoder is None:
    return
  if not isinstance(decoder, Mapping):
    raise TokenizerError(f"{where}: added_tokens_decoder must map ids to token dicts, got "
                         f"{type(decoder).__name__}.")
  entries = []
  for key, value in decoder.items():
    content = _token_content(value, f"added_tokens_decoder[{key}]", where)
    if not str(key).isdigit() or content is None:
      raise TokenizerError(f"{where}: added_tokens_decoder entry {key!r}: {value!r} needs an integer id "
                           "key and a token with \"content\".")
    entries.append((int(key), content, value))
  for token_id, content, value in sorted(entries):
    have = backend.token_to_id(content)
    if have is None:
      options = value if isinstance(value, Mapping) else {}
      token = tokenizers.AddedToken(
          content, special=bool(options.get("special", False)),
          single_word=bool(options.get("single_word", False)), lstrip=bool(options.get("lstrip", False)),
          rstrip=bool(options.get("rstrip", False)), normalized=bool(options.get("normalized", False)))
      if token.special:
        backend.add_special_tokens([token])
      else:
        backend.add_tokens([token])
      have = backend.token_to_id(content)
    if have != token_id:
      raise TokenizerError(f"{where}: added_tokens_decoder gives {content!r} id {token_id}, but "
                           f"tokenizer.json gives it id {have}; the files come from different models: "
                           "use the tokenizer.json and tokenizer_config.json shipped together.")


def _load_backend(directory: str) -> tokenizers.Tokenizer:
  """tokenizer.json through the `tokenizers` library; TokenizerError saying what is wrong with it."""
  path = os.path.join(directory, TOKENIZER_FILE)
  if not os.path.exists(path):
    slow = [f for f in ("vocab.json", "merges.txt") if os.path.exists(os.path.join(directory, f))]
    extra = (f" The directory has {' and '.join(slow)} only; write tokenizer.json with transformers: "
             "`AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)`, or" if slow else "")
    raise TokenizerError(f"No {TOKENIZER_FILE} in {directory}.{extra} {_DOWNLOAD_HINT}.")
  try:
    return tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception for any malformed file
    _read_json(path, required=True)  # the clearer error when the file is not even JSON
    raise TokenizerError(f"{path} is not a tokenizer the `tokenizers` library can load ({e}); "
                         f"{_DOWNLOAD_HINT}.") from e


def _named_special_tokens(backend: tokenizers.Tokenizer, config: Mapping[str, Any], where: str) -> dict[str, str]:
  """`bos_token`, `eos_token`, ... as set in tokenizer_config.json (or by the tokenizer class)."""
  special = {}
  defaults = _CLASS_DEFAULTS.get(config.get("tokenizer_class"), {})
  for key in NAMED_SPECIAL_TOKENS:
    token = _token_content(config.get(key, defaults.get(key)), key, where)
    if token is None:
      continue
    if backend.token_to_id(token) is None:
      if key not in config:
        continue  # a class default this vocabulary lacks
      raise TokenizerError(f"{where}: {key} {token!r} is not a token of {TOKENIZER_FILE}; the two files "
                           "come from different models: use the pair shipped together.")
    special[key] = token
  return special


def _stop_and_pad_ids(backend: tokenizers.Tokenizer, special: Mapping[str, str], gen: Mapping[str, Any],
                      where: str) -> tuple[tuple[int, ...], int]:
  """Stop ids: generation_config's eos_token_id, else eos_token. Pad id: pad_token_id, pad_token, stop."""
  vocab_size = backend.get_vocab_size(with_added_tokens=True)
  if gen.get("eos_token_id") is not None:
    stop_ids = _token_ids(gen["eos_token_id"], "eos_token_id", where, vocab_size)
  elif "eos_token" in special:
    stop_ids = (backend.token_to_id(special["eos_token"]),)
  else:
    raise TokenizerError(f"No stop token: neither {where} (eos_token_id) nor {TOKENIZER_CONFIG_FILE} "
                         "(eos_token) names one; add \"eos_token_id\": [151645, 151643] (Qwen2.5-Instruct) "
                         f"or 151643 (base) to {where}.")
  if gen.get("pad_token_id") is not None:
    pad_id = _token_ids(gen["pad_token_id"], "pad_token_id", where, vocab_size)[0]
  elif "pad_token" in special:
    pad_id = backend.token_to_id(special["pad_token"])
  else:
    pad_id = stop_ids[0]  # what HF generate pads with when nothing names a pad token
  return stop_ids, pad_id
