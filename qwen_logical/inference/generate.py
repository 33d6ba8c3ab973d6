"""Text generation with a preallocated, sharded KV cache: batched prompts, sampling, streaming.

    gen = Generator(partitioner)                        # compiled programs live here
    out = gen.generate(params, ["Hello", "The sky"], tokenizer=tok, max_new_tokens=32)
    out.tokens, out.texts, out.timings                  # per prompt; per phase
    for event in gen.stream(params, prompts, tokenizer=tok, temperature=0.7, seed=1):
      print(event.texts)                                # text deltas, as tokens arrive

A call is three parts: the batch planner (`batch_plan`: prompts to left-padded, bucketed host
arrays; pure), the compiled programs (`programs`, shared with the serving engine: prefill into
cache rows, and decode loops of up to `decode_steps` tokens per dispatch, stop checks on the
device), and the loop here: prefill draws token 0, then each dispatch draws up to K more per row.
The next dispatch is queued before this one's tokens are read, so the device never waits for
Python; rows that hit a stop id stop on the device, and the call ends when every real row has
stopped. Text deltas come from an incremental detokeniser (`detokenize`), linear in the output.
"""

from __future__ import annotations

import time
import weakref
from typing import Iterator, Sequence

import numpy as np

from qwen_logical.inference.batch_plan import (STOP_SLOTS, BatchPlan, BatchPlanner, prompt_bucket, prompt_ids,
                                               stop_and_pad_ids)
from qwen_logical.inference.detokenize import IncrementalDetokenizer, decode
from qwen_logical.inference.programs import (CachePrograms, RowState, batch_multiple, default_decode_steps, local,
                                             slot_multiple)
from qwen_logical.inference.results import (GenerationError, GenerationResult, GenerationStream, StreamEvent,
                                            Timings)
from qwen_logical.inference.sampling import GREEDY, SamplingParams, kind_index
from qwen_logical.inference.speculative import Speculation, SpeculativePrograms, speculative_steps
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
    """Takes step `step`'s tokens int[B] (padding rows ignored; -1: the row has none at this
    step) -> the event of the real rows (None for a row without a new token)."""
    new: list[int | None] = []
    texts: list[str | None] = []
    for r, was_finished in enumerate(self.finished):
      token = int(host_tokens[r])
      if was_finished or token < 0:
        new.append(None)
        texts.append(None)
        continue
      self.tokens[r].append(token)
      new.append(token)
      if token in self.stop_ids:
        self.finished[r], self.reasons[r] = True, "stop"
      elif len(self.tokens[r]) > self.last_step:
        self.finished[r] = True  # "length"
      if self.text is not None:
        delta = self.text[r].add(token)
        texts.append(delta + self.text[r].finish() if self.finished[r] else delta)
    return StreamEvent(step, tuple(new), tuple(texts) if self.text is not None else None)


