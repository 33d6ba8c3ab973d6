"""The compiled programs of inference, one set for `generate` and the serving engine: a KV cache of
R rows x S slots, prompts prefilled into rows, and decode loops that run on the device.

Each running sequence owns one cache row: its prompt fills slots [0, n) (moved there from its
left-padded prefill), and its next token goes to slot `index` at position `index`, so attention
needs no mask beyond the causal rule. Per-row state (`RowState`) comes in with each call.

* new_cache() -> cache: zeros, sharded by the rule table's cache_* names (`kv_cache`).
* prefill[b, P](params, cache, tokens int[b, P] left-padded, lengths, rows, seeds, streams,
    temperature, top_k, top_p [b], kind i32[]) -> (cache, first int[b]): runs the prompts
    (Mode.PREFILL), draws each one's first token (step 0) and writes its keys/values into cache
    row rows[i] at slots [0, lengths[i]); a row >= R (padding) writes nothing.
* decode[n](params, cache, RowState of n rows, kind i32[], limit i32[]) -> (cache, RowState,
    tokens int[n, K], produced int[n]): up to min(K, limit) decode steps in one dispatch
    (`lax.while_loop`; K = `steps`, compiled; limit a runtime value <= K) over cache
    rows [0, n): each step feeds every live row's token at its slot, draws the next one with key
    (seed, stream, step) (`sampling.stream_keys`) and ends a row on one of its stop ids or when its
    budget runs out; the loop ends after K steps or when no row is live. tokens[r, :produced[r]]
    are row r's new tokens (-1 after). The returned state continues where this one stopped, so the
    next dispatch can be queued before this one's tokens are read.
The sampler kind (`sampling.KINDS`: greedy, sample, filtered) is a runtime value, so one program
serves every mix of settings. Programs compile on first use or in `warmup`; the cache is donated.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import threading
import time

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_logical.inference import kv_cache
from qwen_logical.inference.batch_plan import CACHE_GRANULE, STOP_SLOTS, round_up
from qwen_logical.inference.sampling import sample_by_kind, sample_rows, stream_keys
from qwen_logical.model import axes as ax
from qwen_logical.model.model import Mode
from qwen_logical.sharding import distributed
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.programs import COUNTS, PARAMS, REPLICATED

ROW = REPLICATED  # per-row host state is small: every device holds all of it


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowState:
  """What each of n rows decodes next (host numpy or device arrays, all [n] but stops [n, T])."""

  tokens: np.ndarray  # i32: the token to feed next
  index: np.ndarray  # i32: its slot and position (the row holds tokens at slots [0, index))
  seeds: np.ndarray  # u32
  streams: np.ndarray  # i32: the key stream within the seed (generate: the batch row; serving: 0)
  steps: np.ndarray  # i32: tokens drawn so far (the next draw's step)
  budget: np.ndarray  # i32: tokens the row may still draw (0: not running)
  temperature: np.ndarray  # f32
  top_k: np.ndarray  # i32
  top_p: np.ndarray  # f32
  stops: np.ndarray  # i32[n, T]: ids that end the row (-1 pads)

  @classmethod
  def empty(cls, rows: int, stop_slots: int = STOP_SLOTS) -> "RowState":
    zeros = lambda dtype: np.zeros(rows, dtype)
    return cls(zeros(np.int32), zeros(np.int32), zeros(np.uint32), zeros(np.int32), zeros(np.int32),
               zeros(np.int32), zeros(np.float32), zeros(np.int32), np.ones(rows, np.float32),
               np.full((rows, stop_slots), -1, np.int32))

  def head(self, rows: int) -> "RowState":
    """Copies of rows [0, rows)."""
    return jax.tree_util.tree_map(lambda a: np.array(a[:rows]), self)


def default_decode_steps(platform: str | None = None) -> int:
  """Decode steps per dispatch (K) for a platform: on an accelerator the host's per-dispatch work
  would leave a small model's device idle, so K is large; on CPU a step takes milliseconds and K
  only sets how often tokens stream out."""
  return 8 if (platform or jax.default_backend()) == "cpu" else 32


def _shards(partitioner: Partitioner, name: str) -> int:
  return math.prod(partitioner.mesh_shape[a] for a in partitioner.table.mesh_axes(name))


def batch_multiple(partitioner: Partitioner) -> int:
  """Row counts of a call are a multiple of this: what splits the token rows and the cache rows."""
  return math.lcm(*(_shards(partitioner, n) for n in (ax.ACTIVATION_BATCH, ax.CACHE_BATCH)))


def slot_multiple(partitioner: Partitioner) -> int:
  """Cache slot counts are a multiple of this: the granule and what splits the sequence axes."""
  return math.lcm(CACHE_GRANULE, *(_shards(partitioner, n) for n in (ax.CACHE_SEQUENCE, ax.ACTIVATION_LENGTH)))


def row_count(count: int, multiple: int, limit: int | None = None, growth: int = 2) -> int:
  """Rows of a call that covers `count` rows: a power of `growth`, a multiple of `multiple`, at most `limit`."""
  rows = 1
  while rows < count:
    rows *= growth
  rows = round_up(rows, multiple)
  return rows if limit is None else min(rows, limit)


class CachePrograms:
  """The programs of one Partitioner for a cache of `rows` rows and `length` slots.

  length: rounded up to `slot_multiple`; steps: decode steps per dispatch (K); kind: None (the
  sampler kind a runtime value: one program serves every kind, as the server needs) or one kind
  compiled in (the `kind` argument then unused: a call of one setting compiles a smaller program).
  """

  def __init__(self, partitioner: Partitioner, rows: int, length: int, steps: int, kind: str | None = None):
    if steps < 1:
      raise ValueError(f"decode steps per dispatch must be >= 1, got {steps}")
    self.partitioner, self.rows, self.steps = partitioner, rows, int(steps)
    self.kind = kind
    self.length = round_up(length, slot_multiple(partitioner))
    self.batch_multiple = batch_multiple(partitioner)
    kv_cache.check_cache(partitioner, rows, self.length)
    self.cache_axes = kv_cache.cache_logical_axes(partitioner.config)
    self._programs: dict[tuple, object] = {}
    self._lock = threading.Lock()
    self.compilations = 0  # programs compiled (or loaded from the persistent cache) by this object

  # --- programs ----------------------------------------------------------------------------
  def _get(self, key: tuple, make, specs):
    program = self._programs.get(key)
    if program is None:
      program = make().compile(*specs)  # outside the lock: warm-up compiles several at once
      with self._lock:
        if key not in self._programs:
          self._programs[key] = program
          self.compilations += 1
        program = self._programs[key]
    return program

  def cache_program(self):
    return self._get(("cache",), self._cache_program, ())

  def new_cache(self):
    """A zero cache on the mesh (every process calls this together)."""
    return self.cache_program()()

  def prefill(self, batch: int, bucket: int):
    self.partitioner.check_batch(batch, bucket, flag="the prefill rows")
    specs = (self.partitioner.param_shapes, self._cache_specs(), _spec((batch, bucket), jnp.int32),
             *(_spec((batch,), d) for d in _PREFILL_DTYPES), _spec((), jnp.int32))
    return self._get(("prefill", batch, bucket), lambda: self._prefill_program(batch, bucket), specs)

  def decode(self, rows: int):
    state = jax.tree_util.tree_map(lambda a: _spec(a.shape, a.dtype), RowState.empty(rows))
    specs = (self.partitioner.param_shapes, self._cache_specs(), state, _spec((), jnp.int32), _spec((), jnp.int32))
    return self._get(("decode", rows), lambda: self._decode_program(rows), specs)

  def _cache_specs(self):
    return kv_cache.cache_shapes(self.partitioner.config, self.partitioner.layout, self.rows, self.length)

  def _sample(self, logits, keys, temperature, top_k, top_p, kind):
    if self.kind is None:
      return sample_by_kind(logits, keys, temperature, top_k, top_p, kind)
    return sample_rows(logits, keys, temperature, top_k, top_p, self.kind)

  def _cache_program(self):
    part = self.partitioner
    return part.program(lambda: kv_cache.zeros_in_jit(part, self.rows, self.length), in_axes=(),
                        out_axes=self.cache_axes, name=f"new_cache_{self.rows}x{self.length}", keep=True)

  def _prefill_program(self, batch: int, bucket: int):
    part = self.partitioner

    def prefill(params, cache, tokens, lengths, rows, seeds, streams, temperature, top_k, top_p, kind):
      mask = (jnp.arange(bucket)[None, :] >= bucket - lengths[:, None]).astype(jnp.int32)
      small = kv_cache.zeros_in_jit(part, batch, bucket)
      logits, small = part.model.apply({"params": params}, tokens, mask, mode=Mode.PREFILL, cache=small,
                                       last_token_only=True)
      keys = stream_keys(seeds, streams, jnp.zeros_like(lengths))
      first = self._sample(logits[:, -1], keys, temperature, top_k, top_p, kind)
      cache = jax.tree_util.tree_map(lambda big, new, names: _insert(big, new, lengths, rows, names), cache, small,
                                     self.cache_axes)
      return cache, first

    return part.program(prefill, in_axes=(PARAMS, self.cache_axes, ax.TOKENS) + (ROW,) * 8,
                        out_axes=(self.cache_axes, ROW), donate=(1,), name=f"prefill_{batch}x{bucket}_{self.kind or 'any'}", keep=True)

  def _decode_program(self, rows: int):
    part, length, steps = self.partitioner, self.length, self.steps

    def step(params, carry, kind):
      t, cache, st, out = carry
      live = st.budget > 0
      mask = jnp.ones((rows, length), jnp.int32)  # the causal rule alone: rows fill slots [0, index]
      logits, cache = part.model.apply({"params": params}, st.tokens[:, None], mask, st.index[:, None],
                                       mode=Mode.DECODE, cache=cache, cache_index=st.index)
      new = self._sample(logits[:, 0], stream_keys(st.seeds, st.streams, st.steps), st.temperature, st.top_k,
                           st.top_p, kind)
      out = out.at[:, t].set(jnp.where(live, new, -1))
      stopped = jnp.any(new[:, None] == st.stops, axis=1)
      advance = live.astype(jnp.int32)
      st = dataclasses.replace(st, tokens=jnp.where(live, new, st.tokens), index=st.index + advance,
                               steps=st.steps + advance, budget=jnp.where(live & ~stopped, st.budget - 1, 0))
      return t + 1, cache, st, out

    def decode(params, cache, state, kind, limit):
      out = jnp.full((rows, steps), -1, jnp.int32)
      going = lambda carry: (carry[0] < jnp.minimum(steps, limit)) & jnp.any(carry[2].budget > 0)
      _, cache, state, out = jax.lax.while_loop(going, lambda c: step(params, c, kind), (jnp.int32(0), cache, state, out))
      return cache, state, out, jnp.sum(out >= 0, axis=1, dtype=jnp.int32)

    return part.program(decode, in_axes=(PARAMS, self.cache_axes, ROW, ROW, ROW),
                        out_axes=(self.cache_axes, ROW, ROW, ROW), donate=(1,), name=f"decode_{rows}x{steps}_{self.kind or 'any'}",
                        keep=True)

  # --- running -------------------------------------------------------------------------------
  def run_prefill(self, params, cache, tokens: np.ndarray, lengths, rows, seeds, streams, temperature, top_k,
                  top_p, kind: int):
    """prefill[b, P] on host arrays; (new cache, first tokens on the device)."""
    part = self.partitioner
    program = self.prefill(*tokens.shape)
    args = [distributed.global_array(np.asarray(tokens, np.int32), part.sharding(ax.TOKENS))]
    args += [self.host(a) for a in (lengths, rows, seeds, streams, temperature, top_k, top_p)]
    return program(params, cache, *args, self.host(np.int32(kind)))

  def run_decode(self, params, cache, state: RowState, kind: int, limit: int | None = None):
    """decode[n] on a RowState of n rows (host or device arrays), at most `limit` steps (default K):
    (cache, state, tokens, produced)."""
    program = self.decode(len(state.budget))
    state = jax.tree_util.tree_map(lambda a: a if isinstance(a, jax.Array) else self.host(a), state)
    limit = self.steps if limit is None else min(int(limit), self.steps)
    return program(params, cache, state, self.host(np.int32(kind)), self.host(np.int32(limit)))

  def host(self, array) -> jax.Array:
    """A host array replicated on the mesh (every process passes the same values)."""
    return distributed.global_array(np.asarray(array), self.partitioner.sharding(REPLICATED))

  def warmup(self, builds, threads: int | None = None) -> int:
    """Makes the programs `builds` (callables) name, `threads` at a time (default: the host's
    cores; tracing holds Python's lock, XLA's compilation does not, so one program's compilation
    overlaps the next one's tracing), logging each; returns how many were made now."""
    before, start, xla = self.compilations, time.perf_counter(), COUNTS.snapshot()
    with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
      futures = [pool.submit(build) for build in builds]
      for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
        future.result()  # a line per program: each can take seconds
        logging.info("Programs ready: %d/%d, %.0f s", done, len(builds), time.perf_counter() - start)
    compiled, loaded = (now - then for now, then in zip(COUNTS.snapshot(), xla))
    logging.info("Warm-up: %d programs ready in %.1f s (XLA: %d compiled, %d loaded from the compilation "
                 "cache)", len(builds), time.perf_counter() - start, compiled, loaded)
    return self.compilations - before


_PREFILL_DTYPES = (jnp.int32, jnp.int32, jnp.uint32, jnp.int32, jnp.float32, jnp.int32, jnp.float32)


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


def local(array: jax.Array) -> np.ndarray:
  """A replicated global array's value, read from this process's own copy (no collective)."""
  return np.asarray(array.addressable_data(0))


def _insert(big: jax.Array, small: jax.Array, lengths: jax.Array, rows: jax.Array, names) -> jax.Array:
  """Writes prefill row i's keys/values (small [.., b, K, P, ...], its prompt at [P - lengths[i], P))
  into big [.., R, K, S, ...] row rows[i] at slots [0, lengths[i]); other rows keep theirs. The axes
  come from the logical `names` (keys/values and an int8 cache's scales alike)."""
  batch_axis, slot_axis = names.index(ax.CACHE_BATCH), names.index(ax.CACHE_SEQUENCE)
  n, bucket = big.shape[batch_axis], small.shape[slot_axis]
  match = rows[None, :] == jnp.arange(n)[:, None]  # [R, b]
  source = jnp.argmax(match, axis=1)  # the prefill row each cache row takes (if any)

  def shape(**sizes):  # broadcast [R] or [R, P] over the other axes
    return tuple(sizes.get({batch_axis: "rows", slot_axis: "slots"}.get(a, ""), 1) for a in range(big.ndim))

  moved = jnp.take(small, source, axis=batch_axis)  # [.., R, K, P, ...]
  start = bucket - jnp.take(lengths, source)  # each row's left padding
  slots = jnp.minimum(jnp.arange(bucket)[None, :] + start[:, None], bucket - 1)  # [R, P]
  moved = jnp.take_along_axis(moved, slots.reshape(shape(rows=n, slots=bucket)), axis=slot_axis)
  head = jax.lax.slice_in_dim(big, 0, bucket, axis=slot_axis)
  head = jnp.where(match.any(axis=1).reshape(shape(rows=n)), moved.astype(big.dtype), head)
  big = jax.lax.dynamic_update_slice_in_dim(big, head, 0, axis=slot_axis)
  return nn.with_logical_constraint(big, names)
