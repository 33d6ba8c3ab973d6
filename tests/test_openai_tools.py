"""The tool fields of an OpenAI chat request (openai_tools): parse_tools and each 400 it gives, the schema
a forced call must follow (checked with jsonschema), and past calls made ready for the chat template."""

import copy

import pytest
from qwen_templates import TIME, WEATHER

from qwen_logical.serving.completions import RequestError
from qwen_logical.serving.openai_tools import MAX_TOOLS, parse_tools, plain_messages


def fn(name, **function):
  return {"type": "function", "function": {"name": name, **function}}


# ----------------------------------------------------------------------------- parse_tools


def test_tools_defaults():
  request = parse_tools({"tools": [WEATHER, TIME]})
  assert (request.choice, request.parallel, request.names) == ("auto", True, ("get_weather", "get_time"))
  assert request.tools_for_template == [WEATHER, TIME]
  assert request.parses_calls and not request.forced and request.max_calls is None
  assert request.required_prefix == "<tool_call>\n" and request.required_suffix == "\n</tool_call>"


def test_tools_for_template_are_fresh_copies_without_strict():
  body = {"tools": [fn("f", parameters={"type": "object"}, strict=True)]}
  request = parse_tools(body)
  listed = request.tools_for_template
  assert listed == [fn("f", parameters={"type": "object"})]
  listed[0]["function"]["name"] = "changed"
  body["tools"][0]["function"]["parameters"]["type"] = "changed"
  assert request.tools_for_template == [fn("f", parameters={"type": "object"})]


@pytest.mark.parametrize("body", [{}, {"tools": None}, {"tools": []}, {"tool_choice": "none"},
                                  {"tool_choice": "auto", "parallel_tool_calls": False}])
def test_no_tools_is_none(body):
  assert parse_tools(body) is None


def test_choices():
  named = parse_tools({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}},
                       "parallel_tool_calls": False})
  assert (named.choice, named.forced, named.parallel, named.max_calls) == ("get_time", True, False, 1)
  required = parse_tools({"tools": [WEATHER], "tool_choice": "required"})
  assert (required.choice, required.forced) == ("required", True)
  none = parse_tools({"tools": [WEATHER], "tool_choice": "none"})
  assert none.choice == "none" and not none.forced and not none.parses_calls
  assert none.tools_for_template == [WEATHER]  # listed, as vLLM does
  assert parse_tools({"tools": [WEATHER], "tool_choice": "none"}, tools_when_none=False).tools_for_template is None
  assert parse_tools({"tools": [WEATHER]}, tools_when_none=False).tools_for_template == [WEATHER]


def _tool_with(**function):
  return {"tools": [{"type": "function", "function": {"name": "f", **function}}]}


BAD_BODIES = [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": ["f"]}, "tools.[0]"),
    ({"tools": [WEATHER, {"function": {"name": "g"}}]}, "tools.[1].type"),
    ({"tools": [{"type": "custom", "custom": {"name": "g"}}]}, "tools.[0].type"),
    ({"tools": [{**WEATHER, "extra": 1}]}, "tools.[0].extra"),
    ({"tools": [{"type": "function"}]}, "tools.[0].function"),
    ({"tools": [{"type": "function", "function": "f"}]}, "tools.[0].function"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools.[0].function.name"),
    (_tool_with(name=""), "tools.[0].function.name"),
    (_tool_with(name="get weather"), "tools.[0].function.name"),
    (_tool_with(name="wetter_für_stadt"), "tools.[0].function.name"),
    (_tool_with(name="x" * 65), "tools.[0].function.name"),
    (_tool_with(name=3), "tools.[0].function.name"),
    (_tool_with(description=["a"]), "tools.[0].function.description"),
    (_tool_with(parameters="object"), "tools.[0].function.parameters"),
    (_tool_with(parameters={"type": "string"}), "tools.[0].function.parameters.type"),
    (_tool_with(strict="yes"), "tools.[0].function.strict"),
    (_tool_with(arguments={}), "tools.[0].function.arguments"),
    ({"tools": [WEATHER, TIME, WEATHER]}, "tools.[2].function.name"),
    ({"tools": [fn(f"f{i}") for i in range(MAX_TOOLS + 1)]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "any"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "get_weather"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": 1}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": ["auto"]}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": {"function": {"name": "get_weather"}}}, "tool_choice.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice.function"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": 1}}}, "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather", "x": 1}}},
     "tool_choice.function.x"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}, "n": 1}},
     "tool_choice.n"),
    ({"tools": [WEATHER], "parallel_tool_calls": "false"}, "parallel_tool_calls"),
    ({"parallel_tool_calls": 0}, "parallel_tool_calls"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_bad_tool_fields(body, param):
  with pytest.raises(RequestError) as e:
    parse_tools(body)
  assert e.value.param == param
  assert param.split(".")[-1].strip("[]0123456789") in str(e.value) or "tool" in str(e.value)


def test_unknown_forced_name_lists_the_tools():
  with pytest.raises(RequestError, match="'get_weather', 'get_time'"):
    parse_tools({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "nope"}}})


# ----------------------------------------------------------------------------- call_schema


