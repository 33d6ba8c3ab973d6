"""The server against a hostile client (a fake engine, real sockets on 127.0.0.1): invalid Unicode, deep
nesting, NUL, wrong types and sizes are 400s naming the field; an oversized body is a 413 and a slow
one a 408, neither read whole; an unexpected exception is a logged 500 in the OpenAI error shape that
/metrics counts; stalled uploads are closed within the read timeout while other requests are served."""

import json
import socket
import threading
import time

import pytest
from serve_helpers import CHAT, DONE, HI, client, fake_server, get, metric_samples, post, test_tokenizer

from qwen_logical.serving import openai_api
from qwen_logical.serving.guard import RequestLimits


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return test_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _error(answer):
  error = answer["error"]
  assert {"message", "type", "param", "code"} <= set(error) and error["message"], answer
  return error


HOSTILE = [  # raw bodies as a client can send them: (path, bytes, the param named, words in the message)
    (CHAT, b"[" * 10000, None, "nested too deeply"),
    (CHAT, b'{"model": "tiny", "messages": ' + b"[" * 100 + b"]" * 100 + b"}", "messages", "nested too deeply"),
    (DONE, b'{"model": "\\ud800", "prompt": [1]}', "model", "lone surrogate (U+D800)"),
    (DONE, b'{"model": "tiny", "prompt": [1], "\\udfff": 1}', None, "A key of the request body"),
    (DONE, b'{"model": "tiny", "prompt": "\\ud800abc"}', "prompt", "lone surrogate (U+D800) at index 0"),
    (CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udc00"}]}', "messages.[0].content",
     "lone surrogate (U+DC00) at index 1"),
    (CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages.[0].content.[0].text", "lone surrogate"),
    (DONE, b'{"model": "tiny", "prompt": "a\\u0000b"}', "prompt", "NUL character (U+0000) at index 1"),
    (DONE, b'{"model": "tiny", "prompt": "\xff\xfe"}', None, "not valid UTF-8 (byte 29 is 0xff)"),
    (DONE, '\ufeff{"model": "tiny", "prompt": [1]}'.encode(), None, "not valid JSON"),
    (DONE, '{"model": "tiny", "prompt": [1]}'.encode("utf-16"), None, "not valid UTF-8"),
    (DONE, b'{"model": "tiny", "prompt": [1], "temperature": NaN}', None, "NaN is not a JSON value"),
    (DONE, b'{"model": "tiny", "prompt": [1], "seed": ' + b"9" * 5000 + b"}", None, "5000 digits"),
    (DONE, b'{"model": "tiny", "prompt": [1], "temperature": 1e999}', "temperature", "finite number"),
    (DONE, b'{"model": "tiny", "prompt": [1, 2.5]}', "prompt", "list of token ids"),
    (DONE, b'{"model": "tiny", "prompt": [1], "max_tokens": true}', "max_tokens", "an integer"),
    (DONE, json.dumps({"model": "tiny", "prompt": "Hi", "stop": ["x"] * 17}).encode(), "stop", "at most 16"),
]


def test_hostile_bodies_are_400s_naming_the_field(tokenizer):
  engine, server = fake_server(tokenizer)
  with server:
    for path, body, param, words in HOSTILE:
      status, answer = post(server.url, path, body)
      error = _error(answer)
      assert status == 400 and error["type"] == "invalid_request_error", (body[:80], answer)
      assert error["param"] == param and words in error["message"], (body[:80], error)
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", DONE, 405), ("DELETE", "/health", 405)):
      with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        got, _, body = _read_response(sock)
      assert got == status and _error(json.loads(body))["type"] == "invalid_request_error", body
    answer = client(server.url).completions.create(model="tiny", prompt="Hi", max_tokens=3)
    assert answer.usage.completion_tokens == 3
    counts = metric_samples(server.url)
  engine.stop(1)
  assert len(engine.submitted) == 1  # none of the hostile requests reached the engine
  count = lambda endpoint, status: counts.get(("qwen_logical_requests_total",
                                               (("endpoint", endpoint), ("status", status))), 0)
  assert count(CHAT, "400") + count(DONE, "400") == len(HOSTILE)
  assert (count("other", "404"), count(DONE, "405"), count("/health", "405")) == (1, 1, 1)


def test_text_the_tokenizer_or_template_cannot_take_is_a_400(tokenizer, monkeypatch):
  engine, server = fake_server(tokenizer)
  with server:
    def choke(*args, **kwargs):
      raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")  # what tokenizers raises

    for name, path, body, param in (("encode", DONE, {"model": "tiny", "prompt": "Hi"}, "prompt"),
                                    ("encode_chat", CHAT, {"model": "tiny", "messages": HI}, "messages")):
      monkeypatch.setattr(tokenizer, name, choke)
      status, answer = post(server.url, path, body)
      monkeypatch.undo()
      assert status == 400 and _error(answer)["param"] == param and "TypeError" in answer["error"]["message"]
  engine.stop(1)
  assert not engine.submitted


def _read_response(sock, timeout=10.0):
  """(status, header text, body bytes) of one HTTP/1.1 response with a Content-Length; (None, '', b'') if the
  connection closes first."""
  sock.settimeout(timeout)
  data = b""
  try:
    while b"\r\n\r\n" not in data:
      chunk = sock.recv(65536)
      if not chunk:
        return None, "", b""
      data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(_header(head.decode("latin-1"), "content-length"))
    while len(body) < length:
      chunk = sock.recv(65536)
      if not chunk:
        break
      body += chunk
  except ConnectionResetError:
    return None, "", b""
  return int(head.split(b" ")[1]), head.decode("latin-1"), body


def _header(head: str, name: str) -> str:
  """The value of header `name` in a response's head."""
  return next(line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith(name + ":"))


def _headers(path, length=None, chunked=False):
  extra = "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {length}\r\n"
  return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}\r\n".encode()