class Generator:
  """Generation for one Partitioner: owns the batch planner and the compiled programs.

  Args:
    partitioner: the model, mesh and rule table; params passed to `generate` must be its.
    max_length: the context, prompt plus new tokens (default: the config's
      max_position_embeddings).
    decode_steps: tokens each decode dispatch may draw per row (K; default per platform,
      `programs.default_decode_steps`); greedy output is the same for every K. With speculation,
      the speculative rounds per dispatch.
    speculation: a `speculative.Speculation` (default off): greedy output stays the same, sampled
      output keeps its distribution.
  """

  def __init__(self, partitioner: Partitioner, max_length: int | None = None, decode_steps: int | None = None,
               speculation: Speculation | None = None):
    self.partitioner = partitioner
    self.speculation = speculation if speculation is not None and speculation.on else None
    if self.speculation is not None:
      self.speculation.check(partitioner)
    self.config = partitioner.config
    self.max_length = int(max_length or self.config.max_position_embeddings)
    if self.max_length <= 0:
      raise GenerationError(f"max_length={max_length} must be positive.")
    self.decode_steps = int(decode_steps or default_decode_steps())
    if self.decode_steps < 1:
      raise GenerationError(f"decode_steps={decode_steps} must be a positive integer (tokens per dispatch).")
    self.planner = BatchPlanner(self.max_length, self.config.vocab_size, batch_multiple(partitioner),
                                slot_multiple(partitioner))
    self._programs: dict[tuple[int, int, str], CachePrograms] = {}  # per (rows, slots) of a plan, sampler kind

  @property
  def compilations(self) -> int:
    """Programs compiled so far (cache, prefill and decode, every bucket)."""
    return sum(p.compilations for p in self._programs.values())

  def programs(self, rows: int, slots: int, kind: str = GREEDY) -> CachePrograms:
    """The programs for a cache of `rows` x `slots` (a plan's batch and slots) and one sampler kind
    (a call has one setting, so its programs compile that sampler only)."""
    if (rows, slots, kind) not in self._programs:
      if self.speculation is None:
        made = CachePrograms(self.partitioner, rows, slots, self.decode_steps, kind)
      else:
        made = SpeculativePrograms(self.partitioner, rows, slots, self.decode_steps, kind, self.speculation)
      self._programs[rows, slots, kind] = made
    return self._programs[rows, slots, kind]

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
    programs = self._compile(plan, sampling.kind, timings)
    rows = _Rows(plan, tokenizer if stream_text else None)
    for step, host_tokens in enumerate(self._steps(programs, params, plan, sampling, seed, timings)):
      yield rows.add(step, host_tokens)
      if rows.all_finished:  # a row finishes on a stop id or at max_new_tokens
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

  def _compile(self, plan: BatchPlan, kind: str, timings: Timings) -> CachePrograms:
    """The plan's programs, compiled on first use; timings get the cost."""
    self.partitioner.check_batch(plan.batch, plan.prompt)
    programs = self.programs(plan.batch, plan.slots, kind)
    before, start = programs.compilations, time.perf_counter()
    programs.cache_program()
    programs.prefill(plan.batch, plan.prompt)
    if self.speculation is not None and plan.max_new_tokens > 1:
      programs.speculate(plan.batch)
      if programs.draft is not None:
        programs.draft.cache_program()
        programs.draft.prefill(plan.batch, plan.prompt)
    elif plan.max_new_tokens > 1:
      programs.decode(plan.batch)
    timings.compilations = programs.compilations - before
    timings.compile_s = time.perf_counter() - start if timings.compilations else 0.0
    return programs

  def _steps(self, programs: CachePrograms, params: Params, plan: BatchPlan, sampling: SamplingParams, seed: int,
             timings: Timings) -> Iterator[np.ndarray]:
    """Each step's tokens int32[B] on the host (-1 for rows that stopped on the device): step 0
    from prefill, then K per decode dispatch, the next dispatch queued before this one is read."""
    batch, kind = plan.batch, int(kind_index(sampling.kind))
    lengths = np.array([len(p) for p in plan.ids] + [1] * (batch - plan.real), np.int32)
    state = RowState.empty(batch)
    state.index, state.streams, state.steps = lengths, np.arange(batch, dtype=np.int32), np.ones(batch, np.int32)
    state.seeds[:] = seed % 2**32
    state.temperature[:], state.top_k[:], state.top_p[:] = sampling.temperature, sampling.top_k, sampling.top_p
    state.stops[:] = _device_stops(plan.stop_ids)
    start = time.perf_counter()
    cache = programs.new_cache()
    cache, drawn = programs.run_prefill(params, cache, plan.tokens, lengths, np.arange(batch, dtype=np.int32),
                                        state.seeds, state.streams, state.temperature, state.top_k, state.top_p,
                                        kind)
    state.tokens = local(drawn.tokens)
    timings.prefill_s = time.perf_counter() - start
    decode_start = time.perf_counter()
    yield state.tokens
    if plan.max_new_tokens == 1:
      return
    real = np.arange(batch) < plan.real
    state.budget = np.where(real & ~np.isin(state.tokens, plan.stop_ids), plan.max_new_tokens - 1, 0).astype(np.int32)
    if self.speculation is not None:
      yield from speculative_steps(programs, params, cache, plan, state, lengths, timings, decode_start)
      return
    last = plan.max_new_tokens - 1  # decode steps the longest row can need
    ahead, queued, steps = programs.run_decode(params, cache, state, kind), programs.steps, 0
    while ahead is not None:
      cache, state, drawn, produced = ahead
      ahead = None
      if queued < last:  # queue the next dispatch before reading this one
        ahead, queued = programs.run_decode(params, cache, state, kind), queued + programs.steps
      tokens, produced = local(drawn.tokens), local(produced)
      timings.dispatches += 1
      for j in range(int(produced.max(initial=0))):
        steps += 1
        timings.decode_steps = steps
        timings.decode_s = time.perf_counter() - decode_start
        yield tokens[:, j]
      if produced.max(initial=0) < programs.steps:  # every row stopped on the device
        return


def _device_stops(stop_ids: Sequence[int]) -> np.ndarray:
  """The first STOP_SLOTS stop ids (-1 pads) that the device checks; the host checks them all, so
  more stop ids cost extra steps past a later one, never a wrong result."""
  stops = np.full(STOP_SLOTS, -1, np.int32)
  head = list(stop_ids)[:STOP_SLOTS]
  stops[:len(head)] = head
  return stops


_GENERATORS: "weakref.WeakKeyDictionary[Partitioner, Generator]" = weakref.WeakKeyDictionary()


def generator_for(partitioner: Partitioner) -> Generator:
  """The partitioner's Generator (one per partitioner, so compiled programs are reused)."""
  if partitioner not in _GENERATORS:
    _GENERATORS[partitioner] = Generator(partitioner)
  return _GENERATORS[partitioner]


def _generator(partitioner: Partitioner, max_length, decode_steps, speculation) -> Generator:
  """A Generator for these settings, kept (with its compiled programs) for the next call with the same."""
  key = (partitioner, max_length, decode_steps, speculation, id(speculation.draft) if speculation else None)
  if key not in _SETTINGS:
    _SETTINGS.clear()  # one setting at a time: each holds compiled programs
    _SETTINGS[key] = Generator(partitioner, max_length, decode_steps, speculation)
  return _SETTINGS[key]


_SETTINGS: dict = {}


def generate(partitioner: Partitioner, params: Params, prompts, **kwargs) -> GenerationResult:
  """Generates for `prompts` with the partitioner's model; arguments as `Generator.stream`,
  plus `callback(StreamEvent)`, `max_length` (the context; default the config's), `decode_steps`
  (tokens per decode dispatch; default per platform) and `speculation` (`speculative.Speculation`)."""
  max_length, decode_steps = kwargs.pop("max_length", None), kwargs.pop("decode_steps", None)
  speculation = kwargs.pop("speculation", None)
  if max_length is None and decode_steps is None and not (speculation and speculation.on):
    gen = generator_for(partitioner)
  else:
    gen = _generator(partitioner, max_length, decode_steps, speculation)
  return gen.generate(params, prompts, **kwargs)