def test_call_schema_one_tool():
  jsonschema = pytest.importorskip("jsonschema")
  schema = parse_tools({"tools": [WEATHER], "tool_choice": "required"}).call_schema()
  assert schema["properties"]["name"] == {"const": "get_weather"}
  assert schema["properties"]["arguments"] == WEATHER["function"]["parameters"]
  assert schema["required"] == ["name", "arguments"] and schema["additionalProperties"] is False
  jsonschema.validate({"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}, schema)
  for wrong in ({"name": "get_time", "arguments": {"city": "Paris"}},      # a wrong name
                {"name": "get_weather", "arguments": {"unit": "C"}},       # a required argument missing
                {"name": "get_weather", "arguments": {"city": 3}},         # a wrong type
                {"name": "get_weather", "arguments": {"city": "P", "x": 1}},
                {"name": "get_weather"},
                {"name": "get_weather", "arguments": {"city": "P"}, "id": "x"}):
    with pytest.raises(jsonschema.ValidationError):
      jsonschema.validate(wrong, schema)


def test_call_schema_pairs_each_name_with_its_arguments():
  jsonschema = pytest.importorskip("jsonschema")
  request = parse_tools({"tools": [WEATHER, TIME], "tool_choice": "required"})
  schema = request.call_schema()
  assert len(schema["anyOf"]) == 2
  jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, schema)
  jsonschema.validate({"name": "get_time", "arguments": {"tz": "UTC"}}, schema)  # no parameters: any object
  for wrong in ({"name": "get_weather", "arguments": {"tz": "UTC"}}, {"name": "get_time", "arguments": []},
                {"name": "other", "arguments": {}}):
    with pytest.raises(jsonschema.ValidationError):
      jsonschema.validate(wrong, schema)
  named = parse_tools({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
  assert named.call_schema()["properties"]["name"] == {"const": "get_time"}
  with pytest.raises(jsonschema.ValidationError):
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, named.call_schema())


def test_call_schema_moves_refs_under_defs():
  jsonschema = pytest.importorskip("jsonschema")
  point = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
  parameters = {"type": "object", "$defs": {"Point": point},
                "properties": {"at": {"$ref": "#/$defs/Point"}, "enum": {"items": {"$ref": "#/$defs/Point"}},
                               "next": {"$ref": "#"}, "note": {"const": {"$ref": "#/kept"}}}}
  request = parse_tools({"tools": [fn("move", parameters=parameters), TIME], "tool_choice": "required"})
  schema = request.call_schema()
  jsonschema.Draft202012Validator.check_schema(schema)
  good = {"name": "move", "arguments": {"at": {"x": 1}, "enum": [{"x": 2}], "next": {"at": {"x": 3}},
                                        "note": {"$ref": "#/kept"}}}
  jsonschema.validate(good, schema)
  for at in ({"x": "1"}, {}):
    with pytest.raises(jsonschema.ValidationError):
      jsonschema.validate({"name": "move", "arguments": {"at": at}}, schema)
  with pytest.raises(jsonschema.ValidationError):
    jsonschema.validate({"name": "move", "arguments": {"next": {"at": {"x": "deep"}}}}, schema)
  assert request.tools[0]["function"]["parameters"] == parameters  # the request's tools are untouched


def test_call_schema_without_tools_choice_is_every_tool():
  schema = parse_tools({"tools": [WEATHER, TIME]}).call_schema()
  assert [o["properties"]["name"]["const"] for o in schema["anyOf"]] == ["get_weather", "get_time"]


# ----------------------------------------------------------------------------- plain_messages


def test_plain_messages_parses_arguments():
  messages = [
      {"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"id": "call_1", "type": "function",
           "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
          {"id": "call_2", "function": {"name": "get_time", "arguments": {"tz": "CET"}}}]},
      {"role": "tool", "content": "21 C", "tool_call_id": "call_1", "name": "get_weather"},
      {"role": "tool", "content": "12:00"},
  ]
  before = copy.deepcopy(messages)
  plain = plain_messages(messages)
  assert messages == before
  calls = plain[1]["tool_calls"]
  assert calls[0] == {"id": "call_1", "type": "function",
                      "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
  assert calls[1] == {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "CET"}}}
  assert plain[0] == messages[0] and plain[2] == messages[2] and plain[3] == messages[3]


def _with_call(call):
  return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]


GOOD_CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
BAD_MESSAGES = [
    (_with_call({**GOOD_CALL, "function": {"name": "f", "arguments": "{city: Paris}"}}),
     "messages.[1].tool_calls.[0].function.arguments"),
    (_with_call({**GOOD_CALL, "function": {"name": "f", "arguments": "[1, 2]"}}),
     "messages.[1].tool_calls.[0].function.arguments"),
    (_with_call({**GOOD_CALL, "function": {"name": "f"}}), "messages.[1].tool_calls.[0].function.arguments"),
    (_with_call({**GOOD_CALL, "function": {"arguments": "{}"}}), "messages.[1].tool_calls.[0].function.name"),
    (_with_call({**GOOD_CALL, "function": "f"}), "messages.[1].tool_calls.[0].function"),
    (_with_call({**GOOD_CALL, "type": "code"}), "messages.[1].tool_calls.[0].type"),
    (_with_call({**GOOD_CALL, "id": 7}), "messages.[1].tool_calls.[0].id"),
    (_with_call("f()"), "messages.[1].tool_calls.[0]"),
    ([{"role": "assistant", "content": "", "tool_calls": {"name": "f"}}], "messages.[0].tool_calls"),
    ([{"role": "user", "content": "", "tool_calls": [GOOD_CALL]}], "messages.[0].tool_calls"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": None}], "messages.[1].content"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x", "tool_call_id": 1}],
     "messages.[1].tool_call_id"),
]


@pytest.mark.parametrize("messages,param", BAD_MESSAGES)
def test_bad_messages(messages, param):
  with pytest.raises(RequestError) as e:
    plain_messages(messages)
  assert e.value.param == param
