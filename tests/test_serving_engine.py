"""The serving engine: 16 requests through 4 slots get exactly what each gets alone, what `generate` gives
(greedy and seeded sampling) and what transformers gives (greedy); nothing compiles after warm-up; stop
ids, cancel, the queue bound, stop(); the same tokens on sharded meshes and across two processes."""

import functools
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import compile_events, free_port, mesh_of
from hf_reference import hf_tensors, model_config, varied_text_model
from qwen_logical.checkpoints.hf_names import flax_from_hf
from qwen_logical.inference.generate import generate
from qwen_logical.inference.sampling import SamplingParams
from qwen_logical.inference.speculative import Speculation
from qwen_logical.serving.engine import Engine, EngineRequest, QueueFullError, ServingError
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import get_table

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import serving_worker as worker  # noqa: E402

SLOTS, CONTEXT, REQUESTS, MODEL_SEED = worker.SLOTS, worker.CONTEXT, worker.REQUESTS, worker.MODEL_SEED


@functools.lru_cache(maxsize=None)
def hf_model():
  return varied_text_model(seed=MODEL_SEED)


@functools.lru_cache(maxsize=None)
def setup(mesh, table):
  cfg = model_config(hf_model(), scan_layers=False)
  part = Partitioner(cfg, mesh_of(mesh), get_table(table))
  return part, part.place(flax_from_hf(hf_tensors(hf_model()), cfg, part.layout))


class Collector:
  """Callbacks of many requests: their tokens and final events, and a wait for all of them."""

  def __init__(self):
    self.tokens, self.final, self.events, self.done = {}, {}, [], threading.Condition()

  def __call__(self, event):
    with self.done:
      self.events.append(event)
      if event.token is not None:
        self.tokens.setdefault(event.request_id, []).append(event.token)
      if event.finish_reason is not None:
        self.final[event.request_id] = event
        self.done.notify_all()

  def wait(self, rids, timeout=120):
    with self.done:
      assert self.done.wait_for(lambda: all(r in self.final for r in rids), timeout), "requests did not finish"
    return [self.tokens.get(r, []) for r in rids]


def submit_all(engine, requests):
  collector = Collector()
  return collector, [engine.submit(r, collector) for r in requests]


@pytest.fixture(scope="module")
def served():
  """The 1x1 engine, warmed up; the first wave of REQUESTS, all queued before the scheduler starts."""
  part, params = setup("1x1", "tensor_parallel")
  engine = Engine(part, params, slots=SLOTS, context=CONTEXT, queue_size=len(REQUESTS), log_every_s=0.5)
  warm = engine.warmup()
  collector, rids = submit_all(engine, REQUESTS)
  engine.start()
  first = collector.wait(rids)
  yield engine, warm, first, collector, rids
  engine.stop(0)


def test_each_request_gets_what_it_gets_alone(served):
  engine, _, first, collector, rids = served
  assert [len(t) for t in first] == [r.max_new_tokens for r in REQUESTS]  # no stop ids here
  assert all(collector.final[r].finish_reason == "length" for r in rids)
  assert len({len(r.tokens) for r in REQUESTS}) >= 12 and len({r.max_new_tokens for r in REQUESTS}) >= 10
  for request, expected in zip(REQUESTS, first):
    alone, [rid] = submit_all(engine, [request])
    assert alone.wait([rid]) == [expected]
  stats = engine.stats()
  assert stats.active == 0 and stats.queued == 0 and stats.requests_total >= 2 * len(REQUESTS)
  assert stats.tokens_total >= 2 * sum(r.max_new_tokens for r in REQUESTS) and stats.decode_steps > 0


def test_greedy_requests_equal_generate_and_transformers(served):
  _, _, first, _, _ = served
  part, params = setup("1x1", "tensor_parallel")
  greedy = [i for i, r in enumerate(REQUESTS) if r.sampling.greedy]
  longest = max(REQUESTS[i].max_new_tokens for i in greedy)
  batch = generate(part, params, [list(REQUESTS[i].tokens) for i in greedy], max_new_tokens=longest).tokens
  for i, row in zip(greedy, batch):
    request = REQUESTS[i]
    assert first[i] == row[:request.max_new_tokens], i
    with torch.no_grad():
      ids = torch.tensor([request.tokens])
      hf = hf_model().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.max_new_tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
    assert first[i] == hf[0, len(request.tokens):].tolist(), i
  assert len({t for i in greedy for t in first[i]}) > 10  # not one repeated token


