"""Helpers of the serving tests: a fake engine that keeps the engine contract (deterministic timing for
the HTTP layer's own tests: a slot held on purpose, a full queue, a cancel), a server in a thread,
and a tiny instruct checkpoint (a transformers model saved with save_pretrained, plus a tokenizer
directory). The end-to-end tests run the real `qwen_logical.serving.engine.Engine`.
"""

from __future__ import annotations

import dataclasses
import contextlib
import json
import types
import socket
import threading
import time
import urllib.error
import urllib.request

from qwen_logical.serving.engine import EngineRequest, QueueFullError, ServingError, TokenEvent


@dataclasses.dataclass
class FakeStats:
  queued: int
  active: int
  slots: int
  tokens_total: int


class FakeEngine:
  """The engine contract without a model, on one worker thread and one slot (one request at a time).

  Tokens come from `script` (a list of ids, the same for every request), else from a hash of the
  prompt and step below `vocab_size` (the default 256 keeps clear of the test tokenizer's stop ids,
  so such requests run to max_new_tokens). `step_s` slows each step, so tests can hold the slot,
  fill the queue, and see that a cancel frees the slot at once. `cancels` lists the cancelled ids.
  """

  def __init__(self, context=128, queue_size=4, step_s=0.0, vocab_size=256, script=None):
    self.script = script
    self.context, self.queue_size, self.step_s, self.vocab_size = context, queue_size, step_s, vocab_size
    self.slots = 1
    self._cv = threading.Condition()
    self._queue: list = []
    self._cancelled: set[int] = set()
    self._active = 0
    self._next = 0
    self._stopping = False
    self._tokens_total = 0
    self.submitted: list[EngineRequest] = []
    self.cancels: list[int] = []
    self._thread = threading.Thread(target=self._loop, daemon=True)

  def check(self, request: EngineRequest) -> None:
    if len(request.tokens) + request.max_new_tokens > self.context:
      raise ServingError(f"prompt plus max_new_tokens exceed the context of {self.context}", "max_new_tokens")

  def submit(self, request: EngineRequest, callback) -> int:
    self.check(request)
    with self._cv:
      if self._stopping:
        raise ServingError("the engine is shutting down")
      if len(self._queue) >= self.queue_size:
        raise QueueFullError(f"{len(self._queue)} requests are waiting (queue_size={self.queue_size})")
      rid, self._next = self._next, self._next + 1
      self._queue.append((rid, request, callback))
      self.submitted.append(request)
      self._cv.notify_all()
    return rid

  def cancel(self, rid: int) -> None:
    with self._cv:
      self._cancelled.add(rid)
      self.cancels.append(rid)

  def start(self) -> None:
    self._thread.start()

  def stop(self, deadline_s: float) -> None:
    with self._cv:
      self._stopping = True
      self._deadline = time.monotonic() + deadline_s
      self._cv.notify_all()
    self._thread.join(deadline_s + 10)

  def stats(self) -> FakeStats:
    with self._cv:
      return FakeStats(len(self._queue), self._active, self.slots, self._tokens_total)

  def _loop(self) -> None:
    while True:
      with self._cv:
        while not self._queue and not self._stopping:
          self._cv.wait()
        if not self._queue:
          return
        rid, request, callback = self._queue.pop(0)
        self._active = 1
      self._run(rid, request, callback)
      with self._cv:
        self._active = 0

  def _run(self, rid: int, request: EngineRequest, callback) -> None:
    prompt, count = len(request.tokens), 0
    for token, reason in self._tokens(request):
      with self._cv:
        late = self._stopping and time.monotonic() > self._deadline
        if rid in self._cancelled or late:
          callback(TokenEvent(rid, None, "cancelled", prompt, count))
          return
        self._tokens_total += 1
      count += 1
      callback(TokenEvent(rid, token, reason, prompt, count))
      if reason is not None:
        return
      time.sleep(self.step_s)

  def _tokens(self, request: EngineRequest):
    """(token, finish_reason or None) per step."""
    n = request.max_new_tokens
    for step in range(n):
      token = self.script[step] if self.script else (sum(request.tokens) * 31 + 7 * step) % self.vocab_size
      yield token, ("stop" if token in request.stop_ids else "length" if step == n - 1 else None)
      if token in request.stop_ids:
        return


class ServerThread:
  """An app served by uvicorn on 127.0.0.1 (a free port) in a background thread."""

  def __init__(self, app):
    import uvicorn
    self.sock = socket.socket()
    self.sock.bind(("127.0.0.1", 0))
    self.port = self.sock.getsockname()[1]
    self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                timeout_graceful_shutdown=2))
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.port}"

  def __enter__(self) -> "ServerThread":
    self.thread.start()
    deadline = time.monotonic() + 20
    while not self.server.started:
      assert time.monotonic() < deadline, "the server did not start"
      time.sleep(0.01)
    return self

  def __exit__(self, *exc) -> None:
    self.server.should_exit = True
    self.thread.join(10)
    self.sock.close()


