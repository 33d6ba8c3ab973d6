"""The serving library without HTTP: stop strings, the text of engine events, request parsing, and a
completion driven from Python against qwen_logical's generate."""

import pytest
from serve_helpers import CONTEXT, FakeEngine, write_instruct_checkpoint

from qwen_logical.inference.sampling import SamplingParams
from qwen_logical.serving import openai_api
from qwen_logical.serving.completions import Completion, RequestError, StopStrings
from qwen_logical.serving.engine import Engine, EngineRequest


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from tokenizer_files import train_tokenizer, write_tokenizer_dir
  from qwen_logical.checkpoints.tokenizer import Tokenizer
  directory = tmp_path_factory.mktemp("tokenizer")
  write_tokenizer_dir(directory, train_tokenizer(vocab_size=300))
  return Tokenizer.from_directory(directory)


def _feed(stops, deltas):
  matcher, shown = StopStrings(stops), []
  for delta in deltas:
    text, stopped = matcher.push(delta)
    shown.append(text)
    if stopped:
      return shown, True
  shown.append(matcher.flush())
  return shown, False


def test_stop_strings_hold_back_only_what_could_still_match():
  shown, stopped = _feed(["</end>"], ["Hello <", "/e", "nd", "> more"])
  assert stopped and shown == ["Hello ", "", "", ""]  # "<", "</e", "</end" could each still become the stop
  shown, stopped = _feed(["</end>"], ["a <b", "> c </", "x"])
  assert not stopped and "".join(shown) == "a <b> c </x" and shown == ["a <b", "> c ", "</x", ""]
  shown, stopped = _feed(["xyz", "yz!"], ["ab", "xy", "z!"])  # the earliest stop wins
  assert stopped and "".join(shown) == "ab"
  shown, stopped = _feed(["aab"], ["aa", "aab"])  # a stop that starts inside held-back text
  assert stopped and "".join(shown) == "aa"
  shown, stopped = _feed(["\n\n"], ["one\n", "two\n", "\nthree"])
  assert stopped and "".join(shown) == "one\ntwo"


def _request(tokens, max_new, stop_ids=()):
  return EngineRequest(tuple(tokens), max_new, SamplingParams(), stop_ids=tuple(stop_ids))


def _run(engine, request, tokenizer, stop):
  engine.start()
  try:
    return list(Completion(engine, request, tokenizer, stop).stream(timeout=30))
  finally:
    engine.stop(1)


def test_a_stop_string_across_tokens_ends_the_request(tokenizer):
  text = "Tokens split text into pieces.<|END|> Never shown."
  script = tokenizer.encode(text)
  pieces = [tokenizer.decode([t]) for t in script]
  assert not any("<|END|>" in p for p in pieces)  # the stop string spans several tokens
  engine = FakeEngine(script=script, context=1000, step_s=0.01)
  outputs = _run(engine, _request([1, 2, 3], len(script)), tokenizer, ["<|END|>", "zzz"])
  assert "".join(o.text for o in outputs) == "Tokens split text into pieces."
  assert outputs[-1].finish_reason == "stop" and all(o.finish_reason is None for o in outputs[:-1])
  used = len(tokenizer.encode("Tokens split text into pieces.<|END|>"))
  assert sum(len(o.token_ids) for o in outputs) == outputs[-1].completion_tokens
  assert used - 1 <= outputs[-1].completion_tokens <= used + 1  # the token that completes "<|END|>"
  assert engine.cancels == [0]  # the engine would have gone on: the completion cancelled it
  # What each step showed is everything except a tail that could still become "<|END|>".
  shown = ""
  for o in outputs[:-1]:
    shown += o.text
    assert text.startswith(shown) and "<" not in shown


def test_stop_ids_end_with_stop_and_stay_out_of_the_text(tokenizer):
  im_end = tokenizer.token_to_id("<|im_end|>")
  script = tokenizer.encode("Short answer.") + [im_end] + tokenizer.encode(" after")
  engine = FakeEngine(script=script, context=1000)
  result = Completion(engine, _request([1], 40, tokenizer.stop_ids), tokenizer)
  engine.start()
  try:
    whole = result.result(timeout=30)
  finally:
    engine.stop(1)
  assert whole.text == "Short answer." and whole.finish_reason == "stop"
  assert whole.token_ids[-1] == im_end and whole.completion_tokens == len(whole.token_ids) == script.index(im_end) + 1
  assert engine.cancels == []  # the engine stopped by itself


def test_length_and_multibyte_text(tokenizer):
  text = "你好，世界！ 😀 café"
  script = tokenizer.encode(text)
  outputs = _run(FakeEngine(script=script, context=1000), _request([5], len(script)), tokenizer, ["@@"])
  assert "".join(o.text for o in outputs) == text
  assert outputs[-1].finish_reason == "length" and "\ufffd" not in "".join(o.text for o in outputs)


def _served(tokenizer, context=64):
  return openai_api.ServedModel("tiny", tokenizer, context, 320)


