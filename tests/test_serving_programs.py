"""The engine's programs and host state: a call survives its multi-process message; a decode dispatch
over the first rows of the cache equals those rows alone and updates the cache in place; requests take
the lowest rows, and a dispatch draws up to K tokens for the rows it covers."""

import jax
import jax.numpy as jnp
import numpy as np

from test_serving_engine import REQUESTS, SLOTS, CONTEXT, served, setup, submit_all  # noqa: F401 (fixture)
from qwen_logical.inference import kv_cache
from qwen_logical.inference.logit_processing import RowExtras
from qwen_logical.inference.programs import CachePrograms
from qwen_logical.model.model import Mode
from qwen_logical.inference.sampling import SamplingParams
from qwen_logical.serving import protocol
from qwen_logical.serving.engine import EngineRequest
from qwen_logical.serving.scheduler import Pending, Rows


def test_a_call_survives_its_message():
  channel = protocol.Channel(rows=4, prompt_shape=(4, 64), vocab_size=300)
  rng = np.random.RandomState(0)

  def extras(n):  # every RowExtras field, random
    x = RowExtras.empty(n, 300)
    return {name: (rng.randint(-2 ** 31, 2 ** 31 - 1, v.shape) if v.dtype == np.int32 else rng.randn(*v.shape))
            .astype(v.dtype) for name, v in vars(x).items()}

  stops = np.full((4, 8), -1, np.int32)
  stops[0, :2], stops[3, 0] = (7, 151645), 3
  decode = protocol.Call(protocol.DECODE, "filtered", dict(
      tokens=np.array([5, 0, 7, 255], np.int32), index=np.array([3, 0, 31, 9], np.int32),
      seeds=np.array([0, 2 ** 32 - 1, 7, 2 ** 31], np.uint32), streams=np.array([0, 1, 0, 3], np.int32),
      steps=np.array([1, 0, 4, 2], np.int32), budget=np.array([4, 0, 1, 30], np.int32),
      temperature=np.array([0.0, 0.7, 1.5, 2.0], np.float32), top_k=np.array([0, 0, 20, 1], np.int32),
      top_p=np.array([1.0, 0.9, 0.95, 1e-6], np.float32), stops=stops, **extras(4)), flag=1)
  prefill = protocol.Call(protocol.PREFILL, "sample", dict(
      tokens=np.arange(32, dtype=np.int32).reshape(2, 16), lengths=np.array([16, 3], np.int32),
      rows=np.array([1, 4], np.int32), seeds=np.array([9, 2 ** 32 - 2], np.uint32),
      streams=np.array([0, 0], np.int32), temperature=np.array([0.5, 0.0], np.float32),
      top_k=np.array([3, 0], np.int32), top_p=np.array([1.0, 0.5], np.float32), stops=stops[:2], **extras(2)),
      flag=1)
  extend = protocol.Call(protocol.EXTEND, "greedy", dict(
      {k: v for k, v in prefill.arrays.items() if k != "lengths"}, starts=np.array([32, 0], np.int32)))
  few = protocol.Call(protocol.DECODE, "greedy", {k: v[:2] for k, v in decode.arrays.items()}, limit=3)
  copy = protocol.Call(protocol.COPY, "greedy", {}, limit=3, flag=1)
  for call in (decode, prefill, extend, few, copy):
    message = channel.encode(call)
    assert message.shape == (channel.size,) and message.dtype == np.int32
    back = channel.decode(message)
    assert back.op == call.op and back.kind == call.kind and set(back.arrays) == set(call.arrays)
    assert back.limit == call.limit and back.flag == call.flag
    for name, values in call.arrays.items():
      prompts = call.op in (protocol.PREFILL, protocol.EXTEND) and name == "tokens"
      expected = np.zeros_like(values) if prompts else values  # the prompts follow in a second message
      assert back.arrays[name].dtype == values.dtype and back.arrays[name].tolist() == expected.tolist(), name
  assert channel.decode(channel.encode(protocol.Call(protocol.STOP))).op == protocol.STOP


