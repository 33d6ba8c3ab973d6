"""Property-based requests against the real app in-process: schemathesis generates them from the server's own
OpenAPI document (bodies that fit the request schemas and bodies that break them, on every route), the app
runs them on a real engine (a tiny checkpoint on 1x1). The property: no 5xx, every error in the OpenAI shape,
nothing leaks (slots, queue and requests in flight back to zero after each), and a normal request still
gets its completion afterwards. A fixed seed and a bounded number of examples keep it repeatable and short."""

import collections
import time

import hypothesis
import pytest
from conftest import mesh_of
from serve_helpers import write_instruct_checkpoint

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.generation.modes import GenerationMode  # noqa: E402

EXAMPLES = 100  # each mode: about 25 s on 2 CPU cores, the engine's compilations included
CONTEXT = 64


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  import qwen_logical as ql
  from qwen_logical.serving.engine import Engine
  from qwen_logical.serving.http_app import create_app
  from qwen_logical.serving.openai_api import ServedModel
  directory = tmp_path_factory.mktemp("tiny-instruct")
  write_instruct_checkpoint(directory, real_looking=False)
  params, cfg, part = ql.load_checkpoint(str(directory), mesh_of("1x1"), ql.get_table("tensor_parallel"),
                                         progress=False)
  engine = Engine(part, params, slots=2, context=CONTEXT, queue_size=4)
  engine.start()
  try:
    served = ServedModel("tiny", ql.Tokenizer.from_directory(directory), CONTEXT, cfg.vocab_size)
    yield create_app(engine, served), engine
  finally:
    engine.stop(5)


def _settled(app, engine, timeout=20.0) -> bool:
  """Waits until no request runs, waits or is in flight in the app; False if that does not happen in time."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    stats = engine.stats()
    if stats.active == 0 and stats.queued == 0 and app.state.serving.inflight == 0:
      return True
    time.sleep(0.005)
  return False


def test_requests_generated_from_the_openapi_schema_get_no_5xx_and_leak_nothing(served):
  app, engine = served
  schema = schemathesis.openapi.from_asgi("/openapi.json", app)
  statuses = collections.Counter()

  def run(case):
    response = case.call(timeout=120)
    statuses[response.status_code] += 1
    where = (case.method, case.path, case.body if case.body is not None else None, response.text[:400])
    assert response.status_code < 500, where
    if response.status_code >= 400 and case.path.startswith("/v1/"):
      error = response.json()["error"]
      assert {"message", "type", "param", "code"} <= set(error) and error["message"], where
    assert _settled(app, engine), ("a request leaked", engine.stats(), app.state.serving.inflight, where)

  for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
    test = hypothesis.seed(24)(hypothesis.settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=False, print_blob=True,
        suppress_health_check=list(hypothesis.HealthCheck))(hypothesis.given(schema.as_strategy(mode))(run)))
    test()

  completions = schema["/v1/completions"]["POST"]
  after = completions.Case(body={"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}).call()
  assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4
  assert statuses[200] > 10 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 50, statuses
  assert _settled(app, engine)  # the engine frees a row just after delivering its last token: the answer may come first
