"""The OpenAI API as real clients use it, through the official `openai` client against a real engine on a
tiny checkpoint whose logits look real: logprobs and top_logprobs (chat), logprobs and echo with max_tokens 0
(completions, as lm-evaluation-harness scores answers) against transformers' float32 log-softmax; n choices;
penalties; the prefix cache in usage and /metrics; tools and tool_choice with Qwen2.5's chat format; JSON
schemas enforced on a random model; and a 400 naming the field for each bad value, the server answering on."""

import json

import numpy as np
import pytest
import torch
from serve_helpers import metric_samples, post, serving, write_instruct_checkpoint

CONTEXT = 1024  # a prompt with tools in Qwen2.5's format is ~720 tokens of the tests' small tokenizer
DONE = "/v1/completions"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tiny-instruct")
  model = write_instruct_checkpoint(directory, real_looking=True)
  _use_qwen_template(directory)
  with serving(directory, "1x1", CONTEXT, model=model) as served:
    yield served


def _use_qwen_template(directory):
  from qwen_templates import QWEN25_TEMPLATE
  path = directory / "tokenizer_config.json"
  config = json.loads(path.read_text())
  config["chat_template"] = QWEN25_TEMPLATE
  path.write_text(json.dumps(config))


def _log_softmax(model, ids) -> np.ndarray:
  with torch.no_grad():
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1).numpy()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_logprobs_equal_transformers(served, stream):
  messages = [{"role": "user", "content": "Name three colours."}]
  ids = served.tokenizer.encode_chat(messages)
  response = served.client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                   logprobs=True, top_logprobs=3, stream=stream,
                                                   extra_body={"return_token_ids": True})
  if stream:
    chunks = [c for c in response if c.choices]
    tokens = [t for c in chunks for t in (c.choices[0].token_ids or [])]
    items = [item for c in chunks if c.choices[0].logprobs for item in c.choices[0].logprobs.content]
  else:
    tokens, items = response.choices[0].token_ids, response.choices[0].logprobs.content
  reference = _log_softmax(served.model, ids + tokens)
  assert len(items) == len(tokens) == 6
  for j, (token, item) in enumerate(zip(tokens, items)):
    row = reference[len(ids) + j - 1]
    assert abs(item.logprob - row[token]) < 1e-3 and bytes(item.bytes) == served.tokenizer.decode([token]).encode() \
        or item.token.startswith("bytes:")
    assert [t.logprob for t in item.top_logprobs] == pytest.approx(np.sort(row)[::-1][:3].tolist(), abs=1e-3)


def test_completion_echo_scores_the_prompt_as_lm_eval_asks(served):
  """lm-evaluation-harness's local-completions: a token-id prompt, echo, logprobs 1, max_tokens 0 (or 1)."""
  ids = served.tokenizer.encode("The capital of France is Paris.")
  reference = _log_softmax(served.model, ids)
  for max_tokens in (0, 1):
    body = {"model": "tiny", "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": max_tokens,
            "temperature": 0}
    status, response = post(served.url, DONE, body)
    assert status == 200, response
    choice = response["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids) + max_tokens and logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None and logprobs["text_offset"][0] == 0
    expected = [reference[i - 1][ids[i]] for i in range(1, len(ids))]
    assert np.allclose(logprobs["token_logprobs"][1:len(ids)], expected, atol=1e-3)
    greedy = [max(top.values()) for top in logprobs["top_logprobs"][1:len(ids)]]
    assert np.allclose(greedy, reference[:-1].max(axis=-1), atol=1e-3)
    assert choice["text"].startswith(served.tokenizer.decode(ids))
    assert response["usage"]["completion_tokens"] == max_tokens


def test_streamed_completion_logprobs_equal_the_whole_ones(served):
  """Each chunk's tokens carry the offsets the whole answer gives them, also when text is held back (a
  stop string's possible start, a character split over tokens); echo without logprobs is text only."""
  body = {"model": "tiny", "prompt": "Hello 你好", "max_tokens": 12, "temperature": 0, "logprobs": 2,
          "stop": ["zzq"], "echo": True}
  status, whole = post(served.url, DONE, body)
  assert status == 200, whole
  expected = whole["choices"][0]["logprobs"]
  chunks = served.client.completions.create(**{**body, "stream": True})
  got = {"tokens": [], "token_logprobs": [], "text_offset": []}
  text = ""
  for chunk in chunks:
    for ch in chunk.choices:
      text += ch.text
      for key in got:
        got[key] += getattr(ch.logprobs, key) or [] if ch.logprobs else []
  assert text == whole["choices"][0]["text"] and got["tokens"] == expected["tokens"]
  assert got["text_offset"] == expected["text_offset"]
  plain = post(served.url, DONE, {**body, "logprobs": None})[1]["choices"][0]
  assert plain["logprobs"] is None and plain["text"] == whole["choices"][0]["text"]


def test_n_choices_have_their_own_seeds_and_indexes(served):
  c = served.client
  whole = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=1.0, n=3, seed=5)
  assert [ch.index for ch in whole.choices] == [0, 1, 2] and len({ch.text for ch in whole.choices}) > 1
  assert whole.usage.completion_tokens == 24
  streamed = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=1.0, n=3,
                                  seed=5, stream=True)
  texts = ["", "", ""]
  for chunk in streamed:
    for ch in chunk.choices:
      texts[ch.index] += ch.text
  assert texts == [ch.text for ch in whole.choices]
  alone = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=6)
  assert alone.choices[0].text == whole.choices[1].text  # choice i draws with seed + i


