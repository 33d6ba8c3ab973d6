"""JSON schemas of the request bodies this server takes, for its OpenAPI document (GET /openapi.json).

    schemas = request_schemas(served)                 # {"chat": {...}, "completion": {...}}
    @app.post(path, openapi_extra=request_body(schemas["chat"]))

The handlers read and check bodies themselves (serving.openai_api, with the HTTP 400 naming the
field); these schemas describe the same rules for clients and for the property-based tests, which
generate requests from them: the served model's name, token ids below its vocabulary, the
extensions (`top_k`, `return_token_ids`) and the OpenAI fields accepted at their defaults only.
"""

from __future__ import annotations

from typing import Any

from qwen_logical.serving.openai_api import MAX_STOP, ROLES, ServedModel

_INT = {"type": "integer"}
_NUMBER = {"type": "number"}
_BOOL = {"type": "boolean"}
_STRING = {"type": "string"}


def _nullable(schema: dict) -> dict:
  return {"anyOf": [schema, {"type": "null"}]}


def _shared(served: ServedModel) -> dict[str, Any]:
  at_default = {name: _nullable({"const": value}) for name, value in (
      ("store", False), ("presence_penalty", 0), ("frequency_penalty", 0), ("logprobs", False), ("echo", False),
      ("best_of", 1), ("suffix", ""), ("tool_choice", "none"))}
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
      "n": _nullable({"const": 1}),
      "return_token_ids": _nullable({**_BOOL, "description": "Extension: each choice and chunk has token_ids."}),
      "user": _STRING, "metadata": {"type": "object"}, "service_tier": _STRING, "parallel_tool_calls": _BOOL,
      "logit_bias": _nullable({"type": "object", "maxProperties": 0}), "top_logprobs": _nullable({"const": 0}),
      "response_format": _nullable({"type": "object", "properties": {"type": {"const": "text"}},
                                    "required": ["type"], "additionalProperties": False}),
      "tools": _nullable({"type": "array", "maxItems": 0}), "modalities": _nullable({"const": ["text"]}),
      **at_default,
  }


def request_schemas(served: ServedModel) -> dict[str, dict[str, Any]]:
  """The body schema of each kind of request ("chat", "completion") `served` takes."""
  token_ids = {"type": "array", "items": {**_INT, "minimum": 0, "maximum": served.vocab_size - 1},
               "minItems": 1, "maxItems": served.context - 1}
  part = {"type": "object", "properties": {"type": {"const": "text"}, "text": _STRING}, "required": ["type", "text"]}
  message = {"type": "object", "required": ["role"], "properties": {
      "role": {"enum": [*ROLES, "developer"]},
      "content": _nullable({"anyOf": [_STRING, {"type": "array", "items": part}]}),
      "name": _STRING}}
  chat = {"type": "object", "required": ["model", "messages"], "additionalProperties": False,
          "properties": {**_shared(served), "messages": {"type": "array", "items": message, "minItems": 1}}}
  completion = {"type": "object", "required": ["model", "prompt"], "additionalProperties": False,
                "properties": {**_shared(served), "prompt": {"anyOf": [_STRING, token_ids]}}}
  return {"chat": chat, "completion": completion}


def request_body(schema: dict[str, Any]) -> dict[str, Any]:
  """The `openapi_extra` of a route whose JSON body `schema` describes."""
  return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
