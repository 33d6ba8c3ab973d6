"""JSON schemas of the request bodies this server takes, for its OpenAPI document (GET /openapi.json).

    schemas = request_schemas(served)                 # {"chat": {...}, "completion": {...}}
    @app.post(path, openapi_extra=request_body(schemas["chat"]))

The handlers read and check bodies themselves (serving.openai_api, with the HTTP 400 naming the
field); these schemas describe the same rules for clients and for the property-based tests, which
generate requests from them: the served model's name, token ids below its vocabulary, the
extensions (`top_k`, `return_token_ids`, `repetition_penalty`, `min_tokens`), logprobs, echo, n,
penalties, logit_bias, tools, response_format, chat_template_kwargs, and the OpenAI fields accepted at
their defaults only.
"""

from __future__ import annotations

from typing import Any

from qwen_logical.inference.logit_processing import MAX_LOGIT_BIAS, TOP_LOGPROBS
from qwen_logical.serving.openai_api import MAX_STOP, ServedModel
from qwen_logical.serving.openai_prompts import ROLES, TEMPLATE_RESERVED
from qwen_logical.serving.openai_options import MAX_N

_INT = {"type": "integer"}
_NUMBER = {"type": "number"}
_BOOL = {"type": "boolean"}
_STRING = {"type": "string"}


def _nullable(schema: dict) -> dict:
  return {"anyOf": [schema, {"type": "null"}]}


def _shared(served: ServedModel) -> dict[str, Any]:
  at_default = {name: _nullable({"const": value}) for name, value in (("store", False), ("suffix", ""))}
  bias = {"type": "object", "maxProperties": MAX_LOGIT_BIAS, "propertyNames": {"pattern": "^[0-9]{1,6}$"},
          "additionalProperties": {**_NUMBER, "minimum": -100, "maximum": 100},
          "description": "Token id (as a string) -> bias added to its logit; ids below the vocabulary size."}
  return {
      "model": {"type": "string", "enum": [served.name], "description": "The served model (GET /v1/models)."},
      "max_tokens": _nullable({**_INT, "minimum": 1, "maximum": served.context - 1}),
      "max_completion_tokens": _nullable({**_INT, "minimum": 1, "maximum": served.context - 1}),
      "temperature": _nullable({**_NUMBER, "minimum": 0, "maximum": 2}),
      "top_p": _nullable({**_NUMBER, "exclusiveMinimum": 0, "maximum": 1}),
      "top_k": _nullable({**_INT, "minimum": -1, "maximum": served.vocab_size,
                          "description": "Extension: the k most likely tokens only (0 or -1: off)."}),
      "seed": _nullable(_INT),
      "stop": _nullable({"anyOf": [{**_STRING, "minLength": 1},
                                   {"type": "array", "items": {**_STRING, "minLength": 1}, "maxItems": MAX_STOP}]}),
      "stream": _nullable(_BOOL),
      "stream_options": _nullable({"type": "object", "properties": {"include_usage": _nullable(_BOOL)},
                                   "additionalProperties": False}),
      "n": _nullable({**_INT, "minimum": 1, "maximum": MAX_N}),
      "return_token_ids": _nullable({**_BOOL, "description": "Extension: each choice and chunk has token_ids."}),
      "user": _STRING, "metadata": {"type": "object"}, "service_tier": _STRING,
      "presence_penalty": _nullable({**_NUMBER, "minimum": -2, "maximum": 2}),
      "frequency_penalty": _nullable({**_NUMBER, "minimum": -2, "maximum": 2}),
      "repetition_penalty": _nullable({**_NUMBER, "exclusiveMinimum": 0, "maximum": 100,
                                       "description": "Extension: transformers' repetition penalty (1: off)."}),
      "min_tokens": _nullable({**_INT, "minimum": 0, "description": "Extension: no stop token before this many."}),
      "logit_bias": _nullable(bias),
      "response_format": _nullable({"anyOf": [
          {"type": "object", "properties": {"type": {"enum": ["text", "json_object"]}}, "required": ["type"],
           "additionalProperties": False},
          {"type": "object", "required": ["type", "json_schema"], "additionalProperties": False, "properties": {
              "type": {"const": "json_schema"},
              "json_schema": {"type": "object", "required": ["name"], "properties": {
                  "name": {**_STRING, "pattern": "^[A-Za-z0-9_-]{1,64}$"}, "description": _STRING,
                  "schema": {"type": "object"}, "strict": _nullable(_BOOL)}}}}]}),
      "modalities": _nullable({"const": ["text"]}),
      **at_default,
  }