def test_a_step_of_the_first_rows_equals_their_own_cache_and_updates_the_cache_in_place():
  """DECODE of n token rows on a cache of N > n rows uses rows [0, n): the logits and rows of a call
  on a cache of those n rows alone; rows [n, N) untouched. The compiled decode[n] loops alias the
  cache and copy no layer of it."""
  part, params = setup("1x1", "tensor_parallel")
  programs = CachePrograms(part, SLOTS, CONTEXT, steps=4)
  rng = np.random.RandomState(0)
  shapes = kv_cache.cache_shapes(part.config, part.layout, SLOTS, programs.length)
  cache = jax.tree_util.tree_map(lambda s: rng.randn(*s.shape).astype(s.dtype), shapes)

  def step(cache, tokens, index):
    with part.bound():
      return part.model.apply({"params": params}, tokens[:, None], jnp.ones((len(tokens), programs.length), jnp.int32),
                              index[:, None], mode=Mode.DECODE, cache=cache, cache_index=index)

  for n, index in ((1, [9]), (2, [5, 30])):
    tokens, index = jnp.asarray(rng.randint(0, 256, n)), jnp.asarray(index)
    logits, written = jax.jit(step)(cache, tokens, index)
    alone, own = jax.jit(step)(jax.tree_util.tree_map(lambda a: a[:n], cache), tokens, index)
    np.testing.assert_allclose(logits, alone, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(logits)).max() > 1
    for big, small, old in zip(*(jax.tree_util.tree_leaves(t) for t in (written, own, cache))):
      np.testing.assert_array_equal(np.asarray(big)[:n], small)
      np.testing.assert_array_equal(np.asarray(big)[n:], old[n:])
      assert not np.array_equal(np.asarray(big)[:n], old[:n])
  layer = "f32[" + ",".join(map(str, kv_cache.cache_shape(part.config, part.layout, SLOTS, programs.length))) + "]"
  cache_bytes = kv_cache.cache_bytes(part.config, part.layout, SLOTS, programs.length)
  for n in (1, 2, 4):
    compiled = programs.decode(n)
    text = compiled.as_text()
    copies = [line for line in text.splitlines() if f"= {layer}" in line and (" copy(" in line or "copy-start" in line)]
    assert " while(" in text and not copies, (n, copies)  # K steps in one program; no copy of a cache layer
    assert compiled.memory_analysis().alias_size_in_bytes == cache_bytes + SLOTS * part.config.vocab_size * 4  # + occurrences


def test_requests_take_the_lowest_rows_and_dispatches_run_the_rows_they_need(served):
  """Rows: the lowest free row first; a dispatch covers rows [0, n), n the power of 4 over the
  highest running row; the sampler kind GREEDY when no running row samples, SAMPLE / FILTERED when
  one does; a dispatch runs K steps when every slot is taken, join_steps while one is free."""
  engine = served[0]
  assert engine.shapes.decode_sizes() == [1, 4] and [engine.shapes.decode_rows(c) for c in (1, 2, 3, 4)] == [1, 4, 4, 4]
  rows = Rows(SLOTS, 256, scratch=CONTEXT - 1)
  greedy, sampled, filtered = (REQUESTS[i] for i in (0, 2, 3))
  assert (greedy.sampling.kind, sampled.sampling.kind, filtered.sampling.kind) == ("greedy", "sample", "filtered")
  assert rows.highest() == 0
  rows.start(rows.free()[0], Pending(0, greedy, print))
  rows.first(0, 17, finished=False)
  head = rows.state.head(1)
  assert rows.highest() == 1 and rows.kind() == "greedy" and head.tokens.tolist() == [17]
  assert head.budget.tolist() == [greedy.max_new_tokens - 1] and head.index.tolist() == [len(greedy.tokens)]
  rows.start(rows.free()[0], Pending(1, sampled, print))
  rows.start(rows.free()[0], Pending(2, filtered, print))
  assert rows.active() == [0, 1, 2] and rows.kind() == "filtered"
  rows.release(2)
  assert rows.kind() == "sample" and rows.highest() == 2 and rows.state.budget[2] == 0
  rows.release(0)
  assert rows.free() == [0, 2, 3] and rows.highest() == 2
  # The engine: one greedy request alone, K tokens per dispatch.
  before = engine.stats()
  collector, [rid] = submit_all(engine, [greedy])
  assert collector.wait([rid])[0] == served[2][0]
  after, join = engine.stats(), engine.shapes.join_steps
  assert after.decode_steps - before.decode_steps == greedy.max_new_tokens - 1
  assert after.dispatches - before.dispatches == -(-(greedy.max_new_tokens - 1) // join)  # 3 slots free
  assert engine.shapes.decode_limit(0) == engine.programs.steps and engine.shapes.decode_limit(1) == join


def test_the_first_token_obeys_top_k(served):
  """top_k=1 at a high temperature is greedy from the first token on (the prefill's draw is filtered)."""
  engine, _, first, _, _ = served
  greedy = REQUESTS[0]
  assert greedy.sampling.greedy
  hot = EngineRequest(greedy.tokens, greedy.max_new_tokens, SamplingParams(5.0, top_k=1), seed=3)
  collector, [rid] = submit_all(engine, [hot])
  assert collector.wait([rid])[0] == first[0]