def client(url: str, **kwargs):
  import openai
  return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=kwargs.pop("timeout", 60),
                       **kwargs)


VOCAB = 320  # the model's rows; the tokenizer's 300 learnt tokens and 3 special ones fit below
CONTEXT = 256


def write_instruct_checkpoint(directory, real_looking: bool = True, seed: int = 0):
  """A tiny Qwen2 (vocabulary VOCAB, 14 query / 2 KV heads) saved with save_pretrained, plus a Qwen-style
  tokenizer directory; returns the transformers model.

  real_looking: hf_reference.real_looking_model (logit std >= 3; its greedy text repeats the last
  token), else tiny_hf_model (logit std ~1; varied greedy text).
  """
  import torch
  from hf_reference import SCALES, real_looking_model, tiny_hf_model
  from tokenizer_files import train_tokenizer, write_tokenizer_dir
  if real_looking:
    model = real_looking_model(seed)
    model.resize_token_embeddings(VOCAB, mean_resizing=False)
    with torch.no_grad():  # every row drawn at the real-looking scale (tied: the head reads them too)
      embed = model.get_input_embeddings().weight
      embed.copy_(SCALES["embed_tokens"] * torch.randn(embed.shape, generator=torch.Generator().manual_seed(seed)))
  else:
    model = tiny_hf_model(heads=14, kv_heads=2, hidden=112, vocab=VOCAB, seed=seed)
  model.config.max_position_embeddings = CONTEXT  # RoPE does not depend on it; room for chat prompts
  model.save_pretrained(directory)
  write_tokenizer_dir(directory, train_tokenizer(vocab_size=300))  # after save_pretrained's generation_config
  return model


def hf_greedy(model, ids, new_tokens):
  import torch
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
  return out[0, len(ids):].tolist()


# ----------------------------------------------------------------------------- HTTP without a model

CHAT, DONE = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]


def test_tokenizer(directory):
  """The tests' Qwen-style tokenizer (300 learnt tokens), written to `directory` and loaded."""
  from tokenizer_files import train_tokenizer, write_tokenizer_dir
  from qwen_logical.checkpoints.tokenizer import Tokenizer
  write_tokenizer_dir(directory, train_tokenizer(vocab_size=300))
  return Tokenizer.from_directory(directory)


test_tokenizer.__test__ = False  # a helper, not a test


def fake_server(tokenizer, context=128, limits=None, **engine_kwargs):
  """(a started FakeEngine, a ServerThread of the app around it, serving model "tiny" of vocabulary 320)."""
  from qwen_logical.serving.http_app import create_app
  from qwen_logical.serving.openai_api import ServedModel
  engine = FakeEngine(context=context, **engine_kwargs)
  engine.start()
  return engine, ServerThread(create_app(engine, ServedModel("tiny", tokenizer, context, 320), limits=limits))


def post(url, path, body, timeout=30):
  """(status, decoded JSON) of a POST of `body` (a dict, or raw bytes)."""
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def get(url, path):
  """(status, text) of a GET."""
  try:
    with urllib.request.urlopen(url + path, timeout=30) as response:
      return response.status, response.read().decode()
  except urllib.error.HTTPError as e:
    return e.code, e.read().decode()


def metric_samples(url):
  """{(sample name, sorted labels): value} of the server's GET /metrics."""
  from prometheus_client.parser import text_string_to_metric_families
  samples = {}
  for family in text_string_to_metric_families(get(url, "/metrics")[1]):
    for s in family.samples:
      samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
  return samples


@contextlib.contextmanager
def serving(directory, mesh: str, context: int, **namespace):
  """The checkpoint in `directory` served on `mesh` (tensor_parallel, 4 slots) in a background thread:
  yields a namespace of .server, .url, .client, .engine, .part, .params, .tokenizer and `namespace`."""
  import qwen_logical as ql
  from conftest import mesh_of
  from qwen_logical.serving.engine import Engine
  from qwen_logical.serving.http_app import create_app
  from qwen_logical.serving.openai_api import ServedModel
  params, cfg, part = ql.load_checkpoint(str(directory), mesh_of(mesh), ql.get_table("tensor_parallel"),
                                         progress=False)
  tokenizer = ql.Tokenizer.from_directory(directory)
  engine = Engine(part, params, slots=4, context=context, queue_size=32)
  engine.start()
  try:
    with ServerThread(create_app(engine, ServedModel("tiny", tokenizer, engine.context, cfg.vocab_size))) as server:
      yield types.SimpleNamespace(server=server, url=server.url, client=client(server.url), engine=engine, part=part,
                                  params=params, tokenizer=tokenizer, **namespace)
  finally:
    engine.stop(5)
