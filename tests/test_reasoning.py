"""Qwen3's thinking mode through the chat path: `chat_template_kwargs` reaching the chat template (HTTP and
main.py's chat prompts), and the reasoning parser (serve.reasoning_parser "qwen3") splitting a reply's
`<think>` block into `reasoning_content`, whole and streamed, before tool calls are parsed from the rest.
HTTP runs against the fake engine, whose scripted reply is known text."""

import itertools
import json

import pytest
from ml_collections import ConfigDict
from qwen_templates import QWEN3_TEMPLATE, WEATHER
from qwen_templates import tool_call_block as block
from serve_helpers import CHAT, DONE, HI, FakeEngine, ServerThread, client, post, test_tokenizer

from qwen_logical.checkpoints.chat_template import ChatTemplate
from qwen_logical.jobs.common.build import JobError
from qwen_logical.serving.openai_api import ServedModel
from qwen_logical.serving.reasoning import ReasoningSplitter, split_reasoning

# ----------------------------------------------------------------------------- the splitter

WHOLE = [  # (reply, prompt opened the block) -> (reasoning, content)
    (("<think>\nThe user greets.\n</think>\n\nHello!", False), ("The user greets.", "Hello!")),
    (("Hello <think>x</think>", False), (None, "Hello <think>x</think>")),
    (("\n <think>a\n\nb</think>c\n", False), ("a\n\nb", "c\n")),
    (("<think>\ncut short\n", False), ("cut short", "")),
    (("<think>\n\n</think>\n\nDirect.", False), (None, "Direct.")),
    (("<thi", False), (None, "<thi")),
    (("Reasoning on.\n</think>\n\nAnswer", True), ("Reasoning on.", "Answer")),
    (("<think>\nagain\n</think>Answer", True), ("again", "Answer")),
    (("still going </thin", True), ("still going </thin", "")),
    (("", True), (None, "")),
    (("a </think> b </think> c", True), ("a ", " b </think> c")),
]


@pytest.mark.parametrize("case", WHOLE, ids=[repr(c[0][0])[:30] for c in WHOLE])
def test_whole_replies(case):
  (text, opened), expected = case
  assert split_reasoning(text, opened) == expected


def _streamed(pieces, opened):
  splitter, reasoning, content = ReasoningSplitter(opened), "", ""
  for piece in pieces:
    r, c = splitter.push(piece)
    reasoning, content = reasoning + r, content + c
  r, c = splitter.finish()
  return reasoning + r or None, content + c


@pytest.mark.parametrize("case", WHOLE, ids=[repr(c[0][0])[:30] for c in WHOLE])
def test_every_split_of_a_stream_gives_the_whole_answer(case):
  """Pieces cut anywhere (inside `<think>`, `</think>`, the newlines around them) join to the same split."""
  (text, opened), expected = case
  for k in (1, 2):
    for cuts in itertools.combinations(range(1, len(text)), k):
      bounds = (0, *cuts, len(text))
      pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
      assert _streamed(pieces, opened) == expected, pieces
  assert _streamed(list(text), opened) == expected


def test_reasoning_streams_before_the_block_ends():
  splitter = ReasoningSplitter()
  assert splitter.push("<think>\nStep one") == ("Step one", "")
  assert splitter.push(", step two.\n</th") == (", step two.", "")  # the tag and the newline before it wait
  assert splitter.push("ink>\n\nDone") == ("", "Done")
  assert splitter.finish() == ("", "")


# ----------------------------------------------------------------------------- the template


@pytest.mark.parametrize("thinking", [None, True, False])
def test_the_qwen3_template_matches_transformers(tokenizer, thinking):
  from transformers import AutoTokenizer
  hf = AutoTokenizer.from_pretrained(tokenizer.source)
  messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello"},
              {"role": "user", "content": "Weather?"}]
  variables = {} if thinking is None else {"enable_thinking": thinking}
  text = ChatTemplate(QWEN3_TEMPLATE).render(messages, tools=[WEATHER], variables=variables)
  assert text == hf.apply_chat_template(messages, tools=[WEATHER], tokenize=False, add_generation_prompt=True,
                                        **variables)
  assert tokenizer.apply_chat_template(messages, tools=[WEATHER], **variables) == text
  assert "hm" not in text  # an earlier turn's reasoning is left out
  tail = "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n"
  assert text.endswith(tail + "<think>\n\n</think>\n\n" if thinking is False else tail)


