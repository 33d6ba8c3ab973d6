"""Typed access to the fields of an OpenAI request body, with the 400 a wrong type deserves.

    expect(body, "stream", bool, default=False)     # RequestError(param="stream") unless a bool
    optional_int(body, "seed"), optional_number(body, "temperature", 1.0), sampling_params(body)

JSON numbers arrive as int or float and JSON true/false as bool (a Python int): ints exclude bools
here, numbers accept ints, and NaN / infinity are refused. IGNORED_AT_DEFAULT lists the OpenAI
fields this server does not implement, each with the test its value must pass to be accepted.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from qwen_logical.inference.sampling import SamplingParams
from qwen_logical.serving.completions import RequestError

_NAMES = {str: "a string", bool: "a boolean", int: "an integer", list: "an array", dict: "an object"}


def expect(body: dict, name: str, kind: type, default: Any = None, required: bool = False, where: str = "") -> Any:
  """body[name] checked to be of `kind` (None or absent gives `default`; RequestError if `required`)."""
  param = f"{where}.{name}" if where else name
  value = body.get(name)
  if value is None:
    if required:
      raise RequestError(f"Missing required parameter: `{param}`.", param)
    return default
  if kind is int and isinstance(value, float) and value.is_integer():
    return int(value)  # JSON has one number type: 2.0 is the integer 2 (as JSON Schema and pydantic read it)
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise RequestError(f"`{param}` must be {_NAMES[kind]}, got {json_type(value)}.", param)
  return value


def optional_int(body: dict, name: str) -> int | None:
  return expect(body, name, int)


def optional_number(body: dict, name: str, default: float) -> float:
  value = body.get(name)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise RequestError(f"`{name}` must be a finite number, got {json_type(value)}.", name)
  return float(value)


def sampling_params(body: dict) -> SamplingParams:
  """temperature, top_p and top_k (0 or -1: off), each checked, as SamplingParams."""
  temperature = optional_number(body, "temperature", 1.0)
  if temperature < 0:
    raise RequestError(f"temperature={temperature} is invalid: use 0 for greedy decoding or a positive number.",
                       "temperature")
  top_p = optional_number(body, "top_p", 1.0)
  if not 0 < top_p <= 1:
    raise RequestError(f"top_p={top_p} is invalid: it must be in (0, 1] (1 turns it off).", "top_p")
  top_k = optional_int(body, "top_k")
  top_k = 0 if top_k in (None, -1) else top_k
  if top_k < 0:
    raise RequestError(f"top_k={top_k} is invalid: use a positive integer, or 0 / -1 to turn it off.", "top_k")
  return SamplingParams(temperature, top_k, top_p)


def json_type(value: Any) -> str:
  """The JSON name of a value's type, as error messages say it ("a number", "an array", "null", ...)."""
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "a boolean"
  if isinstance(value, (int, float)):
    return "a number" if math.isfinite(value) else str(value)
  return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _is(*allowed) -> Callable[[Any], bool]:
  return lambda value: value is None or any(value == a and type(value) is type(a) for a in allowed)


def _anything(value: Any) -> bool:
  return True


IGNORED_AT_DEFAULT: dict[str, Callable[[Any], bool]] = {
    "user": _anything, "metadata": _anything, "store": _is(False), "service_tier": _anything,
    "suffix": _is(""), "modalities": _is(["text"]),
}
