"""Text generation with a preallocated, sharded KV cache: batched prompts, sampling, streaming.

    gen = Generator(partitioner)                        # compiled programs live here
    out = gen.generate(params, ["Hello", "The sky"], tokenizer=tok, max_new_tokens=32)
    out.tokens, out.texts, out.timings                  # per prompt; per phase
    for event in gen.stream(params, prompts, tokenizer=tok, temperature=0.7, seed=1):
      print(event.texts)                                # text deltas, as tokens arrive

A call is three parts: the batch planner (`batch_plan`: prompts to left-padded, bucketed host
arrays and masks; pure), the compiled programs (`programs`: prefill and decode per bucket), and
the loop here: prefill picks token 0, then each decode step picks the next token. The host
dispatches step t + 1 before it reads token t, so the device never waits for Python; rows that
hit a stop id emit `pad_id` afterwards and the loop ends when every real row has stopped. Text
deltas come from an incremental detokeniser (`detokenize`), linear in the output length.
"""

from __future__ import annotations

import time
import weakref
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qwen_logical.inference import kv_cache
from qwen_logical.inference.batch_plan import (STOP_SLOTS, BatchPlan, BatchPlanner, prompt_bucket, prompt_ids,
                                               stop_and_pad_ids)
from qwen_logical.inference.detokenize import IncrementalDetokenizer, decode
from qwen_logical.inference.programs import ProgramKey, Programs, batch_multiple, slot_multiple
from qwen_logical.inference.results import (GenerationError, GenerationResult, GenerationStream, StreamEvent,
                                            Timings)
from qwen_logical.inference.sampling import SamplingParams
from qwen_logical.model import axes as ax
from qwen_logical.sharding import distributed
from qwen_logical.sharding.partitioner import Params, Partitioner

__all__ = ["GenerationError", "GenerationResult", "GenerationStream", "Generator", "StreamEvent", "Timings",
           "generate", "generator_for", "prompt_bucket"]


class _Rows:
  """Host state of the real rows: their new tokens, which have finished and why, their text deltas."""

  def __init__(self, plan: BatchPlan, tokenizer=None):
    self.stop_ids = frozenset(plan.stop_ids)
    self.last_step = plan.max_new_tokens - 1
    self.tokens: list[list[int]] = [[] for _ in plan.ids]
    self.finished = [False] * plan.real
    self.reasons = ["length"] * plan.real
    self.text = None if tokenizer is None else [IncrementalDetokenizer(tokenizer, self.stop_ids) for _ in plan.ids]

  @property
  def all_finished(self) -> bool:
    return all(self.finished)

  def add(self, step: int, host_tokens: np.ndarray) -> StreamEvent:
    """Takes step `step`'s tokens int[B] (padding rows ignored) -> the event of the real rows."""
    new: list[int | None] = []
    texts: list[str | None] = []
    for r, was_finished in enumerate(self.finished):
      if was_finished:
        new.append(None)
        texts.append(None)
        continue
      token = int(host_tokens[r])
      self.tokens[r].append(token)
      new.append(token)
      if token in self.stop_ids:
        self.finished[r], self.reasons[r] = True, "stop"
      if self.text is not None:
        delta = self.text[r].add(token)
        texts.append(delta + self.text[r].finish() if self.finished[r] or step == self.last_step else delta)
    return StreamEvent(step, tuple(new), tuple(texts) if self.text is not None else None)