# ----------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return _tokenizer(tmp_path_factory.mktemp("qwen3-tokenizer"), QWEN3_TEMPLATE)


def _tokenizer(directory, template):
  tok = test_tokenizer(directory)
  config = json.loads((directory / "tokenizer_config.json").read_text())
  (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
  return type(tok).from_directory(directory)


def _server(tokenizer, reply=None, parser="qwen3"):
  """(FakeEngine, ServerThread) of a server whose every reply is the text `reply` (then <|im_end|>)."""
  script = tokenizer.encode(reply) + [tokenizer.token_to_id("<|im_end|>")] if reply is not None else None
  engine = FakeEngine(context=1000, script=script)
  engine.start()
  return engine, ServerThread(_app(engine, ServedModel("tiny", tokenizer, 1000, 320, reasoning_parser=parser)))


def _app(engine, served):
  from qwen_logical.serving.http_app import create_app
  return create_app(engine, served)


def test_chat_template_kwargs_reach_the_template(tokenizer):
  prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  engine, server = _server(tokenizer, parser="")
  with server:
    for kwargs, text in ((None, prompt), ({}, prompt), ({"enable_thinking": True}, prompt),
                         ({"enable_thinking": False}, prompt + "<think>\n\n</think>\n\n")):
      status, answer = post(server.url, CHAT, {"model": "tiny", "messages": HI, "max_tokens": 2,
                                               "chat_template_kwargs": kwargs})
      assert status == 200, answer
      ids = tokenizer.encode(text, add_special_tokens=False)
      assert answer["usage"]["prompt_tokens"] == len(ids) and list(engine.submitted[-1].tokens) == ids
  engine.stop(1)


BAD_KWARGS = [[], "enable_thinking", 3, {"messages": []}, {"tools": []}, {"add_generation_prompt": False},
              {"eos_token": "x"}, {"raise_exception": 1}]


def test_bad_chat_template_kwargs_get_400_naming_the_field(tokenizer):
  engine, server = _server(tokenizer)
  with server:
    for kwargs in BAD_KWARGS:
      status, answer = post(server.url, CHAT, {"model": "tiny", "messages": HI, "chat_template_kwargs": kwargs})
      assert status == 400 and answer["error"]["param"] == "chat_template_kwargs", (kwargs, answer)
      assert "chat_template_kwargs" in answer["error"]["message"]
    status, answer = post(server.url, DONE, {"model": "tiny", "prompt": "Hi", "chat_template_kwargs": {}})
    assert status == 400 and answer["error"]["param"] == "chat_template_kwargs"  # chat only
    status, answer = post(server.url, CHAT, {"model": "tiny", "messages": HI, "max_tokens": 3})
    assert status == 200 and answer["usage"]["completion_tokens"] == 3
  engine.stop(1)
  assert len(engine.submitted) == 1  # none of the bad requests reached the engine


REPLY = "<think>\nThe user greets; answer.\n</think>\n\nHello there!"


def test_the_reasoning_parser_splits_whole_and_streamed_replies(tokenizer):
  engine, server = _server(tokenizer, REPLY)
  with server:
    status, answer = post(server.url, CHAT, {"model": "tiny", "messages": HI})
    assert status == 200, answer
    message = answer["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hello there!", "reasoning_content": "The user greets; answer."}
    assert answer["choices"][0]["finish_reason"] == "stop"
    chunks = list(client(server.url).chat.completions.create(model="tiny", messages=HI, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    reasoning = [getattr(d, "reasoning_content", None) or "" for d in deltas]
    assert "".join(reasoning) == message["reasoning_content"] and sum(bool(r) for r in reasoning) > 1
    assert "".join(d.content or "" for d in deltas) == "Hello there!"
    last_reasoning = max(i for i, r in enumerate(reasoning) if r)
    assert not any(d.content for d in deltas[:last_reasoning])  # content only once the block has closed
  engine.stop(1)


def test_tool_calls_are_parsed_from_the_content_only(tokenizer):
  reply = "<think>\nI could write <tool_call> here, but it is thought.\n</think>\n\n" + block("get_weather",
                                                                                          {"city": "Oslo"})
  engine, server = _server(tokenizer, reply)
  with server:
    for stream in (False, True):
      body = {"model": "tiny", "messages": HI, "tools": [WEATHER], "stream": stream}
      if stream:
        chunks = list(client(server.url).chat.completions.create(**body))
        deltas = [c.choices[0].delta for c in chunks]
        reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        calls = [call for d in deltas for call in d.tool_calls or []]
        names, content = [c.function.name for c in calls if c.function.name], "".join(d.content or "" for d in deltas)
        reason = chunks[-1].choices[0].finish_reason
      else:
        status, answer = post(server.url, CHAT, body)
        assert status == 200, answer
        message, reason = answer["choices"][0]["message"], answer["choices"][0]["finish_reason"]
        reasoning, content = message["reasoning_content"], message["content"] or ""
        names = [c["function"]["name"] for c in message["tool_calls"]]
      assert reasoning == "I could write <tool_call> here, but it is thought."
      assert names == ["get_weather"] and content == "" and reason == "tool_calls", stream
  engine.stop(1)


def test_a_prompt_that_opens_the_block_and_a_server_without_the_parser(tmp_path):
  opening = _tokenizer(tmp_path, QWEN3_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}\n  {%- if enable",
                                                        "{{- '<|im_start|>assistant\\n<think>\\n' }}\n  {%- if enable"))
  assert opening.apply_chat_template(HI).endswith("assistant\n<think>\n")
  engine, server = _server(opening, "Thinking it over.\n</think>\n\nHi!")
  with server:
    message = post(server.url, CHAT, {"model": "tiny", "messages": HI})[1]["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("Thinking it over.", "Hi!")
  engine.stop(1)
  engine, server = _server(opening, REPLY, parser="")
  with server:
    message = post(server.url, CHAT, {"model": "tiny", "messages": HI})[1]["choices"][0]["message"]
    assert message == {"role": "assistant", "content": REPLY}  # off: the text as written, no reasoning_content
  engine.stop(1)
  with pytest.raises(ValueError, match="reasoning_parser"):
    ServedModel("tiny", opening, 1000, 320, reasoning_parser="deepseek")


# ----------------------------------------------------------------------------- main.py's chat prompts


def test_main_reads_chat_template_kwargs(tokenizer, tmp_path):
  from qwen_logical.jobs.run import chat_template_kwargs, prepare_request
  directory = tmp_path / "tok"
  _tokenizer(directory, QWEN3_TEMPLATE)
  config = ConfigDict({"temperature": 0.0, "top_k": 0, "top_p": 1.0, "tokenizer": str(directory), "checkpoint": "",
                       "chat": True, "chat_template_kwargs": '{"enable_thinking": false}'})
  ids = prepare_request(config, ["Hi"]).inputs[0]
  assert tokenizer.decode(ids).endswith("assistant\n<think>\n\n</think>\n\n")
  for value in ("", {}, ConfigDict({"enable_thinking": False})):
    assert chat_template_kwargs(ConfigDict({"chat_template_kwargs": value})) == ({} if not value else
                                                                               {"enable_thinking": False})
  assert chat_template_kwargs(ConfigDict({})) == {}
  for bad in ("{nope", "[1]", '{"messages": 1}'):
    with pytest.raises(JobError, match="chat_template_kwargs"):
      chat_template_kwargs(ConfigDict({"chat_template_kwargs": bad}))
