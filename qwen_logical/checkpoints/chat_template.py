"""Chat templates: a conversation rendered to prompt text as transformers renders it.

    template = ChatTemplate(source, where="DIR/tokenizer_config.json")
    text = template.render(messages, add_generation_prompt=True, variables={"eos_token": ...})

Rendering matches transformers' `apply_chat_template(..., tokenize=False)`: a sandboxed Jinja
environment with trim_blocks, lstrip_blocks and loop controls, the helpers `raise_exception`,
`strftime_now`, `namespace`, `dict` and a `tojson` that keeps non-ASCII text, and the variables
`messages`, `add_generation_prompt`, `tools`, `documents` and the caller's (the named special
tokens). Templates see plain copies of the caller's data, never the caller's objects.
RESERVED_NAMES are what render passes and the environment defines: a caller's variables that took
those names would hide them from the template.

Errors are TokenizerError, naming the template's file.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.defaults
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

from qwen_logical.checkpoints.tokenizer_files import TokenizerError

# Names a message's reasoning may come under; transformers fills `thinking` and
# `reasoning_content` from whichever is set, so templates reading either see it.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_HELPERS = ("raise_exception", "strftime_now", "dict", "namespace")
RESERVED_NAMES = tuple(sorted({"messages", "tools", "documents", "add_generation_prompt", *_HELPERS,
                               *jinja2.defaults.DEFAULT_NAMESPACE}))


class ChatTemplate:
  """One compiled chat template; `source` is the Jinja text, `where` names its file in errors."""

  def __init__(self, source: str, where: str = "chat_template"):
    self.source = source
    self.where = where
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    try:
      self._template = env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
      raise TokenizerError(f"The chat template of {where} does not compile (line {e.lineno}: "
                           f"{e.message}); fix the template or re-download the file.") from e

  def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
             tools: Sequence[Mapping[str, Any]] | None = None, variables: Mapping[str, Any] | None = None) -> str:
    """The prompt text; `variables` reach the template by name (special tokens, caller's extras)."""
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
      raise TokenizerError("tools must be a list of JSON-schema dicts.")
    try:
      return self._template.render(messages=_chat_messages(messages), tools=_plain(tools), documents=None,
                                   add_generation_prompt=add_generation_prompt, **_plain(dict(variables or {})))
    except jinja2.exceptions.TemplateError as e:
      raise TokenizerError(f"The chat template of {self.where} rejected the conversation: {e}") from e


# ----------------------------------------------------------------------------- what templates may call


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


# ----------------------------------------------------------------------------- what templates see


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