def _tools() -> dict[str, Any]:
  function = {"type": "object", "required": ["name"], "properties": {
      "name": {**_STRING, "pattern": "^[A-Za-z0-9_-]{1,64}$"}, "description": _STRING,
      "parameters": {"type": "object"}, "strict": _nullable(_BOOL)}}
  named = {"type": "object", "required": ["type", "function"], "additionalProperties": False, "properties": {
      "type": {"const": "function"}, "function": {"type": "object", "required": ["name"],
                                                  "additionalProperties": False, "properties": {"name": _STRING}}}}
  return {"tools": _nullable({"type": "array", "items": {"type": "object", "required": ["type", "function"],
                                                         "additionalProperties": False,
                                                         "properties": {"type": {"const": "function"},
                                                                        "function": function}}}),
          "tool_choice": _nullable({"anyOf": [{"enum": ["none", "auto", "required"]}, named]}),
          "parallel_tool_calls": _nullable(_BOOL),
          "logprobs": _nullable(_BOOL), "top_logprobs": _nullable({**_INT, "minimum": 0, "maximum": TOP_LOGPROBS})}


def request_schemas(served: ServedModel) -> dict[str, dict[str, Any]]:
  """The body schema of each kind of request ("chat", "completion") `served` takes."""
  token_ids = {"type": "array", "items": {**_INT, "minimum": 0, "maximum": served.vocab_size - 1},
               "minItems": 1, "maxItems": served.context - 1}
  part = {"type": "object", "properties": {"type": {"const": "text"}, "text": _STRING}, "required": ["type", "text"]}
  content = _nullable({"anyOf": [_STRING, {"type": "array", "items": part}]})
  message = {"type": "object", "required": ["role"], "properties": {
      "role": {"enum": [*ROLES, "developer"]}, "content": content, "name": _STRING, "tool_call_id": _STRING,
      "tool_calls": False}}  # only an assistant message calls tools (below)
  call = {"type": "object", "required": ["id", "type", "function"], "additionalProperties": False, "properties": {
      "id": _STRING, "type": {"const": "function"},
      "function": {"type": "object", "required": ["name", "arguments"], "additionalProperties": False, "properties": {
          "name": {**_STRING, "pattern": "^[A-Za-z0-9_-]{1,64}$"},
          "arguments": {"enum": ["{}", "{\"city\": \"Oslo\"}"], "description": "A JSON object, as text."}}}}}
  calling = {"type": "object", "required": ["role", "tool_calls"], "properties": {
      "role": {"const": "assistant"}, "content": content, "tool_calls": {"type": "array", "items": call}}}
  kwargs = {"type": "object", "propertyNames": {"not": {"enum": list(TEMPLATE_RESERVED)}},
            "description": "Extension: variables of the chat template, e.g. {\"enable_thinking\": false} (Qwen3)."}
  chat = {"type": "object", "required": ["model", "messages"], "additionalProperties": False,
          "properties": {**_shared(served), **_tools(), "chat_template_kwargs": _nullable(kwargs),
                         "messages": {"type": "array", "items": {"anyOf": [message, calling]}, "minItems": 1}}}
  completion = {"type": "object", "required": ["model", "prompt"], "additionalProperties": False,
                "properties": {**_shared(served), "prompt": {"anyOf": [_STRING, token_ids]},
                               "logprobs": _nullable({**_INT, "minimum": 0, "maximum": TOP_LOGPROBS}),
                               "echo": _nullable(_BOOL), "best_of": _nullable({**_INT, "minimum": 1})}}
  return {"chat": chat, "completion": completion}


def request_body(schema: dict[str, Any]) -> dict[str, Any]:
  """The `openapi_extra` of a route whose JSON body `schema` describes."""
  return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
