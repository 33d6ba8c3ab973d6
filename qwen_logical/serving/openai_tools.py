"""OpenAI `tools` on a chat request, for Qwen2.5's chat format: the checked request fields, the tools
the chat template lists, the schema a forced call must follow, and past calls made template-ready.

    tools = parse_tools(body)                  # ToolRequest, or None when the body lists no tools
    text = template.render(plain_messages(messages), tools=tools.tools_for_template if tools else None)
    if tools is not None and tools.forced:     # tool_choice "required" or a named function
      grammar = compile(tools.call_schema(), prefix=tools.required_prefix, suffix=tools.required_suffix)

Every value a client got wrong is a RequestError whose `param` is the field's path, e.g.
`tools.[0].function.name` or `messages.[2].tool_calls.[0].function.arguments`.

tool_choice "none" still lists the tools in the prompt, as vLLM does by default (the prompt is the same
whatever the choice; the model knows the tools earlier turns called), and the reply is not searched for
calls (parses_calls is False). parse_tools(body, tools_when_none=False) leaves them out instead.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, ClassVar, Sequence

from qwen_logical.serving.completions import RequestError
from qwen_logical.serving.openai_fields import json_type
from qwen_logical.serving.tool_calls import CLOSE, FUNCTION_NAME, OPEN

MAX_TOOLS = 128
_TOOL_KEYS = frozenset(("type", "function"))
_FUNCTION_KEYS = frozenset(("name", "description", "parameters", "strict"))


@dataclasses.dataclass(frozen=True)
class ToolRequest:
  """A chat request's tools, checked.

  tools: the tool dicts, each {"type": "function", "function": {"name", "description"?, "parameters"?}};
  choice: "none" | "auto" | "required" | the name of the one tool the reply must call;
  parallel: parallel_tool_calls (False: only the reply's first call counts);
  tools_when_none: whether the template lists the tools under choice "none".
  """

  tools: tuple[dict[str, Any], ...]
  choice: str
  parallel: bool = True
  tools_when_none: bool = True

  @property
  def names(self) -> tuple[str, ...]:
    """The tools' names, in the request's order."""
    return tuple(t["function"]["name"] for t in self.tools)

  @property
  def tools_for_template(self) -> list[dict[str, Any]] | None:
    """The `tools=` of the chat template (fresh copies), or None: no tools, or choice "none" left out."""
    if not self.tools or (self.choice == "none" and not self.tools_when_none):
      return None
    return copy.deepcopy(list(self.tools))

  @property
  def parses_calls(self) -> bool:
    """Whether the reply's `<tool_call>` blocks become tool calls (not under choice "none")."""
    return bool(self.tools) and self.choice != "none"

  @property
  def forced(self) -> bool:
    """Whether the reply must be a call: choice "required" or a named function."""
    return self.choice not in ("none", "auto")

  @property
  def max_calls(self) -> int | None:
    """How many calls of a reply count: 1 without parallel_tool_calls, else no limit (None)."""
    return None if self.parallel else 1

  required_prefix: ClassVar[str] = OPEN + "\n"   # what a forced reply writes before the call's JSON
  required_suffix: ClassVar[str] = "\n" + CLOSE  # and after it

  def call_schema(self) -> dict[str, Any] | None:
    """The JSON schema of a block's JSON {"name", "arguments"} over the tools the choice allows (the named
    one, else all): one object schema per tool, pairing its name with its parameters (anyOf when several).
    A tool's local `$ref`s are rewritten to point into the result's `$defs`, where its schema then lives."""
    named = self.forced and self.choice != "required"
    allowed = [t["function"] for t in self.tools if not named or t["function"]["name"] == self.choice]
    if not allowed:
      return None
    defs: dict[str, Any] = {}
    options = [_call_object(f["name"], _arguments_schema(f.get("parameters"), f"args_{i}", defs))
               for i, f in enumerate(allowed)]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "$defs": defs} if defs else schema


