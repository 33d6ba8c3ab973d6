"""Request bodies from bytes to checked JSON: what the parser, the tokenizer and the error messages can take.

    body = decode_json(raw)        # RequestError (HTTP 400) naming the field at fault, else the decoded JSON
    printable(text)                # text safe to put in a UTF-8 response (lone surrogates escaped)

A body must be UTF-8 (RFC 8259; no byte-order mark, no UTF-16), one JSON value nested at most
MAX_DEPTH levels, with no NaN / Infinity literals and integers of at most MAX_INT_DIGITS digits.
Every string in it, keys included, must be text a tokenizer can take and a response can echo: no
lone surrogate (`"\\ud800"` is valid JSON but no character) and no NUL (U+0000). The field is
named as the request parameters are (`messages.[0].content`, `stop.[1]`); a key at fault is named
by the object that holds it.
"""

from __future__ import annotations

import json
from typing import Any

from qwen_logical.serving.completions import RequestError

MAX_DEPTH = 64  # objects and arrays inside one another; OpenAI requests need fewer than 10
MAX_INT_DIGITS = 100  # far beyond any count, id or seed; Python itself stops at 4300


def printable(text: str) -> str:
  """`text` with each lone surrogate written as its escape (`\\ud800`), so that it encodes as UTF-8."""
  return text.encode("utf-8", "backslashreplace").decode("utf-8")


def decode_json(raw: bytes) -> Any:
  """The JSON value of a request body, checked as the module docstring says; RequestError otherwise."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise RequestError(f"The request body is not valid UTF-8 (byte {e.start} is 0x{raw[e.start]:02x}): "
                       "send JSON encoded as UTF-8.") from None
  try:
    value = json.loads(text, parse_constant=_no_constant, parse_int=_bounded_int)
  except RecursionError:
    raise RequestError(f"The request body is nested too deeply: at most {MAX_DEPTH} levels of objects and "
                       "arrays.") from None
  except ValueError as e:  # json.JSONDecodeError, and the two refusals above
    raise RequestError(f"The request body is not valid JSON: {e}.") from None
  _check(value)
  return value


def _no_constant(name: str) -> Any:
  raise ValueError(f"{name} is not a JSON value (send a number, or leave the field out)")


def _bounded_int(digits: str) -> int:
  if len(digits.lstrip("-")) > MAX_INT_DIGITS:
    raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits (at most {MAX_INT_DIGITS} are taken)")
  return int(digits)


def _check(value: Any) -> None:
  """Walks the decoded body without recursion: depth, then each key and string."""
  stack = [(value, None, 1)]
  while stack:
    node, path, depth = stack.pop()
    if isinstance(node, str):
      _check_text(node, path)
    elif isinstance(node, (dict, list)):
      if depth > MAX_DEPTH:
        raise RequestError(f"The request body is nested too deeply: at most {MAX_DEPTH} levels of objects and "
                           "arrays.", _top(path))
      if isinstance(node, dict):
        for key, item in node.items():
          _check_text(key, path, key=True)
          stack.append((item, f"{path}.{key}" if path else key, depth + 1))
      else:
        stack.extend((item, f"{path}.[{i}]" if path else f"[{i}]", depth + 1) for i, item in enumerate(node))


def _top(path: str | None) -> str | None:
  """The top-level parameter of a path (`messages` of `messages.[0].content`)."""
  return path.split(".", 1)[0] if path else None


def _check_text(text: str, path: str | None, key: bool = False) -> None:
  """RequestError if `text` (a string at `path`, or a key of the object at `path`) has a lone surrogate or NUL."""
  if key:
    where = f"A key of `{path}`" if path else "A key of the request body"
  else:
    where = f"`{path}`" if path else "The request body"
  if "\x00" in text:
    raise RequestError(f"{where} contains a NUL character (U+0000) at index {text.index(chr(0))}: remove it "
                       "(prompts and fields are text, and NUL is refused everywhere).", path)
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise RequestError(f"{where} contains a lone surrogate (U+{ord(text[e.start]):04X}) at index {e.start}: "
                       "that is not a character; send valid Unicode (a `\\uD8xx` escape only as the first "
                       "half of a pair with a `\\uDCxx`).", path) from None