def test_several_prompts_get_n_choices_each(served):
  """lm-evaluation-harness batches prompts: choice i answers prompt i // n, usage counts each prompt once."""
  prompts = [served.tokenizer.encode("One two"), served.tokenizer.encode("Three four five")]
  body = {"model": "tiny", "prompt": prompts, "n": 2, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 1,
          "return_token_ids": True}
  status, response = post(served.url, DONE, body)
  assert status == 200, response
  choices = response["choices"]
  assert [c["index"] for c in choices] == [0, 1, 2, 3]
  for c, ids in zip(choices, [prompts[0]] * 2 + [prompts[1]] * 2):
    alone = post(served.url, DONE, {**body, "prompt": ids, "n": 1})[1]["choices"][0]
    assert c["text"] == alone["text"] and c["token_ids"] == alone["token_ids"]
    assert c["logprobs"]["token_logprobs"][1:] == pytest.approx(alone["logprobs"]["token_logprobs"][1:], abs=1e-5)
  assert response["usage"]["prompt_tokens"] == len(prompts[0]) + len(prompts[1])
  assert response["usage"]["completion_tokens"] == 12


def test_the_prefix_cache_shows_in_usage_and_metrics(served):
  c = served.client
  system = {"role": "system", "content": "You answer questions about the weather in great detail. " * 2}
  first = c.chat.completions.create(model="tiny", messages=[system, {"role": "user", "content": "Rain?"}],
                                    max_tokens=4, temperature=0)
  second = c.chat.completions.create(model="tiny", messages=[system, {"role": "user", "content": "Snow?"}],
                                     max_tokens=4, temperature=0)
  assert first.usage.prompt_tokens_details.cached_tokens == 0
  cached = second.usage.prompt_tokens_details.cached_tokens
  assert cached >= 48 and second.usage.prompt_tokens - cached in (16, 64)  # the rest runs in a bucket of 16 or 64
  samples = {name: value for (name, _), value in metric_samples(served.url).items()}
  assert samples["qwen_logical_prefix_cache_hits"] >= 1 and 0 < samples["qwen_logical_prefix_cache_hit_rate"] <= 1
  assert samples["qwen_logical_prompt_cached_tokens_total"] >= 48


