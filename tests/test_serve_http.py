"""The OpenAI-compatible server over HTTP on a tiny checkpoint, driven with the official `openai` client: its
tokens against qwen_logical's generate and transformers, stop strings, concurrency, disconnects. The HTTP
layer alone is in test_serve_http_layer.py, the command in test_serve_command.py."""

import threading
import time

import pytest
from serve_helpers import CONTEXT, client, hf_greedy, serving, write_instruct_checkpoint


SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tiny-instruct")
  return directory, write_instruct_checkpoint(directory, real_looking=False)


@pytest.fixture(scope="module")
def served(checkpoint):
  """The checkpoint served on 1x8 tensor_parallel: .server, .engine, .part, .params, .tokenizer, .model (transformers)."""
  directory, model = checkpoint
  with serving(directory, "1x8", CONTEXT, model=model) as served:
    yield served


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
