"""The server as a user runs it: `main.py --config=configs/serve.py` as a subprocess (SIGTERM drains, the
random default model on token ids)."""

import os
import signal
import subprocess
import sys
import time
import urllib.error

import openai
import pytest
from conftest import free_port
from serve_helpers import HI, client, get, write_instruct_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tiny-instruct")
  return directory, write_instruct_checkpoint(directory, real_looking=False)


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
      if get(url, "/health")[0] == 200:
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