def test_sampled_requests_equal_generate_alone_with_their_seed(served):
  _, _, first, _, _ = served
  part, params = setup("1x1", "tensor_parallel")
  for i in worker.COMPARED_WITH_GENERATE:
    r, s = REQUESTS[i], REQUESTS[i].sampling
    alone = generate(part, params, [list(r.tokens)], max_new_tokens=r.max_new_tokens, temperature=s.temperature,
                     top_k=s.top_k, top_p=s.top_p, seed=r.seed).tokens[0]
    assert first[i] == alone, (i, s)
  assert {REQUESTS[i].sampling.kind for i in worker.COMPARED_WITH_GENERATE} == {"sample", "filtered"}
  # Sampling draws other tokens than greedy, and another seed draws others again.
  i = worker.COMPARED_WITH_GENERATE[0]
  other = dict(vars(REQUESTS[i]), seed=REQUESTS[i].seed + 1)
  engine = served[0]
  again, [rid] = submit_all(engine, [EngineRequest(**other)])
  assert again.wait([rid])[0] != first[i]


def test_nothing_compiles_after_warmup(served):
  engine, warm, first, _, _ = served
  part = engine.partitioner
  assert engine.shapes.buckets() == [16, 64] and engine.shapes.decode_sizes() == [1, 4]
  assert warm == 1 + 1 + 2 + 2 + 2  # the cache; the row copy; a prefill and an extend per bucket; a decode loop per row count
  before = engine.compilations
  assert before == warm  # the first wave compiled nothing
  events, stop = compile_events()
  try:
    collector = Collector()  # a second wave, submitted while the scheduler runs
    rids = []
    for request in REQUESTS[::-1]:
      rids.append(engine.submit(request, collector))
      time.sleep(0.002)
    second = collector.wait(rids)[::-1]
  finally:
    stop()
  assert second == first
  assert engine.compilations == before and events == [], events
  assert part is engine.partitioner


def test_stop_ids_cancel_and_the_queue(served):
  engine, _, first, _, _ = served
  r = REQUESTS[0]
  stop_token = first[0][3]
  stopped, [rid] = submit_all(engine, [EngineRequest(r.tokens, r.max_new_tokens, r.sampling, stop_ids=(stop_token,))])
  tokens = stopped.wait([rid])[0]
  end = stopped.final[rid]
  assert tokens == first[0][:first[0].index(stop_token) + 1] and end.finish_reason == "stop"
  assert end.token == stop_token and end.completion_tokens == len(tokens) and end.prompt_tokens == len(r.tokens)
  # Cancel: the request ends with a final "cancelled" event and its slot is free at once.
  long = max(REQUESTS, key=lambda q: q.max_new_tokens)
  collector = Collector()
  rid = engine.submit(long, lambda e: (collector(e), e.completion_tokens == 2 and engine.cancel(e.request_id)))
  collector.wait([rid])
  end = collector.final[rid]
  assert end.finish_reason == "cancelled" and end.token is None and len(collector.tokens[rid]) < long.max_new_tokens
  assert engine.stats().active == 0
  # An engine not started: SLOTS free slots plus a queue of 2, then QueueFullError.
  part, params = setup("1x1", "tensor_parallel")
  idle = Engine(part, params, slots=SLOTS, context=CONTEXT, queue_size=2)
  waiting, rids = submit_all(idle, REQUESTS[:SLOTS + 2])
  with pytest.raises(QueueFullError, match="slots are busy and 2 requests are waiting"):
    idle.submit(REQUESTS[0], waiting)
  assert idle.stats().queued == SLOTS + 2
  idle.stop(0)  # cancels what never ran
  waiting.wait(rids)
  assert all(waiting.final[r].finish_reason == "cancelled" for r in rids)
  with pytest.raises(ServingError, match="shutting down"):
    idle.submit(REQUESTS[0], waiting)


@pytest.mark.parametrize("changes,field,message", [
    (dict(tokens=()), "tokens", "prompt is empty"),
    (dict(tokens=(1, 999)), "tokens", r"outside \[0, 256\)"),
    (dict(tokens=(1,) * CONTEXT), "tokens", f"at most {CONTEXT - 1} tokens"),
    (dict(max_new_tokens=0), "max_new_tokens", "must be a positive integer"),
    (dict(tokens=(1,) * 20, max_new_tokens=13), "max_new_tokens", "use max_new_tokens <= 12"),
    (dict(sampling=SamplingParams(1.0, top_k=300)), "top_k", "exceeds the vocabulary size 256"),
    (dict(seed=1.5), "seed", "must be an integer"),
    (dict(stop_ids=("x",)), "stop_ids", "sequence of token ids"),
])
def test_check_names_the_field(changes, field, message):
  part, params = setup("1x1", "tensor_parallel")
  engine = Engine(part, params, slots=SLOTS, context=CONTEXT)
  request = EngineRequest(**dict(vars(REQUESTS[0]), **changes))
  with pytest.raises(ServingError, match=message) as error:
    engine.submit(request, print)
  assert error.value.field == field and engine.stats().queued == 0


