"""Tokenizer: a Hugging Face Qwen2.5 tokenizer directory, without transformers.

    tok = Tokenizer.from_directory("Qwen2.5-7B-Instruct")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # str
    ids = tok.encode(prompt, add_special_tokens=False)                      # list[int]
    text = tok.decode(generated, skip_special_tokens=True)
    tok.stop_ids, tok.pad_id                                                # (151645, 151643), 151643

Reads three files of the directory:
- `tokenizer.json` (required): the byte-level BPE, loaded by the `tokenizers` library; encode and
  decode are exactly its results (which is what transformers returns for Qwen2 tokenizers).
- `tokenizer_config.json`: the named special tokens (`eos_token`, `pad_token`, ... as strings or
  `{"content": ...}` dicts), `added_tokens_decoder`, and the Jinja `chat_template` (a
  `chat_template.jinja` file beside it takes precedence, as in transformers).
- `generation_config.json`: `eos_token_id` (an int or a list) gives the stop ids and
  `pad_token_id` the pad id; each falls back to the tokenizer's `eos_token` / `pad_token`.

The chat template renders as transformers' `apply_chat_template(..., tokenize=False)` does: a
sandboxed Jinja environment with trim_blocks, lstrip_blocks and loop controls, the helpers
`raise_exception`, `strftime_now`, `namespace`, `dict` and a `tojson` that keeps non-ASCII text,
and the variables `messages`, `add_generation_prompt`, `tools`, `documents` and every named
special token.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np
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

# Names a message's reasoning may come under; transformers fills `thinking` and
# `reasoning_content` from whichever is set, so templates reading either see it.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

_DOWNLOAD_HINT = ("download the model's tokenizer files, e.g. `huggingface-cli download "
                  "Qwen/Qwen2.5-7B-Instruct tokenizer.json tokenizer_config.json generation_config.json "
                  "--local-dir DIR`")


class TokenizerError(QwenLogicalError):
  """A tokenizer directory, chat template or conversation that cannot be used as asked."""


# ----------------------------------------------------------------------------- files


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


# ----------------------------------------------------------------------------- chat templates


class _TemplateDict:
  """`dict(...)` inside templates: builds plain dicts, and exposes nothing else."""

  def __call__(self, *args, **kwargs) -> dict:
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs) -> dict:
    return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
  """`namespace(...)` inside templates, refusing underscore-prefixed attribute names."""

  def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
    self, attrs = args[0], dict(*args[1:], **kwargs)
    for name in attrs:
      _TemplateNamespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _TemplateNamespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"chat templates may not set underscore-prefixed namespace attributes ({name!r}).")


class _GenerationBlock(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: marks assistant text; renders its body unchanged."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
  """JSON as `json.dumps` writes it: non-ASCII text and `<>&'` kept (Jinja's own filter escapes them)."""
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


def compile_chat_template(source: str, where: str = "chat_template") -> jinja2.Template:
  """The compiled template in transformers' chat environment; TokenizerError on a syntax error."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                     dict=_TemplateDict(), namespace=_TemplateNamespace)
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise TokenizerError(f"The chat template of {where} does not compile (line {e.lineno}: "
                         f"{e.message}); fix the template or re-download the file.") from e


def _plain(value: Any) -> Any:
  """A copy made of plain JSON-like types only, so templates see (and can mutate) no caller object."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, str):
    return str.__str__(value)
  if isinstance(value, int):
    return int.__int__(value)
  if isinstance(value, float):
    return float.__float__(value)
  if isinstance(value, np.generic):
    return _plain(value.item())
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v) for v in value)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  return f"<{type(value).__name__}>"


def _chat_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Messages as templates see them: plain dicts, None-valued keys dropped, reasoning aliased."""
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise TokenizerError(f"A conversation is a list of message dicts, got {type(messages).__name__}.")
  if not messages:
    raise TokenizerError("Cannot apply the chat template to an empty conversation; pass at least one "
                         "message, e.g. [{\"role\": \"user\", \"content\": \"Hi\"}].")
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise TokenizerError(f"Message {i} of the conversation is a {type(message).__name__}, not a dict "
                           "like {\"role\": \"user\", \"content\": \"Hi\"}.")
    message = _plain({k: v for k, v in message.items() if v is not None})
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
      message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    out.append(message)
  return out


# ----------------------------------------------------------------------------- the tokenizer


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
    self._compiled: tuple[str, jinja2.Template] | None = None  # (template text, compiled)

  @classmethod
  def from_directory(cls, path: str | os.PathLike) -> "Tokenizer":
    """The tokenizer of a Hugging Face Qwen2 / Qwen2.5 model directory.

    `tokenizer.json` is required; `tokenizer_config.json` and `generation_config.json` are read
    when present (see the module docstring). Raises TokenizerError naming the file and the fix.
    """
    directory = os.fspath(path)
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
    return cls(backend, special_tokens=special, chat_template=template, stop_ids=stop_ids,
               pad_id=pad_id, generation_config=gen, source=directory)

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
    if self._compiled is None or self._compiled[0] != self.chat_template:
      where = os.path.join(self.source, TOKENIZER_CONFIG_FILE)
      self._compiled = (self.chat_template, compile_chat_template(self.chat_template, where))
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
      raise TokenizerError("tools must be a list of JSON-schema dicts.")
    variables = _plain({**self.special_tokens, **template_vars})
    try:
      return self._compiled[1].render(messages=_chat_messages(messages), tools=_plain(tools), documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
      raise TokenizerError(f"The chat template of {self.source} rejected the conversation: {e}") from e

  def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                  **template_vars: Any) -> list[int]:
    """Token ids of the rendered conversation (encoded without added special tokens, as transformers)."""
    prompt = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **template_vars)
    return self.encode(prompt, add_special_tokens=False)

  def __repr__(self) -> str:
    return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, stop_ids={self.stop_ids}, "
            f"pad_id={self.pad_id}, chat_template={'yes' if self.chat_template else 'no'})")


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
