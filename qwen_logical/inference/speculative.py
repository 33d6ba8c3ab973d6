"""Speculative decoding: several tokens checked per pass over the weights, exactly.

    spec = Speculation("prompt_lookup", num_tokens=5, ngram=3)
    spec = Speculation("draft", num_tokens=4, draft=DraftModel(draft_partitioner, draft_params))
    generate(partitioner, params, prompts, speculation=spec, ...)

A round drafts K tokens cheaply (by prompt lookup, or with a small draft model of the same
vocabulary), runs the target once over the row's last token and the drafts, and keeps the drafts
its sampler agrees with (`speculative_accept`): greedy output is plain greedy decoding's, token
for token; sampled output is distributed exactly as the target's sampler.

`SpeculativePrograms` adds one program to `CachePrograms`, speculate[n]: up to `steps` rounds in
one dispatch (`lax.while_loop`), with the row's token history on the device (prompt lookup reads
it), the draft model's own cache (the draft method), and rejected drafts rolled back by the row's
slot index alone: a later round rewrites those slots before any query can see them (the causal
rule). The cache has K + 1 spare slots so a round's writes always fit.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from qwen_logical.common.errors import QwenLogicalError
from qwen_logical.inference import kv_cache
from qwen_logical.inference import speculative_accept as acc
from qwen_logical.inference.batch_plan import round_up
from qwen_logical.inference.programs import ROW, CachePrograms, RowState, local, slot_multiple
from qwen_logical.inference.results import Timings
from qwen_logical.inference.sampling import GREEDY, KINDS, stream_keys
from qwen_logical.model.model import Mode
from qwen_logical.sharding.programs import PARAMS

PROMPT_LOOKUP, DRAFT = "prompt_lookup", "draft"
METHODS = ("", PROMPT_LOOKUP, DRAFT)


class SpeculationError(QwenLogicalError):
  """Speculative decoding that cannot run as asked."""


@dataclasses.dataclass(frozen=True)
class DraftModel:
  """The draft method's model: its partitioner (same mesh and vocabulary; any rule table) and params."""

  partitioner: Any
  params: Any