class Generator:
  """Generation for one Partitioner: owns the batch planner and the compiled programs.

  Args:
    partitioner: the model, mesh and rule table; params passed to `generate` must be its.
    max_length: the context, prompt plus new tokens (default: the config's
      max_position_embeddings).
  """

  def __init__(self, partitioner: Partitioner, max_length: int | None = None):
    self.partitioner = partitioner
    self.config = partitioner.config
    self.max_length = int(max_length or self.config.max_position_embeddings)
    if self.max_length <= 0:
      raise GenerationError(f"max_length={max_length} must be positive.")
    self.planner = BatchPlanner(self.max_length, self.config.vocab_size, batch_multiple(partitioner),
                                slot_multiple(partitioner))
    self.programs = Programs(partitioner)

  @property
  def compilations(self) -> int:
    """Programs compiled so far (prefill and decode, every bucket)."""
    return self.programs.compilations

  def lower_decode(self, batch: int, prompt: int, slots: int, sampling: SamplingParams = SamplingParams()):
    """The lowered decode step (for HLO inspection and collective counts)."""
    return self.programs.lower_decode(ProgramKey(batch, prompt, slots, sampling, STOP_SLOTS))

  def generate(self, params: Params, prompts, **kwargs) -> GenerationResult:
    """Generates for every prompt; see `stream` for the arguments. `callback(StreamEvent)`, when
    given, sees each step's tokens as they arrive."""
    callback = kwargs.pop("callback", None)
    run = self._run(params, prompts, stream_text=callback is not None, **kwargs)
    while True:
      try:
        event = next(run)
      except StopIteration as stop:
        return stop.value
      if callback is not None:
        callback(event)

  def stream(self, params: Params, prompts, **kwargs) -> GenerationStream:
    """Iterates StreamEvents as tokens arrive; `.result` is the GenerationResult afterwards.

    Args:
      params: the partitioner's parameters (placed or initialised by it).
      prompts: a str, a list of str (needs `tokenizer`), a list of ids, a list of id lists,
        or an int[B, L] array (with `attention_mask` for padded rows).
      tokenizer: anything with encode(str) -> ids and decode(ids, skip_special_tokens=...)
        (qwen_logical.tokenizer.Tokenizer); gives texts and default stop/pad ids.
      max_new_tokens: new tokens per prompt at most (default 32).
      temperature, top_k, top_p: see SamplingParams (default greedy).
      seed: sampling seed; row r at step t draws from (seed, r, t).
      stop_ids: ids that end a row (included in its tokens); default the tokenizer's.
      pad_id: what a stopped row emits in the padded array; default the tokenizer's, else
        the first stop id, else 0.
    """
    return GenerationStream(self._run(params, prompts, **kwargs))

  def _run(self, params: Params, prompts, *, tokenizer=None, attention_mask=None, max_new_tokens: int = 32,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           stop_ids: Sequence[int] | None = None, pad_id: int | None = None, stream_text: bool = True):
    start = time.perf_counter()
    sampling = SamplingParams(temperature, top_k, top_p)
    sampling.check_vocab(self.config.vocab_size)
    plan = self.planner.plan(prompt_ids(prompts, tokenizer, attention_mask), max_new_tokens,
                             *stop_and_pad_ids(tokenizer, stop_ids, pad_id))
    timings = Timings(tokenize_s=time.perf_counter() - start, batch_shape=plan.shape,
                      prompt_tokens=plan.prompt_tokens)
    programs = self._compile(plan, sampling, timings)
    rows = _Rows(plan, tokenizer if stream_text else None)
    for step, host_tokens in enumerate(self._steps(programs, params, plan, seed, timings)):
      yield rows.add(step, host_tokens)
      if rows.all_finished:
        break
    timings.new_tokens = sum(len(t) for t in rows.tokens)
    timings.decode_tokens = timings.new_tokens - plan.real
    texts = None
    if tokenizer is not None:
      detokenize_start = time.perf_counter()
      texts = [decode(tokenizer, [t for t in row if t not in rows.stop_ids]) for row in rows.tokens]
      timings.detokenize_s = time.perf_counter() - detokenize_start
    timings.total_s = time.perf_counter() - start
    return GenerationResult(rows.tokens, rows.reasons, plan.ids, timings, texts)

  def _compile(self, plan: BatchPlan, sampling: SamplingParams, timings: Timings):
    """(prefill, decode or None) for the plan's bucket, compiled on first use; timings get the cost."""
    self.partitioner.check_batch(plan.batch, plan.prompt)
    kv_cache.check_cache(self.partitioner, plan.batch, plan.slots)
    key = ProgramKey(plan.batch, plan.prompt, plan.slots, sampling, plan.stops.size)
    before = self.programs.compilations
    prefill, prefill_s = self.programs.get("prefill", key)
    decode_, decode_s = self.programs.get("decode", key) if plan.max_new_tokens > 1 else (None, 0.0)
    timings.compile_s = prefill_s + decode_s
    timings.compilations = self.programs.compilations - before
    return prefill, decode_

  def _steps(self, programs, params: Params, plan: BatchPlan, seed: int, timings: Timings) -> Iterator[np.ndarray]:
    """Each step's tokens int32[B] on the host: step 0 from prefill, then one per decode step,
    the next step dispatched before this one is read. Stops when the consumer stops asking."""
    prefill, decode_ = programs
    token_sharding = self.partitioner.sharding(ax.TOKENS)
    replicated = NamedSharding(self.partitioner.mesh, PartitionSpec())
    slot_mask = distributed.global_array(plan.slot_mask, token_sharding)
    seed_arr, pad_arr = np.uint32(seed % 2**32), np.int32(plan.pad_id)
    start = time.perf_counter()
    cache, token, done = prefill(params, distributed.global_array(plan.tokens, token_sharding), slot_mask,
                                 seed_arr, plan.stops)
    index = jax.device_put(np.int32(plan.prompt), replicated)
    host = distributed.to_host(token)
    timings.prefill_s = time.perf_counter() - start
    decode_start = time.perf_counter()
    yield host
    if decode_ is None:
      return
    step_args = lambda: (params, cache, token, done, index, slot_mask, seed_arr, plan.stops, pad_arr)
    ahead = decode_(*step_args())
    for step in range(1, plan.max_new_tokens):
      cache, token, done, index = ahead
      if step + 1 < plan.max_new_tokens:  # dispatch the next step before waiting for this one
        ahead = decode_(*step_args())
      host = distributed.to_host(token)
      timings.decode_steps = step
      timings.decode_s = time.perf_counter() - decode_start
      yield host


_GENERATORS: "weakref.WeakKeyDictionary[Partitioner, Generator]" = weakref.WeakKeyDictionary()


def generator_for(partitioner: Partitioner) -> Generator:
  """The partitioner's Generator (one per partitioner, so compiled programs are reused)."""
  if partitioner not in _GENERATORS:
    _GENERATORS[partitioner] = Generator(partitioner)
  return _GENERATORS[partitioner]


def generate(partitioner: Partitioner, params: Params, prompts, **kwargs) -> GenerationResult:
  """Generates for `prompts` with the partitioner's model; arguments as `Generator.stream`,
  plus `callback(StreamEvent)` and `max_length` (the context; default the config's)."""
  max_length = kwargs.pop("max_length", None)
  gen = generator_for(partitioner) if max_length is None else Generator(partitioner, max_length)
  return gen.generate(params, prompts, **kwargs)
