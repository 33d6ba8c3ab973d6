"""The OpenAI-compatible server over HTTP, driven with the official `openai` client: a tiny checkpoint's
tokens against qwen_logical's generate and transformers, concurrency, errors, back-pressure,
disconnects, draining, metrics, and the command as a user runs it."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import openai
import pytest
from conftest import free_port
from serve_helpers import CONTEXT, FakeEngine, ServerThread, client, hf_greedy, write_instruct_checkpoint

from qwen_logical.serving.engine import Engine
from qwen_logical.serving.http_app import create_app
from qwen_logical.serving.openai_api import ServedModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tiny-instruct")
  return directory, write_instruct_checkpoint(directory, real_looking=False)


@pytest.fixture(scope="module")
def served(checkpoint):
  """The checkpoint served on 1x8 tensor_parallel: .server, .engine, .part, .params, .tokenizer, .model (transformers)."""
  import qwen_logical as ql
  from conftest import mesh_of
  directory, model = checkpoint
  params, cfg, part = ql.load_checkpoint(str(directory), mesh_of("1x8"), ql.get_table("tensor_parallel"),
                                         progress=False)
  tokenizer = ql.Tokenizer.from_directory(directory)
  engine = Engine(part, params, slots=4, context=CONTEXT, queue_size=32)
  engine.start()
  try:
    with ServerThread(create_app(engine, ServedModel("tiny", tokenizer, engine.context, cfg.vocab_size))) as server:
      yield types.SimpleNamespace(server=server, engine=engine, part=part, params=params, tokenizer=tokenizer,
                                  model=model)
  finally:
    engine.stop(5)


def _ask(c, kind, stream, max_tokens=20, **kwargs):
  """(text, token ids, finish_reason, usage) of one request, streamed or not."""
  extra = {"extra_body": {"return_token_ids": True}, "temperature": kwargs.pop("temperature", 0)}
  if stream:
    extra["stream_options"] = {"include_usage": True}
  if kind == "chat":
    response = c.chat.completions.create(model="tiny", max_tokens=max_tokens, stream=stream, **extra, **kwargs)
  else:
    response = c.completions.create(model="tiny", max_tokens=max_tokens, stream=stream, **extra, **kwargs)
  if not stream:
    choice = response.choices[0]
    text = choice.message.content if kind == "chat" else choice.text
    return text, choice.token_ids, choice.finish_reason, response.usage
  text, ids, reason, usage = "", [], None, None
  for chunk in response:
    if not chunk.choices:
      usage = chunk.usage
      continue
    choice = chunk.choices[0]
    text += (choice.delta.content or "") if kind == "chat" else choice.text
    ids += choice.token_ids
    reason = choice.finish_reason or reason
  return text, ids, reason, usage


def _prompt(kind, text):
  return {"messages": [SYSTEM, {"role": "user", "content": text}]} if kind == "chat" else {"prompt": text}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_greedy_tokens_are_generate_s_and_transformers(served, kind, stream):
  from qwen_logical.inference.generate import generate
  server, part, params, tokenizer, model = served.server, served.part, served.params, served.tokenizer, served.model
  text_in = "def add(a, b): return a + b  # 你好"
  ids = (tokenizer.encode_chat([SYSTEM, {"role": "user", "content": text_in}]) if kind == "chat"
         else tokenizer.encode(text_in))
  text, tokens, reason, usage = _ask(client(server.url), kind, stream, 24, **_prompt(kind, text_in))
  reference = generate(part, params, [ids], tokenizer=tokenizer, max_new_tokens=24)
  assert tokens == reference.tokens[0] and reason == reference.finish_reasons[0]
  assert text == reference.texts[0]
  assert tokens == hf_greedy(model, ids, 24)[:len(tokens)]
  assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(tokens))
  assert len(set(tokens)) > 3  # varied text, not one repeated token


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_stop_string_across_a_token_boundary(served, stream):
  server, tokenizer = served.server, served.tokenizer
  c = client(server.url)
  text, tokens, _, _ = _ask(c, "completion", False, 24, prompt="Hello world")
  pieces = [tokenizer.decode([t]) for t in tokens]
  i = next(i for i in range(2, len(pieces) - 1) if pieces[i] and pieces[i + 1] and "\ufffd" not in pieces[i] + pieces[i + 1])
  stop = pieces[i][-1] + pieces[i + 1][0]  # the last character of one token and the first of the next
  assert stop in text
  cut, got_tokens, reason, usage = _ask(c, "completion", stream, 24, prompt="Hello world", stop=[stop, "never"])
  assert reason == "stop" and cut == text[:text.index(stop)]
  assert got_tokens == tokens[:len(got_tokens)] and len(got_tokens) <= i + 2 and usage.completion_tokens == len(got_tokens)


def test_16_concurrent_streams_get_what_they_get_alone(served):
  server = served.server
  c = client(server.url, timeout=300)
  words = "one two three four five six seven eight nine ten".split()
  asks = [dict(kind="chat" if i % 3 == 0 else "completion", max_tokens=3 + (7 * i) % 22,
               temperature=0.9 if i % 4 == 1 else 0, seed=i, **_prompt("chat" if i % 3 == 0 else "completion",
                                                                   " ".join(words[:1 + i % 10]) * (1 + i // 5)))
          for i in range(16)]
  alone = [_ask(c, stream=True, **dict(a)) for a in asks]
  together = [None] * 16
  barrier = threading.Barrier(16)

  def ask(i):
    barrier.wait()
    together[i] = _ask(c, stream=True, **dict(asks[i]))

  threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(300)
  for i, (a, t) in enumerate(zip(alone, together)):
    assert t is not None and (t[0], t[1], t[2]) == (a[0], a[1], a[2]), i
    assert len(a[1]) == asks[i]["max_tokens"] or a[2] == "stop"
  assert len({tuple(a[1]) for a in alone}) > 8


def test_a_disconnect_ends_the_request_in_the_engine(served):
  c, engine = client(served.server.url), served.engine
  before = engine.stats()
  stream = c.completions.create(model="tiny", prompt="Hello", max_tokens=CONTEXT - 8, stream=True, temperature=0,
                                extra_body={"return_token_ids": True})
  chunks = iter(stream)
  for _ in range(3):
    next(chunks)
  stream.close()
  deadline = time.monotonic() + 30
  while (engine.stats().finished_total == before.finished_total or engine.stats().active) and time.monotonic() < deadline:
    time.sleep(0.01)
  after = engine.stats()
  assert after.active == 0 and after.finished_total == before.finished_total + 1
  _, alone, _, _ = _ask(c, "completion", False, CONTEXT - 8, prompt="Hello")  # the same request, left to run
  assert after.tokens_total - before.tokens_total < len(alone) // 2  # the disconnect ended it in the engine


# ----------------------------------------------------------------------------- without a model: the HTTP layer


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
  from qwen_logical.checkpoints.tokenizer import Tokenizer
  return Tokenizer.from_directory(checkpoint[0])


def _fake_server(tokenizer, context=128, **engine_kwargs):
  engine = FakeEngine(context=context, **engine_kwargs)
  engine.start()
  return engine, ServerThread(create_app(engine, ServedModel("tiny", tokenizer, context, 320)))


def _post(url, path, body, timeout=30):
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _get(url, path):
  try:
    with urllib.request.urlopen(url + path, timeout=30) as response:
      return response.status, response.read().decode()
  except urllib.error.HTTPError as e:
    return e.code, e.read().decode()


CHAT, DONE = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]
BAD = [
    (CHAT, b'{"model": "tiny", "messages": [', None),
    (CHAT, b"[1, 2]", None),
    (CHAT, {"messages": HI}, "model"),
    (CHAT, {"model": "gpt-4o", "messages": HI}, "model"),
    (CHAT, {"model": "tiny"}, "messages"),
    (CHAT, {"model": "tiny", "messages": "Hi"}, "messages"),
    (CHAT, {"model": "tiny", "messages": HI, "frobnicate": 1}, "frobnicate"),
    (CHAT, {"model": "tiny", "messages": HI, "max_tokens": "ten"}, "max_tokens"),
    (CHAT, {"model": "tiny", "messages": HI, "temperature": "hot"}, "temperature"),
    (CHAT, {"model": "tiny", "messages": HI, "stream": "yes"}, "stream"),
    (CHAT, {"model": "tiny", "messages": HI, "seed": 1.5}, "seed"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "word " * 80}]}, "messages"),
    (DONE, {"model": "tiny", "prompt": list(range(128))}, "prompt"),
    (DONE, {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 126}, "max_tokens"),
    (DONE, {"model": "tiny", "prompt": [1, 2, 3], "max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT, {"model": "tiny", "messages": HI, "temperature": -0.5}, "temperature"),
    (DONE, {"model": "tiny", "prompt": "Hi", "top_p": 0}, "top_p"),
    (DONE, {"model": "tiny", "prompt": "Hi", "top_p": 1.5}, "top_p"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}, {"role": "wizard", "content": "?"}]},
     "messages.[1].role"),
    (CHAT, {"model": "tiny", "messages": HI, "n": 2}, "n"),
    (DONE, {"model": "tiny", "prompt": "Hi", "stop": 5}, "stop"),
    (DONE, {"model": "tiny", "prompt": {"text": "Hi"}}, "prompt"),
]


def test_bad_input_gets_400_naming_the_field_and_the_server_goes_on(tokenizer):
  engine, server = _fake_server(tokenizer)
  with server:
    for path, body, param in BAD:
      status, answer = _post(server.url, path, body)
      assert status == 400, (body, answer)
      error = answer["error"]
      assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
      assert error["param"] == param and error["code"] is None and error["message"], (body, error)
    c = client(server.url)
    with pytest.raises(openai.BadRequestError) as caught:  # as the official client reports it
      c.chat.completions.create(model="tiny", messages=HI, n=3)
    assert caught.value.param == "n" and "n=1" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
      c.completions.create(model="nope", prompt="Hi")
    assert caught.value.param == "model" and "`tiny`" in caught.value.message
    answer = c.completions.create(model="tiny", prompt="Hi", max_tokens=5)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 5
    assert _get(server.url, "/health") == (200, '{"status":"ok"}')
  engine.stop(1)
  assert len(engine.submitted) == 1  # none of the bad requests reached the engine


def test_a_full_queue_answers_429(tokenizer):
  engine, server = _fake_server(tokenizer, context=100000, queue_size=1, step_s=0.05)
  with server:
    c = client(server.url)
    running = c.completions.create(model="tiny", prompt=[1, 2], max_tokens=5000, stream=True)
    next(iter(running))  # holds the only slot
    waiting = c.completions.create(model="tiny", prompt=[3], max_tokens=5, stream=True,
                                   extra_body={"return_token_ids": True})  # fills the queue
    with pytest.raises(openai.RateLimitError) as caught:
      c.completions.create(model="tiny", prompt=[4], max_tokens=5)
    assert caught.value.status_code == 429 and "queue is full" in caught.value.message
    running.close()  # the waiting request runs next, to its end
    assert sum(len(chunk.choices[0].token_ids) for chunk in waiting) == 5
  engine.stop(1)


def test_a_client_that_disconnects_frees_its_slot(tokenizer):
  engine, server = _fake_server(tokenizer, context=100000, step_s=0.02)
  with server:
    c = client(server.url, timeout=20)
    stream = c.completions.create(model="tiny", prompt="Hello", max_tokens=5000, stream=True)  # 100 s if left
    chunks = iter(stream)
    for _ in range(3):
      next(chunks)
    stream.close()
    start = time.monotonic()
    answer = c.completions.create(model="tiny", prompt=[7], max_tokens=5)
    assert answer.usage.completion_tokens == 5 and time.monotonic() - start < 5
    # A non-streamed request whose client goes away is cancelled too.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
      body = json.dumps({"model": "tiny", "prompt": [9], "max_tokens": 5000}).encode()
      sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
      time.sleep(0.3)
    deadline = time.monotonic() + 5
    while len(engine.cancels) < 2 and time.monotonic() < deadline:
      time.sleep(0.02)
    assert engine.cancels == [0, 2] and engine.stats().active == 0
    assert 'qwen_logical_requests_total{endpoint="/v1/completions",status="499"} 2.0' in _get(server.url, "/metrics")[1]
  engine.stop(1)


def test_draining_refuses_new_requests_and_finishes_running_ones(tokenizer):
  engine, server = _fake_server(tokenizer, context=1000, step_s=0.02)
  with server:
    c = client(server.url)
    stream = iter(c.completions.create(model="tiny", prompt=[1], max_tokens=60, stream=True,
                                       extra_body={"return_token_ids": True}))
    first = next(stream)
    drain = threading.Thread(target=server.server.config.app.state.serving.drain, args=(30.0,))
    drain.start()
    time.sleep(0.1)
    with pytest.raises(openai.InternalServerError) as caught:
      c.completions.create(model="tiny", prompt=[2], max_tokens=2)
    assert caught.value.status_code == 503 and "shutting down" in caught.value.message
    assert _get(server.url, "/health")[0] == 503
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "length"
    assert sum(len(chunk.choices[0].token_ids) for chunk in [first] + rest) == 60
    drain.join(10)
    assert not drain.is_alive()


def test_what_outlives_the_drain_deadline_is_cancelled(tokenizer):
  engine, server = _fake_server(tokenizer, context=100000, step_s=0.02)
  with server:
    c = client(server.url)
    stream = iter(c.completions.create(model="tiny", prompt=[1], max_tokens=5000, stream=True))
    next(stream)
    whole = []
    waiting = threading.Thread(target=lambda: whole.append(_post(server.url, DONE, {"model": "tiny", "prompt": [2],
                                                                                    "max_tokens": 5000})))
    waiting.start()
    time.sleep(0.2)
    server.server.config.app.state.serving.drain(0.3)
    with pytest.raises(openai.APIError, match="cancelled: the server is shutting down"):
      list(stream)
    waiting.join(10)
    assert whole[0][0] == 503 and whole[0][1]["error"]["type"] == "server_error"
    assert 'endpoint="/v1/completions",status="503"} 2.0' in _get(server.url, "/metrics")[1]


def _metrics(url):
  from prometheus_client.parser import text_string_to_metric_families
  samples = {}
  for family in text_string_to_metric_families(_get(url, "/metrics")[1]):
    for s in family.samples:
      samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
  return samples


def test_metrics_count_requests_tokens_and_latency(tokenizer):
  engine, server = _fake_server(tokenizer, step_s=0.01)
  with server:
    c = client(server.url)
    one = c.completions.create(model="tiny", prompt="Hello there", max_tokens=7)
    chunks = list(c.chat.completions.create(model="tiny", messages=HI, max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}))
    two = chunks[-1].usage
    _post(server.url, DONE, {"model": "tiny", "prompt": "x", "top_p": 2})
    c.models.list()
    m = _metrics(server.url)
  engine.stop(1)
  requests = lambda endpoint, status: m[("qwen_logical_requests_total", (("endpoint", endpoint), ("status", status)))]
  assert requests(DONE, "200") == 1 and requests(CHAT, "200") == 1 and requests(DONE, "400") == 1
  assert requests("/v1/models", "200") == 1
  assert m[("qwen_logical_prompt_tokens_total", ())] == one.usage.prompt_tokens + two.prompt_tokens
  assert m[("qwen_logical_completion_tokens_total", ())] == 7 + 5 == one.usage.completion_tokens + two.completion_tokens
  assert m[("qwen_logical_time_to_first_token_seconds_count", ())] == 2
  assert m[("qwen_logical_time_per_output_token_seconds_count", ())] == (7 - 1) + (5 - 1)
  assert 0.01 <= m[("qwen_logical_time_per_output_token_seconds_sum", ())] / 10 < 1  # each step sleeps 10 ms
  assert m[("qwen_logical_time_per_output_token_seconds_bucket", (("le", "0.005"),))] == 0
  assert (m[("qwen_logical_queue_length", ())], m[("qwen_logical_active_slots", ())], m[("qwen_logical_slots", ())]) \
      == (0, 0, 1)


# ----------------------------------------------------------------------------- the command


def _launch(*flags, port):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  process = subprocess.Popen([sys.executable, "main.py", "--config=configs/serve.py", f"--config.serve.port={port}",
                              *flags], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + 240
  while True:
    assert process.poll() is None, process.stdout.read()[-3000:]
    assert time.monotonic() < deadline, "the server did not come up"
    try:
      if _get(url, "/health")[0] == 200:
        return process, url
    except (urllib.error.URLError, ConnectionError):
      time.sleep(0.2)


def test_sigterm_drains_the_running_request_and_exits_0(checkpoint):
  directory, _ = checkpoint
  process, url = _launch(f"--config.checkpoint={directory}", "--config.serve.context=256",
                         "--config.serve.slots=2", port=free_port())
  try:
    c = client(url)
    assert [m.id for m in c.models.list().data] == [directory.name]
    stream = iter(c.chat.completions.create(model=directory.name, messages=[SYSTEM] + HI, max_tokens=150,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True}))
    next(stream)
    process.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert rest[-1].usage.completion_tokens == sum(len(ch.choices[0].token_ids) for ch in rest if ch.choices)
    reasons = [ch.choices[0].finish_reason for ch in rest if ch.choices and ch.choices[0].finish_reason]
    assert reasons in (["length"], ["stop"]) and (reasons == ["stop"] or rest[-1].usage.completion_tokens == 150)
    assert process.wait(60) == 0
  finally:
    process.kill()
  output = process.stdout.read()
  assert "Draining: new requests get 503; 1 running" in output and "Traceback" not in output


def test_the_command_serves_the_random_default_model_on_token_ids():
  import qwen_logical as ql
  from conftest import mesh_of
  process, url = _launch("--config.model.preset=tiny", port=free_port())
  try:
    c = client(url)
    model = c.models.list().data[0].id
    answer = c.completions.create(model=model, prompt=[1, 2, 3], max_tokens=8, temperature=0)
    part = ql.Partitioner(ql.preset("tiny"), mesh_of("1x8"), ql.get_table("tensor_parallel"))
    expected = ql.generate(part, part.init(0), [[1, 2, 3]], max_new_tokens=8, stop_ids=[]).tokens[0]
    assert answer.choices[0].token_ids == expected and answer.choices[0].text == ""
    with pytest.raises(openai.BadRequestError, match="--config.tokenizer=DIR"):
      c.completions.create(model=model, prompt="Hello")
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
  finally:
    process.kill()