def test_an_oversized_body_is_a_413_without_being_read(tokenizer):
  limit = 64 << 10
  engine, server = fake_server(tokenizer, limits=RequestLimits(max_body_bytes=limit, read_timeout_s=10.0))
  with server:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # 50 MB announced, 1 MB sent
      sock.sendall(_headers(DONE, 50 << 20))
      try:
        sock.sendall(b" " * (1 << 20))
      except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed at the headers already
      status, head, body = _read_response(sock)
    assert status == 413 and "connection: close" in head.lower()
    error = _error(json.loads(body))
    assert error["code"] == "request_too_large" and "52428800 bytes" in error["message"]
    assert str(limit) in error["message"]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # no length: refused once past the limit
      sock.sendall(_headers(DONE, chunked=True))
      sent = [0]

      def upload():  # up to 64 MB, until the server closes the connection
        try:
          while sent[0] < (64 << 20):
            sock.sendall(b"4000\r\n" + b" " * 0x4000 + b"\r\n")
            sent[0] += 0x4000
        except OSError:
          pass

      uploading = threading.Thread(target=upload)
      uploading.start()
      status, _, body = _read_response(sock)
      uploading.join(30)
    assert status in (413, None) and sent[0] < (64 << 20), (sent, status)  # closed early (the 413 unless reset)
    padding = limit - len(json.dumps({"model": "tiny", "prompt": [1], "user": ""}))  # exactly at the limit: taken
    assert post(server.url, DONE, {"model": "tiny", "prompt": [1], "user": " " * padding})[0] == 200
    samples = metric_samples(server.url)
  engine.stop(1)
  assert samples[("qwen_logical_requests_total", (("endpoint", DONE), ("status", "413")))] >= 1


