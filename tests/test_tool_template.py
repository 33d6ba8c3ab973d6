"""Qwen2.5's chat format with tools (tests/qwen_templates.py): the exact text it writes, the same text from
qwen_logical's ChatTemplate and from transformers' apply_chat_template, and replies in that form parsed back."""

import json

import pytest
from qwen_templates import QWEN25_TEMPLATE, TIME, WEATHER
from qwen_templates import tool_call_block as block
from tokenizer_fixtures import hf, model_dir, trained  # noqa: F401 (fixtures)

from qwen_logical.checkpoints.chat_template import ChatTemplate
from qwen_logical.serving.openai_tools import parse_tools, plain_messages
from qwen_logical.serving.tool_calls import parse_reply


# ----------------------------------------------------------------------------- the chat template

TOOL_CONVERSATION = [
    {"role": "user", "content": "What's the weather in Paris, and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "{\"temp\": 21, \"sky\": \"ensoleillé\"}"},
    {"role": "tool", "tool_call_id": "call_b", "content": "12:00"},
    {"role": "assistant", "content": "It is 21 °C and sunny; the time is 12:00."},
    {"role": "user", "content": "And in Zürich?"},
]

EXPECTED_SMALL = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
    "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_time"}}\n</tools>\n\nFor each function call, return a json '
    "object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nTime?<|im_end|>\n"
    '<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n'
    "</tool_call><|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n12:00\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n")


def test_template_writes_qwen25_format():
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Time?"},
              {"role": "assistant", "content": "Checking.", "tool_calls": [
                  {"id": "c", "type": "function",
                   "function": {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}}]},
              {"role": "tool", "content": "12:00"}]
  text = ChatTemplate(QWEN25_TEMPLATE).render(plain_messages(messages), add_generation_prompt=True,
                                              tools=parse_tools({"tools": [TIME]}).tools_for_template)
  assert text == EXPECTED_SMALL
  no_tools = ChatTemplate(QWEN25_TEMPLATE).render([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
  assert no_tools == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                      "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


@pytest.mark.parametrize("system", [None, "You check facts."])
def test_template_matches_transformers(hf, system):  # noqa: F811 (fixture)
  messages = plain_messages(([{"role": "system", "content": system}] if system else []) + TOOL_CONVERSATION)
  tools = parse_tools({"tools": [WEATHER, TIME]}).tools_for_template
  text = ChatTemplate(QWEN25_TEMPLATE).render(messages, add_generation_prompt=True, tools=tools,
                                              variables={"eos_token": "<|im_end|>"})
  assert text == hf.apply_chat_template(messages, tools=tools, chat_template=QWEN25_TEMPLATE, tokenize=False,
                                        add_generation_prompt=True)
  assert "\n<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n" + json.dumps(TIME) + "\n</tools>" in text
  assert ("<|im_start|>assistant\n" + block("get_weather", {"city": "Paris"}) + "\n" + block("get_time", {})
          + "<|im_end|>\n") in text
  assert ("<|im_start|>user\n<tool_response>\n{\"temp\": 21, \"sky\": \"ensoleillé\"}\n</tool_response>\n"
          "<tool_response>\n12:00\n</tool_response><|im_end|>\n") in text
  assert text.count("<|im_start|>user") == 3 and text.endswith("<|im_start|>assistant\n")
  # What the model writes back in that form parses to the calls the conversation carried.
  reply = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
  content, calls = parse_reply(reply, {"get_weather", "get_time"})
  assert content is None and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Paris"}'),
                                                                       ("get_time", "{}")]
