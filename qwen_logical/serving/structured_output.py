"""Which grammar a request's replies must follow: `response_format` (json_object, json_schema) or a
forced tool call (`tool_choice` "required" or a named function), compiled by the server's grammar
compiler (`serving.structured`, built on first use) into a Grammar whose matchers mask each draw.

    grammar = grammar_for(body, tools, served)     # None: free text
"""

from __future__ import annotations

import re
from typing import Any

from qwen_logical.serving.completions import RequestError
from qwen_logical.serving.openai_fields import expect


def grammar_for(body: dict, tools: Any, served) -> Any:
  """The Grammar the request's replies must match, or None; RequestError names the field at fault."""
  response_format = expect(body, "response_format", dict)
  kind, schema, strict = _response_format(response_format)
  forced = tools is not None and tools.forced
  if forced and kind is not None:
    raise RequestError("response_format and a forced tool call (tool_choice \"required\" or a named function) "
                       "cannot both shape the reply: send one of them.", "response_format")
  if kind is None and not forced:
    return None
  if served.tokenizer is None:
    raise RequestError("Structured output needs the tokenizer (the grammar is over its tokens): restart the server "
                       "with --config.checkpoint=DIR or --config.tokenizer=DIR.",
                       "response_format" if kind else "tool_choice")
  compiler, param = served.grammars, "tools" if forced else "response_format.json_schema.schema"
  try:
    if forced:
      return compiler.compile("json_schema", schema=tools.call_schema(), strict=True, param=param,
                              prefix=tools.required_prefix, suffix=tools.required_suffix)
    return compiler.compile(kind, schema=schema, strict=strict, param=param)
  except RequestError:
    raise
  except (ValueError, TypeError, KeyError, RuntimeError, RecursionError) as e:  # the client's schema, not a bug
    raise RequestError(f"The schema cannot be compiled into a grammar: {type(e).__name__}: {e}", param) from e


def _response_format(value: dict | None) -> tuple[str | None, dict | None, bool]:
  """(None | "json_object" | "json_schema", the schema, strict) of a response_format."""
  if value is None:
    return None, None, False
  kind = expect(value, "type", str, required=True, where="response_format")
  if kind == "text":
    return None, None, False
  if kind == "json_object":
    return kind, None, False
  if kind != "json_schema":
    raise RequestError(f"response_format.type={kind!r} is not supported: use \"text\", \"json_object\" or "
                       "\"json_schema\".", "response_format.type")
  spec = expect(value, "json_schema", dict, required=True, where="response_format")
  name = expect(spec, "name", str, required=True, where="response_format.json_schema")
  if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
    raise RequestError(f"response_format.json_schema.name={name!r} must be 1-64 letters, digits, _ or -.",
                       "response_format.json_schema.name")
  schema = expect(spec, "schema", dict, default={}, where="response_format.json_schema")
  strict = expect(spec, "strict", bool, default=False, where="response_format.json_schema")
  return kind, schema, strict