@dataclasses.dataclass(frozen=True)
class Speculation:
  """method: "" (off), "prompt_lookup" or "draft"; num_tokens: K drafted tokens per round; ngram:
  prompt lookup's match length; draft: the draft method's DraftModel."""

  method: str = ""
  num_tokens: int = 7
  ngram: int = 3
  draft: DraftModel | None = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    if self.method not in METHODS:
      raise SpeculationError(f"speculative.method={self.method!r} is not supported; use one of {METHODS} "
                             "('' turns speculative decoding off).")
    for name, low in (("num_tokens", 1), ("ngram", 1)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpeculationError(f"speculative.{name}={value!r} must be an integer >= {low}.")
    if (self.method == DRAFT) != (self.draft is not None):
      raise SpeculationError("speculative.method='draft' needs a draft model (speculative.draft_checkpoint), "
                             "and only that method takes one.")

  @property
  def on(self) -> bool:
    return bool(self.method)

  def check(self, partitioner) -> None:
    """Raises SpeculationError if the draft model cannot serve this target."""
    if self.draft is None:
      return
    draft = self.draft.partitioner
    same = list(draft.mesh.devices.flat) == list(partitioner.mesh.devices.flat)
    if not same or draft.mesh.shape != partitioner.mesh.shape:
      raise SpeculationError(f"the draft model runs on mesh {dict(draft.mesh.shape)} but the target on "
                             f"{dict(partitioner.mesh.shape)}; build both on the same mesh (their rule tables "
                             "may differ).")


class SpeculativePrograms(CachePrograms):
  """CachePrograms plus speculate[n] for one Speculation and one sampler kind (compiled in)."""

  def __init__(self, partitioner, rows: int, length: int, steps: int, kind: str | None, speculation: Speculation,
               processing: bool = False):
    if kind is None and speculation.draft is not None:
      raise SpeculationError("the draft method runs with one sampler kind per call (generate); a server "
                             "(every kind at once) drafts by prompt lookup.")
    speculation.check(partitioner)
    self.spec, k = speculation, speculation.num_tokens
    draft = speculation.draft.partitioner if speculation.draft else None
    multiple = math.lcm(slot_multiple(partitioner), slot_multiple(draft) if draft else 1)
    super().__init__(partitioner, rows, round_up(length + k + 1, multiple), steps, kind, processing)
    self.draft = None if draft is None else CachePrograms(draft, rows, self.length, steps, kind)

  @property
  def scratch(self) -> int:  # rows without a request feed K + 1 slots from here (the cache's spare slots)
    return self.length - self.spec.num_tokens - 1

  def speculate(self, rows: int):
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    state = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), RowState.empty(rows))
    specs = [self.partitioner.param_shapes, self._cache_specs(), state, spec((rows, self.length)), spec(()), spec(())]
    if self.draft is not None:
      specs += [self.draft.partitioner.param_shapes, self.draft._cache_specs()["kv"]]
    return self._get(("speculate", rows), lambda: self._speculate_program(rows), specs)

  def _speculate_program(self, rows: int):
    part, spec, length, steps = self.partitioner, self.spec, self.length, self.steps
    k, kind, width = spec.num_tokens, self.kind, self.steps * (spec.num_tokens + 1)
    ones = jnp.ones((rows, length), jnp.int32)
    at = jnp.arange(rows)[:, None]

    def target(params, cache, tokens, index):
      return part.model.apply({"params": params}, tokens, ones, mode=Mode.DECODE, cache=cache, cache_index=index)

    def check(params, cache, st, drafts, count):
      """f32 logits [n, K+1, V] of the target over [last token, drafts]; with prompt lookup, of the
      last token alone (padded) when no row drafted."""
      feed = jnp.concatenate([st.tokens[:, None], drafts], axis=1)
      full = lambda c: target(params, c, feed, st.index)
      if self.draft is not None:
        return full(cache)

      def single(c):
        logits, c = target(params, c, st.tokens[:, None], st.index)
        return jnp.pad(logits, ((0, 0), (0, k), (0, 0))), c

      # Each branch is a loop of 0 or 1 trips: a loop updates the cache in place, where lax.cond
      # copied it (2026-12-04, 0.5B shape, free text: 0.91x plain decode with lax.cond, 1.01x so).
      def once(run):
        def body(carry):
          logits, c = run(carry[1])
          return jnp.bool_(False), c, logits.astype(jnp.float32)
        return body

      drafted = jnp.any(count > 0)
      empty = jnp.zeros((rows, k + 1, part.config.vocab_size), jnp.float32)
      _, cache, logits = jax.lax.while_loop(lambda c: c[0], once(full), (drafted, cache, empty))
      _, cache, logits = jax.lax.while_loop(lambda c: c[0], once(single), (~drafted, cache, logits))
      return logits, cache

    def round_(params, dparams, kind_arg, carry):
      t, cache, dcache, st, history, out, made_total, stats = carry
      live = st.budget > 0
      keys = stream_keys(st.seeds, st.streams, st.steps)
      if self.draft is None:
        drafts, count = acc.lookup_drafts(history, st.index, k, spec.ngram)
        draft_probs = None
      else:
        drafts, draft_probs, dcache = self._draft_tokens(dparams, dcache, st, history, keys)
        count = jnp.full((rows,), k, jnp.int32)
      count = jnp.where(live, count, 0)
      logits, cache = check(params, cache, st, drafts, count)

      def accept(kind, logits):
        if kind == GREEDY:
          return acc.accept_greedy(logits, drafts, count)
        probs = acc.sampler_probs(logits, st.temperature, st.top_k, st.top_p, kind)
        return acc.accept_sampled(probs, drafts, count, draft_probs, keys)

      if kind is None:  # the kind a runtime value (serving): only its branch runs
        branches = [lambda l, name=name: accept(name, l) for name in KINDS]
        tokens, accepted = jax.lax.switch(kind_arg, branches, logits)
      else:
        tokens, accepted = accept(kind, logits)
      made, stopped = acc.finish(tokens, accepted + 1, st.budget, st.stops)
      j = jnp.arange(k + 1)[None]
      valid = j < made[:, None]
      out = out.at[at, jnp.where(valid, made_total[:, None] + j, width)].set(tokens, mode="drop")
      history = history.at[at, jnp.where(valid, st.index[:, None] + 1 + j, length)].set(tokens, mode="drop")
      last = jnp.take_along_axis(tokens, jnp.maximum(made - 1, 0)[:, None], axis=1)[:, 0]
      st = dataclasses.replace(st, tokens=jnp.where(made > 0, last, st.tokens), index=st.index + made,
                               steps=st.steps + made, budget=jnp.where(stopped, 0, st.budget - made))
      stats = stats + jnp.stack([live.astype(jnp.int32), count, jnp.minimum(accepted, made)], axis=1)
      return t + 1, cache, dcache, st, history, out, made_total + made, stats

    def speculate(params, cache, state, history, kind_arg, limit, dparams=None, dcache=None):
      carry = (jnp.int32(0), cache["kv"], dcache, state, history, jnp.full((rows, width), -1, jnp.int32),
               jnp.zeros((rows,), jnp.int32), jnp.zeros((rows, 3), jnp.int32))
      going = lambda c: (c[0] < jnp.minimum(steps, limit)) & jnp.any(c[3].budget > 0)
      _, kv, dcache, state, history, out, made, stats = jax.lax.while_loop(
          going, lambda c: round_(params, dparams, kind_arg, c), carry)
      results = ({"kv": kv, "seen": cache["seen"]}, state, history, out, made, stats)
      return results if self.draft is None else results + (dcache,)

    in_axes = [PARAMS, self.cache_axes, ROW, ROW, ROW, ROW]
    out_axes = [self.cache_axes, ROW, ROW, ROW, ROW, ROW]
    if self.draft is not None:
      draft = self.draft.partitioner
      in_axes += [draft.param_shardings, kv_cache.cache_shardings(draft, self.rows, length)]
      out_axes += [in_axes[-1]]
    name = f"speculate_{rows}x{steps}_{spec.method}{k}n{spec.ngram}_{kind or 'any'}"
    return part.program(speculate, in_axes=tuple(in_axes), out_axes=tuple(out_axes),
                        donate=(1,) if self.draft is None else (1, 7), name=name, keep=self.draft is None)

  def _draft_tokens(self, dparams, dcache, st: RowState, history, keys):
    """K tokens from the draft model, sampled as the target's sampler would from the draft's
    logits: (drafts i32[B, K], their distributions f32[B, K, V] (None for greedy), draft cache).

    The first step feeds the row's last two tokens (slots index - 1 and index): the draft cache
    then holds every accepted token, whichever round accepted it."""
    draft, k, vocab = self.draft.partitioner, self.spec.num_tokens, self.partitioner.config.vocab_size
    rows, kind = st.tokens.shape[0], self.kind
    ones = jnp.ones((rows, self.length), jnp.int32)

    def step(feed, index, cache, i):
      with draft.bound():
        logits, cache = draft.model.apply({"params": dparams}, feed, ones, mode=Mode.DECODE, cache=cache,
                                          cache_index=index)
      logits = logits[:, -1].astype(jnp.float32)[:, :vocab]  # the target's vocabulary only
      logits = jnp.pad(logits, ((0, 0), (0, vocab - logits.shape[1])), constant_values=-jnp.inf)
      if kind == GREEDY:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros((rows, 0), jnp.float32), cache
      probs = acc.sampler_probs(logits, st.temperature, st.top_k, st.top_p, kind)
      return acc.draw(probs, acc.fold(keys, acc.DRAFT_STREAM + i)), probs, cache

    previous = jnp.take_along_axis(history, (st.index - 1)[:, None], axis=1)
    token, probs, cache = step(jnp.concatenate([previous, st.tokens[:, None]], axis=1), st.index - 1, dcache, 0)
    drafts = jnp.zeros((rows, k), jnp.int32).at[:, 0].set(token)
    all_probs = jnp.zeros((rows, k) + probs.shape[1:], jnp.float32).at[:, 0].set(probs)

    def more(i, carry):
      drafts, all_probs, cache = carry
      token, probs, cache = step(jax.lax.dynamic_slice_in_dim(drafts, i - 1, 1, 1), st.index + i, cache, i)
      return drafts.at[:, i].set(token), all_probs.at[:, i].set(probs), cache

    drafts, all_probs, cache = jax.lax.fori_loop(1, k, more, (drafts, all_probs, cache))
    return drafts, (None if kind == GREEDY else all_probs), cache

  # --- running -------------------------------------------------------------------------------
  def run_speculate(self, params, cache, state: RowState, history, limit: int | None = None, draft_params=None,
                    draft_cache=None, kind: int = 0):
    """speculate[n] on a RowState of n rows and their history i32[n, S] (host or device arrays), the
    sampler `kind` (an index into sampling.KINDS; used when the programs' kind is None):
    (cache, state, history, tokens i32[n, steps*(K+1)] (-1 pad), made i32[n], stats i32[n, 3]
    (rounds, drafted, accepted)[, draft cache])."""
    program = self.speculate(len(state.budget))
    lift = lambda a: a if isinstance(a, jax.Array) else self.host(a)
    state = jax.tree_util.tree_map(lift, state)
    limit = self.steps if limit is None else min(int(limit), self.steps)
    args = [params, cache, state, lift(history), self.host(np.int32(kind)), self.host(np.int32(limit))]
    if self.draft is not None:
      args += [draft_params, draft_cache]
    return program(*args)