def test_a_slow_upload_gets_408_and_the_connection_closes(tokenizer):
  engine, server = fake_server(tokenizer, limits=RequestLimits(read_timeout_s=1.0))
  with server:
    body = json.dumps({"model": "tiny", "prompt": [1, 2, 3]}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
      start = time.monotonic()
      sock.sendall(_headers(DONE, len(body)) + body[:10])
      time.sleep(0.5)
      sock.sendall(body[10:12])  # a trickle does not extend the deadline
      status, head, answer = _read_response(sock)
      took = time.monotonic() - start
      assert sock.recv(1) == b""  # closed
    assert status == 408 and 0.9 < took < 3 and "connection: close" in head.lower()
    assert _error(json.loads(answer))["code"] == "request_timeout"
    assert post(server.url, DONE, {"model": "tiny", "prompt": [1], "max_tokens": 2})[0] == 200
  engine.stop(1)


def test_stalled_uploads_are_closed_within_the_read_timeout_while_others_are_served(tokenizer):
  timeout, stalled = 2.0, 40
  engine, server = fake_server(tokenizer, limits=RequestLimits(read_timeout_s=timeout))
  with server:
    socks, start = [], time.monotonic()
    for _ in range(stalled):
      sock = socket.create_connection(("127.0.0.1", server.port))
      sock.sendall(_headers(CHAT, 1000) + b'{"model": "tiny", "messages": [')  # headers and part of the body
      socks.append(sock)
    served = [post(server.url, DONE, {"model": "tiny", "prompt": [i + 1], "max_tokens": 2})[0] for i in range(5)]
    served_s = time.monotonic() - start
    closed = [None] * stalled

    def wait(i):
      status, _, _ = _read_response(socks[i], timeout=timeout + 10)
      closed[i] = (status, time.monotonic() - start)

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(stalled)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(timeout + 15)
    for sock in socks:
      sock.close()
  engine.stop(1)
  assert served == [200] * 5 and served_s < timeout  # answered while the uploads stalled
  assert all(c is not None and c[0] in (408, None) for c in closed), closed
  assert max(c[1] for c in closed) < timeout + 1.5, max(c[1] for c in closed)


def test_an_unexpected_exception_is_a_counted_logged_500(tokenizer, monkeypatch, caplog):
  engine, server = fake_server(tokenizer)
  with server:
    def broken(*args, **kwargs):
      raise RuntimeError("a bug")

    monkeypatch.setattr(openai_api, "parse_request", broken)
    request = json.dumps({"model": "tiny", "prompt": [1]}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock, caplog.at_level("ERROR"):
      sock.sendall(_headers(DONE, len(request)) + request)
      status, head, body = _read_response(sock)
    error = _error(json.loads(body))
    request_id = _header(head, "x-request-id")
    assert status == 500 and error["type"] == "server_error" and error["request_id"] == request_id
    assert request_id in error["message"] and "a bug" not in error["message"]
    assert any(request_id in r.getMessage() and r.exc_info for r in caplog.records)
    monkeypatch.undo()
    assert post(server.url, DONE, {"model": "tiny", "prompt": [1], "max_tokens": 2})[0] == 200
    samples = metric_samples(server.url)
  engine.stop(1)
  requests = lambda status: samples[("qwen_logical_requests_total", (("endpoint", DONE), ("status", status)))]
  assert requests("500") == 1 and requests("200") == 1


def test_an_exception_inside_a_stream_ends_it_with_an_error_event_counted_as_500(tokenizer, monkeypatch):
  from qwen_logical.serving.completions import Completion
  engine, server = fake_server(tokenizer)
  with server:
    monkeypatch.setattr(Completion, "on_event", lambda self, event: 1 / 0)
    status, text = _stream(server.port, {"model": "tiny", "messages": HI, "stream": True, "max_tokens": 3})
    monkeypatch.undo()
    assert status == 200 and '"type":"server_error"' in text and "division by zero" in text
    deadline = time.monotonic() + 5
    while engine.stats().active and time.monotonic() < deadline:
      time.sleep(0.02)
    assert engine.stats().active == 0 and get(server.url, "/health")[0] == 200
    samples = metric_samples(server.url)
  engine.stop(1)
  assert samples[("qwen_logical_requests_total", (("endpoint", CHAT), ("status", "500")))] == 1


def _stream(port, body):
  """(status, the whole response text) of a streamed chat request, read until the server closes."""
  data = json.dumps(body).encode()
  with socket.create_connection(("127.0.0.1", port)) as sock:
    sock.sendall(_headers(CHAT, len(data)).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + data)
    sock.settimeout(10)
    text = b""
    while chunk := sock.recv(65536):
      text += chunk
  return int(text.split(b" ")[1]), text.decode()