def test_slots_must_split_over_the_mesh():
  part, params = setup("2x4", "tp_fsdp")
  with pytest.raises(ServingError, match="cache rows split 2 ways; use a multiple of 2"):
    Engine(part, params, slots=3, context=CONTEXT)


def test_a_table_that_splits_the_cache_rows_gives_the_1x1_tokens(served):
  """2x4 tp_fsdp: the cache rows split over 'batch' (one row per device pair), heads over 'model'.
  (1x8 tensor_parallel runs in the two-process test below.)"""
  _, _, first, _, _ = served
  part, params = setup("2x4", "tp_fsdp")
  assert part.table.mesh_axes("cache_batch") == ("batch",)
  engine = Engine(part, params, slots=worker.SHARDED_SLOTS, context=CONTEXT)
  collector, rids = submit_all(engine, [REQUESTS[i] for i in worker.SHARDED])
  engine.start()
  try:
    assert collector.wait(rids) == [first[i] for i in worker.SHARDED]
  finally:
    engine.stop(0)
  assert engine.stats().prefills >= 3  # rows were freed and taken again


def test_prompt_lookup_rounds_give_the_plain_greedy_tokens(served):
  """Speculative rounds in the engine: every sampler kind in one program (the kind a runtime value);
  greedy requests get their plain tokens, sampled ones their length."""
  _, _, first, _, _ = served
  part, params = setup("1x1", "tensor_parallel")
  engine = Engine(part, params, slots=SLOTS, context=CONTEXT, speculation=Speculation("prompt_lookup", 3, ngram=1))
  requests = REQUESTS[:8]  # every setting of the mix once
  collector, rids = submit_all(engine, requests)
  engine.start()
  try:
    got = collector.wait(rids)
  finally:
    engine.stop(0)
  assert {r.sampling.kind for r in requests} == {"greedy", "sample", "filtered"}
  for request, plain, speculative in zip(requests, first, got):
    assert speculative == plain if request.sampling.greedy else len(speculative) == request.max_new_tokens
  assert "speculate" in " ".join(str(key) for key in engine.programs._programs)


# --- two processes ---------------------------------------------------------------------------------

def _env():
  return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


def test_two_processes_serve_the_1x1_tokens_and_a_dead_peer_ends_the_server(served, tmp_path):
  _, _, first, _, _ = served
  directory = tmp_path / "checkpoint"
  hf_model().save_pretrained(str(directory))
  port = free_port()
  out = str(tmp_path / "out")
  command = lambda pid: [sys.executable, "-u", os.path.join(HERE, "serving_worker.py"), str(port), str(pid),
                         str(directory), out]
  procs = [subprocess.Popen(command(pid), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True) for pid in (0, 1)]
  try:
    leader_out, leader_err = procs[0].communicate(timeout=240)
    ended = time.time()
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  served_tokens = np.load(out + ".npz", allow_pickle=False)
  assert [served_tokens[f"r{i}"].tolist() for i in worker.SHARDED] == [first[i] for i in worker.SHARDED]
  assert int(served_tokens["devices"]) == 8 and int(served_tokens["local_devices"]) == 4
  # The follower killed itself once the first wave was written; the leader ends with a clear error:
  # ours (exit 3) when the keepalive's collective fails first, or JAX's coordination service's abort
  # when it sees the dead task first (a race the loaded machine sometimes loses).
  if procs[0].returncode == 3:
    assert "another process of this job failed or was killed" in leader_err, leader_err[-3000:]
  else:
    assert procs[0].returncode == -signal.SIGABRT, (procs[0].returncode, leader_err[-3000:])
    assert "another task died" in leader_err, leader_err[-3000:]
  assert "WAVE1" in leader_out and "WITHOUT THE FOLLOWER" not in leader_out
  assert ended - os.path.getmtime(out + ".npz") < 30  # the follower died right after: an error, not a hang