@pytest.mark.parametrize("kind, field, value", [
    ("chat", "top_logprobs", 3),  # without logprobs=true
    ("chat", "logprobs", 2),
    ("chat", "n", 0),
    ("chat", "n", 17),
    ("chat", "presence_penalty", 2.5),
    ("chat", "frequency_penalty", "a lot"),
    ("chat", "logit_bias", {"abc": 1}),
    ("chat", "logit_bias", {"5": 101}),
    ("chat", "logit_bias", {"99999": 1}),
    ("chat", "repetition_penalty", 0),
    ("chat", "min_tokens", -1),
    ("completion", "logprobs", 21),
    ("completion", "echo", "yes"),
    ("completion", "best_of", 3),
    ("completion", "prompt", [[1, 2], "a", []]),
    ("completion", "n", 40),
    ("chat", "response_format", {"type": "xml"}),
    ("chat", "response_format", {"type": "json_schema"}),
    ("chat", "tool_choice", "required"),  # without tools
    ("chat", "tools", [{"type": "function", "function": {"name": "bad name!"}}]),
    ("chat", "min_tokens", 3),  # with a response_format (below)
])
def test_bad_values_get_a_400_naming_the_field(served, kind, field, value):
  body = {"model": "tiny", "max_tokens": 2}
  body.update({"messages": [{"role": "user", "content": "Hi"}]} if kind == "chat" else {"prompt": "Hi"})
  body[field] = value
  if field == "min_tokens" and value == 3:
    body["response_format"] = {"type": "json_object"}
  status, response = post(served.url, "/v1/chat/completions" if kind == "chat" else DONE, body)
  assert status == 400 and response["error"]["param"].split(".")[0] == field, (field, value, response)
  assert served.client.completions.create(model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


FORECAST = {"type": "function", "function": {
    "name": "get_forecast", "description": "The weather forecast for a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                    "metric": {"type": "boolean"}},
                   "required": ["city", "metric"], "additionalProperties": False}}}


def _forced_call(c, messages, stream):
  """The reply to `messages` under tool_choice "required": (finish_reason, [(id, name, arguments)])."""
  response = c.chat.completions.create(model="tiny", messages=messages, tools=[FORECAST], tool_choice="required",
                                       max_tokens=120, temperature=0, stream=stream)
  if not stream:
    choice = response.choices[0]
    return choice.finish_reason, [(t.id, t.function.name, t.function.arguments) for t in choice.message.tool_calls]
  calls, reason = {}, None
  for chunk in response:
    for delta in chunk.choices[0].delta.tool_calls or []:
      call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
      call["id"] = delta.id or call["id"]
      call["name"] += (delta.function.name or "") if delta.function else ""
      call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    reason = chunk.choices[0].finish_reason or reason
  return reason, [(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_tool_call_round_trip_in_qwen_s_format(served, stream):
  c = served.client
  messages = [{"role": "user", "content": "Will it rain in Oslo tomorrow?"}]
  reason, calls = _forced_call(c, messages, stream)
  assert reason == "tool_calls" and len(calls) == 1
  call_id, name, arguments = calls[0]
  import jsonschema
  jsonschema.validate(json.loads(arguments), FORECAST["function"]["parameters"])
  assert name == "get_forecast" and call_id.startswith("call_")
  messages += [{"role": "assistant", "content": None, "tool_calls": [
      {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
      {"role": "tool", "tool_call_id": call_id, "content": "{\"rain\": 0.8}"}]
  answer = c.chat.completions.create(model="tiny", messages=messages, tools=[FORECAST], max_tokens=5, temperature=0)
  rendered = served.tokenizer.apply_chat_template(
      [messages[0], {**messages[1], "tool_calls": [{"function": {"name": name, "arguments": json.loads(arguments)}}]},
       messages[2]], tools=[FORECAST])
  assert "<tool_response>\n{\"rain\": 0.8}\n</tool_response>" in rendered and "get_forecast" in rendered
  assert answer.usage.prompt_tokens == len(served.tokenizer.encode(rendered, add_special_tokens=False))
  assert answer.choices[0].finish_reason in ("length", "stop", "tool_calls")


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "colour": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}, "vip": {"type": "boolean"}},
    "required": ["name", "colour", "vip"], "additionalProperties": False}


def test_json_schema_replies_validate_on_a_random_model(served):
  import jsonschema
  c = served.client
  fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
  for i in range(20):
    response = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Person {i}?"}],
                                         response_format=fmt, max_tokens=120, temperature=1.0, seed=i)
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), PERSON)
  whole = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Any JSON?"}],
                                    response_format={"type": "json_object"}, max_tokens=120, temperature=0)
  assert isinstance(json.loads(whole.choices[0].message.content), dict)