def _call_object(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
  return {"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
          "required": ["name", "arguments"], "additionalProperties": False}


def _arguments_schema(parameters: dict[str, Any] | None, key: str, defs: dict[str, Any]) -> dict[str, Any]:
  """A tool's parameters schema as an object schema; moved into `defs[key]` (and referenced) if it has `$ref`s."""
  schema = {"type": "object", **copy.deepcopy(parameters or {})}
  rebased = _rebase(schema, f"#/$defs/{key}")
  if rebased == schema:
    return schema
  defs[key] = rebased
  return {"$ref": f"#/$defs/{key}"}


_LITERAL_KEYWORDS = frozenset(("const", "enum", "default", "examples"))  # their values are data, not schemas
_SCHEMA_MAPS = frozenset(("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"))


def _rebase(node: Any, base: str) -> Any:
  """`node` with each local `$ref` ("#" or "#/...") made relative to `base` instead of the document's root."""
  if isinstance(node, list):
    return [_rebase(v, base) for v in node]
  if not isinstance(node, dict):
    return node
  out = {}
  for k, v in node.items():
    if k == "$ref" and isinstance(v, str) and (v == "#" or v.startswith("#/")):
      out[k] = base + v[1:]
    elif k in _SCHEMA_MAPS and isinstance(v, dict):  # names -> schemas: a name is never a keyword
      out[k] = {name: _rebase(schema, base) for name, schema in v.items()}
    else:
      out[k] = v if k in _LITERAL_KEYWORDS else _rebase(v, base)
  return out


def parse_tools(body: dict[str, Any], tools_when_none: bool = True) -> ToolRequest | None:
  """The checked `tools`, `tool_choice` and `parallel_tool_calls` of a chat request body.

  None when the body lists no tools (absent, null or []); then tool_choice may only be "none" or
  "auto". tool_choice defaults to "auto" with tools, parallel_tool_calls to true.
  """
  tools = body.get("tools")
  if tools is not None and not isinstance(tools, list):
    raise RequestError(f"`tools` must be an array of {{\"type\": \"function\", \"function\": {{...}}}} objects, "
                       f"got {json_type(tools)}.", "tools")
  if len(tools or []) > MAX_TOOLS:
    raise RequestError(f"`tools` lists {len(tools)} tools: at most {MAX_TOOLS} are taken.", "tools")
  tools = [_tool(t, f"tools.[{i}]") for i, t in enumerate(tools or [])]
  seen: dict[str, int] = {}
  for i, tool in enumerate(tools):
    name = tool["function"]["name"]
    if name in seen:
      raise RequestError(f"tools.[{i}] and tools.[{seen[name]}] are both named {name!r}: give each tool its own "
                         "name.", f"tools.[{i}].function.name")
    seen[name] = i
  choice = _choice(body.get("tool_choice"), seen)
  parallel = _optional(body, "parallel_tool_calls", bool, "")
  if not tools:
    return None
  return ToolRequest(tuple(tools), choice or "auto", True if parallel is None else parallel, tools_when_none)


def _tool(tool: Any, where: str) -> dict[str, Any]:
  """One `tools` entry, checked, as {"type": "function", "function": {name, description?, parameters?}}."""
  if not isinstance(tool, dict):
    raise RequestError(f"{where} must be an object {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, "
                       f"got {json_type(tool)}.", where)
  if tool.get("type") != "function":
    raise RequestError(f"{where}.type is {tool.get('type')!r}: only \"function\" tools are supported; set "
                       "\"type\": \"function\".", f"{where}.type")
  _no_extra_keys(tool, _TOOL_KEYS, where)
  function = tool.get("function")
  if not isinstance(function, dict):
    raise RequestError(f"{where}.function must be an object with a `name` (and optional `description`, "
                       f"`parameters`), got {json_type(function)}.", f"{where}.function")
  where = f"{where}.function"
  _no_extra_keys(function, _FUNCTION_KEYS, where)
  name = function.get("name")
  if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
    raise RequestError(f"{where}.name is {name!r}: a tool name is 1-64 characters of a-z, A-Z, 0-9, _ and -.",
                       f"{where}.name")
  out: dict[str, Any] = {"name": name}
  if _optional(function, "description", str, where) is not None:
    out["description"] = function["description"]
  parameters = function.get("parameters")
  if parameters is not None:
    if not isinstance(parameters, dict):
      raise RequestError(f"{where}.parameters must be a JSON schema object such as {{\"type\": \"object\", "
                         f"\"properties\": {{...}}}}, got {json_type(parameters)}.", f"{where}.parameters")
    if parameters.get("type", "object") != "object":
      raise RequestError(f"{where}.parameters has type {parameters.get('type')!r}: a tool's arguments are an "
                         "object, so use \"type\": \"object\" and list the arguments under `properties`.",
                         f"{where}.parameters.type")
    out["parameters"] = copy.deepcopy(parameters)
  _optional(function, "strict", bool, where)
  return {"type": "function", "function": out}


def _choice(choice: Any, names: dict[str, int]) -> str | None:
  """tool_choice as "none" | "auto" | "required" | a tool's name, or None when absent."""
  if choice is None:
    return None
  if isinstance(choice, str):
    if choice not in ("none", "auto", "required"):
      raise RequestError(f"tool_choice={choice!r} is invalid: use \"none\", \"auto\", \"required\" or "
                         "{\"type\": \"function\", \"function\": {\"name\": ...}}.", "tool_choice")
    if choice == "required" and not names:
      raise RequestError("tool_choice=\"required\" needs tools to call: list them in `tools`, or use \"auto\".",
                         "tool_choice")
    return choice
  if not isinstance(choice, dict):
    raise RequestError(f"`tool_choice` must be a string or an object, got {json_type(choice)}.", "tool_choice")
  if choice.get("type") != "function":
    raise RequestError(f"tool_choice.type is {choice.get('type')!r}: set \"type\": \"function\".",
                       "tool_choice.type")
  _no_extra_keys(choice, _TOOL_KEYS, "tool_choice")
  function = choice.get("function")
  if not isinstance(function, dict):
    raise RequestError(f"tool_choice.function must be an object {{\"name\": ...}}, got {json_type(function)}.",
                       "tool_choice.function")
  _no_extra_keys(function, frozenset(("name",)), "tool_choice.function")
  name = function.get("name")
  if not isinstance(name, str):
    raise RequestError(f"tool_choice.function.name must be a string, got {json_type(name)}.",
                       "tool_choice.function.name")
  if name not in names:
    listed = f"name one of {', '.join(map(repr, names))}" if names else "the request lists no tools; list it in `tools`"
    raise RequestError(f"tool_choice names the function {name!r}, which is not among the tools: {listed}.",
                       "tool_choice.function.name")
  return name


def plain_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Chat messages made ready for Qwen2.5's template: each assistant `tool_calls` entry checked, with its
  `arguments` JSON text parsed into the object the template writes with tojson; `tool` messages checked.
  Other fields are kept as given; `messages` itself is not changed. RequestError names the field at fault."""
  out = []
  for i, message in enumerate(messages):
    where = f"messages.[{i}]"
    message = dict(message)
    calls = message.get("tool_calls")
    if calls is not None:
      if message.get("role") != "assistant":
        raise RequestError(f"{where} has tool_calls, but only assistant messages carry them: move the calls to "
                           "an assistant message.", f"{where}.tool_calls")
      if not isinstance(calls, list):
        raise RequestError(f"{where}.tool_calls must be an array of calls, got {json_type(calls)}.",
                           f"{where}.tool_calls")
      message["tool_calls"] = [_past_call(c, f"{where}.tool_calls.[{j}]") for j, c in enumerate(calls)]
    if message.get("role") == "tool":
      _optional(message, "content", str, where, " (the tool's result)", required=True)
      _optional(message, "tool_call_id", str, where, " (the id of the call answered)")
    out.append(message)
  return out


def _past_call(call: Any, where: str) -> dict[str, Any]:
  """One past call, {"id"?, "type": "function", "function": {"name", "arguments": <parsed object>}}."""
  if not isinstance(call, dict):
    raise RequestError(f"{where} must be an object {{\"id\": ..., \"type\": \"function\", \"function\": "
                       f"{{\"name\": ..., \"arguments\": \"{{...}}\"}}}}, got {json_type(call)}.", where)
  if call.get("type", "function") != "function":
    raise RequestError(f"{where}.type is {call.get('type')!r}: set \"type\": \"function\".", f"{where}.type")
  _optional(call, "id", str, where)
  function = call.get("function")
  if not isinstance(function, dict):
    raise RequestError(f"{where}.function must be an object {{\"name\": ..., \"arguments\": \"{{...}}\"}}, got "
                       f"{json_type(function)}.", f"{where}.function")
  name = function.get("name")
  if not isinstance(name, str) or not name:
    raise RequestError(f"{where}.function.name must be the called tool's name, got {json_type(name)}.",
                       f"{where}.function.name")
  arguments = function.get("arguments")
  if isinstance(arguments, str):
    try:
      arguments = json.loads(arguments)
    except (ValueError, RecursionError):
      arguments = None
  if not isinstance(arguments, dict):
    raise RequestError(f"{where}.function.arguments must be a JSON object written as a string, such as "
                       "\"{\\\"city\\\": \\\"Paris\\\"}\".", f"{where}.function.arguments")
  return {**call, "type": "function", "function": {**function, "arguments": arguments}}


def _optional(obj: dict[str, Any], key: str, kind: type, where: str, what: str = "", required: bool = False) -> Any:
  """obj[key], None when absent or null (unless `required`); RequestError at `where.key` unless of `kind`."""
  value, path = obj.get(key), f"{where}.{key}" if where else key
  if (value is None and required) or (value is not None and not isinstance(value, kind)):
    raise RequestError(f"`{path}` must be {'a boolean' if kind is bool else 'a string'}{what}, got "
                       f"{json_type(value)}.", path)
  return value


def _no_extra_keys(obj: dict[str, Any], allowed: frozenset[str], where: str) -> None:
  extra = sorted(k for k in obj if k not in allowed)
  if extra:
    raise RequestError(f"{where} has the unknown field {extra[0]!r}: it takes only {', '.join(sorted(allowed))}.",
                       f"{where}.{extra[0]}")