def record_prompts(history: np.ndarray, rows, prompts, first) -> None:
  """Starts each row's token history i32[R, S] (what prompt lookup reads): its prompt's ids at slots
  [0, n), its first new token at slot n; rows >= R (padding) are skipped."""
  for row, ids, token in zip(rows, prompts, first):
    if row < history.shape[0]:
      history[row, :len(ids)] = ids
      history[row, len(ids)] = token


def speculative_steps(programs: SpeculativePrograms, params, cache, plan, state: RowState,
                      lengths: np.ndarray, timings: Timings, decode_start: float) -> Iterator[np.ndarray]:
  """`Generator._steps` after prefill, in speculative rounds: each dispatch gives each row its own
  count of tokens; their columns are yielded in order (-1 where a row has fewer)."""
  history = np.zeros((plan.batch, programs.length), np.int32)
  record_prompts(history, range(plan.real), plan.ids, state.tokens)
  extra, draft_cache = [], None
  if programs.draft is not None:
    draft = programs.spec.draft
    prefilled, _ = programs.draft.run_prefill(
        draft.params, programs.draft.new_cache(), plan.tokens, lengths, np.arange(plan.batch, dtype=np.int32),
        state.seeds, state.streams, state.temperature, state.top_k, state.top_p, 0)
    draft_cache = prefilled["kv"]  # the draft samples by itself: occurrences unused
    extra = [draft.params]
  made_rows = np.zeros(plan.batch, np.int64)
  ahead = programs.run_speculate(params, cache, state, history, None, *extra, draft_cache)
  while ahead is not None:
    cache, state, history, tokens, made, stats, *rest = ahead
    ahead = None
    if not np.all(made_rows[:plan.real] >= plan.max_new_tokens - 1):
      ahead = programs.run_speculate(params, cache, state, history, None, *extra, *rest)
    tokens, made, stats = local(tokens), local(made), local(stats)
    made_rows += made
    timings.dispatches += 1
    timings.add_rounds(stats[:plan.real])
    for j in range(int(made.max(initial=0))):
      timings.decode_steps += 1
      timings.decode_s = time.perf_counter() - decode_start
      yield tokens[:, j]
    if not made.any():
      return
