"""The HTTP layer without a model (a fake engine with deterministic timing): errors, back-pressure,
disconnects, draining, metrics."""

import json
import socket
import threading
import time

import openai
import pytest
from serve_helpers import CHAT, DONE, HI, client, fake_server, get, metric_samples, post, test_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return test_tokenizer(tmp_path_factory.mktemp("tokenizer"))


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
    (CHAT, {"model": "tiny", "messages": HI, "n": 0}, "n"),
    (DONE, {"model": "tiny", "prompt": "Hi", "stop": 5}, "stop"),
    (DONE, {"model": "tiny", "prompt": {"text": "Hi"}}, "prompt"),
]


def test_bad_input_gets_400_naming_the_field_and_the_server_goes_on(tokenizer):
  engine, server = fake_server(tokenizer)
  with server:
    for path, body, param in BAD:
      status, answer = post(server.url, path, body)
      assert status == 400, (body, answer)
      error = answer["error"]
      assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
      assert error["param"] == param and error["code"] is None and error["message"], (body, error)
    c = client(server.url)
    with pytest.raises(openai.BadRequestError) as caught:  # as the official client reports it
      c.chat.completions.create(model="tiny", messages=HI, n=30)
    assert caught.value.param == "n" and "n=30" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
      c.completions.create(model="nope", prompt="Hi")
    assert caught.value.param == "model" and "`tiny`" in caught.value.message
    answer = c.completions.create(model="tiny", prompt="Hi", max_tokens=5)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 5
    assert get(server.url, "/health") == (200, '{"status":"ok"}')
  engine.stop(1)
  assert len(engine.submitted) == 1  # none of the bad requests reached the engine


def test_a_full_queue_answers_429(tokenizer):
  engine, server = fake_server(tokenizer, context=100000, queue_size=1, step_s=0.05)
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
  engine, server = fake_server(tokenizer, context=100000, step_s=0.02)
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
    assert 'qwen_logical_requests_total{endpoint="/v1/completions",status="499"} 2.0' in get(server.url, "/metrics")[1]
  engine.stop(1)


def test_draining_refuses_new_requests_and_finishes_running_ones(tokenizer):
  engine, server = fake_server(tokenizer, context=1000, step_s=0.02)
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
    assert get(server.url, "/health")[0] == 503
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "length"
    assert sum(len(chunk.choices[0].token_ids) for chunk in [first] + rest) == 60
    drain.join(10)
    assert not drain.is_alive()


def test_what_outlives_the_drain_deadline_is_cancelled(tokenizer):
  engine, server = fake_server(tokenizer, context=100000, step_s=0.02)
  with server:
    c = client(server.url)
    stream = iter(c.completions.create(model="tiny", prompt=[1], max_tokens=5000, stream=True))
    next(stream)
    whole = []
    waiting = threading.Thread(target=lambda: whole.append(post(server.url, DONE, {"model": "tiny", "prompt": [2],
                                                                                    "max_tokens": 5000})))
    waiting.start()
    time.sleep(0.2)
    server.server.config.app.state.serving.drain(0.3)
    with pytest.raises(openai.APIError, match="cancelled: the server is shutting down"):
      list(stream)
    waiting.join(10)
    assert whole[0][0] == 503 and whole[0][1]["error"]["type"] == "server_error"
    assert 'endpoint="/v1/completions",status="503"} 2.0' in get(server.url, "/metrics")[1]



def test_metrics_count_requests_tokens_and_latency(tokenizer):
  engine, server = fake_server(tokenizer, step_s=0.01)
  with server:
    c = client(server.url)
    one = c.completions.create(model="tiny", prompt="Hello there", max_tokens=7)
    chunks = list(c.chat.completions.create(model="tiny", messages=HI, max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}))
    two = chunks[-1].usage
    post(server.url, DONE, {"model": "tiny", "prompt": "x", "top_p": 2})
    c.models.list()
    m = metric_samples(server.url)
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
