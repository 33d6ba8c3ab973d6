"""Tool calls in a Qwen2.5 reply (tool_calls): the `<tool_call>` blocks of a whole reply, and the same
reply streamed in pieces of every size giving the same content and calls."""

import random
import re

import pytest
from qwen_templates import tool_call_block as block

from qwen_logical.serving.tool_calls import Delta, ToolCallStream, finish_reason, parse_reply


# ----------------------------------------------------------------------------- parse_reply


def test_reply_without_calls():
  assert parse_reply("  The answer is 4.\n") == ("The answer is 4.", [])
  assert parse_reply("") == (None, [])
  assert parse_reply(" \n ") == (None, [])


def test_reply_with_one_call():
  content, calls = parse_reply(block("get_weather", {"city": "Paris"}))
  assert content is None and len(calls) == 1
  call = calls[0]
  assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)
  assert (call.name, call.arguments) == ("get_weather", '{"city":"Paris"}')
  assert call.as_dict() == {"id": call.id, "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}


def test_reply_with_two_calls_and_text():
  text = "Let me check.\n" + block("get_weather", {"city": "Paris"}) + "\n" + block("get_time", {}) + "\n"
  content, calls = parse_reply(text)
  assert content == "Let me check."
  assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Paris"}'), ("get_time", "{}")]
  assert calls[0].id != calls[1].id
  assert parse_reply(text, max_calls=1)[1][0].name == "get_weather" and len(parse_reply(text, max_calls=1)[1]) == 1


def test_reply_call_forms():
  as_text = '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": [1, 2.5, null]}"}\n</tool_call>'
  assert [(c.name, c.arguments) for c in parse_reply(as_text)[1]] == [("f", '{"a":[1,2.5,null]}')]
  no_arguments = '<tool_call>{"name": "f"}</tool_call>'
  assert [(c.name, c.arguments) for c in parse_reply(no_arguments)[1]] == [("f", "{}")]
  unicode = block("translate", {"text": "日本語 ✓ café 😀"})
  assert parse_reply(unicode)[1][0].arguments == '{"text":"日本語 ✓ café 😀"}'
  assert parse_reply('<tool_call>{"name": "f", "arguments": {"s": "\\ud800"}}</tool_call>')[1][0].arguments \
      == '{"s":"\\ud800"}'  # a lone surrogate stays escaped: the text must encode as UTF-8


MALFORMED = [
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',           # bad JSON
    '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',                       # no name
    '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',                  # name not a string
    '<tool_call>\n{"name": "a b", "arguments": {}}\n</tool_call>',              # not a tool name
    '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',               # arguments not an object
    '<tool_call>\n{"name": "f", "arguments": "[1]"}\n</tool_call>',             # nor as text
    '<tool_call>\n{"name": "f", "arguments": "{oops"}\n</tool_call>',           # arguments text not JSON
    '<tool_call>\n{"name": "f", "arguments": {"a": NaN}}\n</tool_call>',        # NaN is not JSON
    '<tool_call>\n["f", {}]\n</tool_call>',                                      # not an object
    '<tool_call>\n' + "[" * 100_000 + "\n</tool_call>",                          # too deep to parse
    '<tool_call>\n{"name": "f", "arguments": {}}',                               # never closed
    '<tool_call>',
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_block_stays_text(text):
  assert parse_reply("Before " + text + " after") == ("Before " + text + " after", [])


def test_unknown_name_stays_text():
  text = block("get_weather", {"city": "Paris"}) + block("rm_rf", {"path": "/"})
  content, calls = parse_reply(text, known_names={"get_weather"})
  assert content == block("rm_rf", {"path": "/"}) and [c.name for c in calls] == ["get_weather"]
  assert [c.name for c in parse_reply(text)[1]] == ["get_weather", "rm_rf"]  # None: any name
  assert parse_reply(text, known_names=())[1] == []


def test_second_open_tag_makes_the_first_text():
  text = "<tool_call> thinking <tool_call>\n" + block("f", {})[len("<tool_call>\n"):]
  content, calls = parse_reply(text)
  assert content == "<tool_call> thinking" and [c.name for c in calls] == ["f"]
  assert parse_reply("a </tool_call> b") == ("a </tool_call> b", [])


def test_finish_reason():
  calls = parse_reply(block("f", {}))[1]
  assert finish_reason("stop", calls) == "tool_calls"
  assert finish_reason("length", calls) == "length"
  assert finish_reason("stop", []) == "stop" and finish_reason(None, calls) is None


# ----------------------------------------------------------------------------- ToolCallStream

REPLIES = [
    "",
    "Plain text, no tools. <b>bold</b> < tool_call >",
    block("get_weather", {"city": "Paris"}),
    "I'll look.\n\n" + block("get_weather", {"city": "Zürich"}) + "\n" + block("get_time", {}) + "\n",
    "A" + block("f", {"x": [1, {"y": "<tool_call>"}]}) + "B <tool_" + "call> " + block("g", {}),
    "Text " + MALFORMED[0] + " middle " + block("f", {"k": "v"}) + " end " + MALFORMED[-2],
    "<tool_call> thinking <tool_call>\n" + block("f", {})[len("<tool_call>\n"):] + "\n\n  ",
    "tail <tool_c",
    "  \n" + block("unknown", {}) + "  " + block("f", {"a": "日本"}) + " ok",
]


def run_stream(pieces, **kwargs):
  """(content joined, [(name, arguments)], deltas) of a stream fed `pieces`, checking each delta's shape."""
  stream = ToolCallStream(**kwargs)
  deltas = [d for p in pieces for d in stream.push(p)] + stream.finish()
  calls, open_call = [], None
  for d in deltas:
    assert isinstance(d, Delta) and (d.text == "") != (d.call is None)
    if d.call is None:
      continue
    if "id" in d.call:
      assert d.call["index"] == len(calls) and d.call["type"] == "function"
      assert re.fullmatch(r"call_[0-9a-f]{24}", d.call["id"]) and d.call["function"]["arguments"] == ""
      calls.append([d.call["function"]["name"], ""])
      open_call = d.call["index"]
    else:
      assert d.call["index"] == open_call and set(d.call) == {"index", "function"}
      calls[-1][1] += d.call["function"]["arguments"]
  assert [[c.name, c.arguments] for c in stream.calls] == calls
  return "".join(d.text for d in deltas) or None, [tuple(c) for c in calls], deltas


def whole(text, **kwargs):
  content, calls = parse_reply(text, **kwargs)
  return content, [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("text", REPLIES)
def test_stream_split_anywhere_matches_parse_reply(text):
  kwargs = {"known_names": {"f", "g", "get_weather", "get_time"}}
  expected = whole(text, **kwargs)
  assert run_stream([text], **kwargs)[:2] == expected
  assert run_stream(list(text), **kwargs)[:2] == expected  # one character at a time
  for cut in range(len(text) + 1):
    assert run_stream([text[:cut], text[cut:]], **kwargs)[:2] == expected, cut
  rng = random.Random(len(text))
  for _ in range(30):
    pieces, at = [], 0
    while at < len(text):
      n = rng.randint(0, 12)
      pieces.append(text[at:at + n])
      at += n
    assert run_stream(pieces, **kwargs)[:2] == expected, pieces


def test_stream_max_calls():
  text = REPLIES[3]
  assert run_stream(list(text), max_calls=1)[:2] == whole(text, max_calls=1)
  assert len(whole(text, max_calls=1)[1]) == 1


def test_stream_holds_back_a_possible_tag():
  stream = ToolCallStream()
  assert stream.push("Hello <tool") == [Delta(text="Hello")]
  assert stream.push("_") == []
  assert stream.push("box> there") == [Delta(text=" <tool_box> there")]
  assert stream.push("\n\n<tool_call>\n{\"name\": \"f\", ") == []
  deltas = stream.push("\"arguments\": {}}\n</tool_call>")
  assert [d.call["function"] for d in deltas] == [{"name": "f", "arguments": ""}, {"arguments": "{}"}]
  assert stream.push("<tool_ca") == [] and stream.finish() == [Delta(text="\n\n<tool_ca")]
  assert [c.name for c in stream.calls] == ["f"]