def test_parse_defaults_and_extensions(tokenizer):
  served = _served(tokenizer)
  chat = openai_api.parse_request("chat", {"model": "tiny", "messages": [
      {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
      {"role": "user", "content": "Hi"}], "top_k": -1, "temperature": 0, "user": "u1", "presence_penalty": 0}, served)
  expected = tokenizer.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
  assert list(chat.request.tokens) == expected
  assert chat.request.max_new_tokens == 64 - len(expected)  # chat: the rest of the context
  assert chat.request.sampling == SamplingParams(0.0, 0, 1.0) and chat.request.seed == 0
  assert chat.request.stop_ids == tokenizer.stop_ids
  text = openai_api.parse_request("completion", {"model": "tiny", "prompt": ["Hello"], "stop": "\n", "seed": 7,
                                                 "stream": True, "stream_options": {"include_usage": True}},
                                  served)
  assert list(text.request.tokens) == tokenizer.encode("Hello") and text.request.max_new_tokens == 16
  assert text.request.sampling.temperature == 1.0 and text.request.seed == 7  # OpenAI's default temperature
  assert text.stop == ("\n",) and text.stream and text.include_usage
  ids = openai_api.parse_request("completion", {"model": "tiny", "prompt": [[3, 4, 5]], "max_tokens": 61}, served)
  assert ids.request.tokens == (3, 4, 5) and ids.request.max_new_tokens == 61


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "prompt": "x", "max_tokens": 62, "max_completion_tokens": 61}, "max_tokens"),
    ({"model": "tiny", "prompt": [1, 2], "max_completion_tokens": 63}, "max_completion_tokens"),
    ({"model": "tiny", "prompt": [1, 320]}, "prompt"),
    ({"model": "tiny", "prompt": ["a", [1, "b"]]}, "prompt"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "tiny", "prompt": "x", "logprobs": 25}, "logprobs"),
    ({"model": "tiny", "prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.[0].content"),
])
def test_parse_errors_name_the_field(tokenizer, body, param):
  kind = "chat" if "messages" in body else "completion"
  with pytest.raises(RequestError) as error:
    openai_api.parse_request(kind, body, _served(tokenizer))
  assert error.value.param == param


def test_without_a_tokenizer_only_token_ids_are_served():
  served = openai_api.ServedModel("random", None, 64, 256)
  parsed = openai_api.parse_request("completion", {"model": "random", "prompt": [1, 2, 3]}, served)
  assert parsed.request.tokens == (1, 2, 3) and parsed.request.stop_ids == ()
  for kind, body, param in [("completion", {"model": "random", "prompt": "Hi"}, "prompt"),
                            ("chat", {"model": "random", "messages": [{"role": "user", "content": "Hi"}]}, "messages"),
                            ("completion", {"model": "random", "prompt": [1], "stop": "x"}, "stop")]:
    with pytest.raises(RequestError, match="--config.tokenizer=DIR") as error:
      openai_api.parse_request(kind, body, served)
    assert error.value.param == param


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  import qwen_logical as ql
  from conftest import mesh_of
  directory = tmp_path_factory.mktemp("instruct")
  model = write_instruct_checkpoint(directory, real_looking=True)
  params, cfg, part = ql.load_checkpoint(str(directory), mesh_of("1x8"), ql.get_table("tensor_parallel"),
                                         progress=False)
  return model, part, params, ql.Tokenizer.from_directory(directory)


def test_the_library_drives_a_completion_like_generate(tiny_model):
  """Real-looking logits (std >= 3): the engine's greedy tokens are generate's and transformers'."""
  from serve_helpers import hf_greedy
  from qwen_logical.inference.generate import generate
  model, part, params, tokenizer = tiny_model
  served = openai_api.ServedModel("tiny", tokenizer, CONTEXT, 320)
  parsed = openai_api.parse_request("chat", {"model": "tiny", "max_tokens": 20, "temperature": 0, "messages": [
      {"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]}, served)
  engine = Engine(part, params, slots=4, context=CONTEXT, queue_size=8)
  engine.start()
  try:
    whole = Completion(engine, parsed.request, tokenizer).result(timeout=120)
  finally:
    engine.stop(5)
  ids = list(parsed.request.tokens)
  reference = generate(part, params, [ids], tokenizer=tokenizer, max_new_tokens=20)
  assert whole.token_ids == reference.tokens[0] and whole.finish_reason == reference.finish_reasons[0]
  assert whole.text == reference.texts[0] and whole.completion_tokens == len(whole.token_ids)
  assert whole.token_ids == hf_greedy(model, ids, 20)[:len(whole.token_ids)]
  assert len(whole.token_ids) == 20  # (the real-looking model repeats its last token: no stop id comes)



def test_the_checkpoint_s_generation_config_fills_what_a_request_leaves_out(tokenizer):
  defaults = openai_api.generation_defaults(tokenizer)
  assert defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}  # Qwen2.5's
  served = openai_api.ServedModel("tiny", tokenizer, CONTEXT, 320, defaults=defaults)
  left_out = openai_api.parse_request("completion", {"model": "tiny", "prompt": "Hi"}, served).request
  assert left_out.sampling == SamplingParams(0.7, 20, 0.8) and left_out.processing.repetition_penalty == 1.05
  chosen = openai_api.parse_request("completion", {"model": "tiny", "prompt": "Hi", "temperature": 0,
                                                   "repetition_penalty": 1.0}, served).request
  assert chosen.sampling.greedy and chosen.processing.repetition_penalty == 1.0
