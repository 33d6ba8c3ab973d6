"""The compiled programs of inference, one set for `generate` and the serving engine: a KV cache of
R rows x S slots, prompts prefilled into rows, and decode loops that run on the device.

Each running sequence owns one cache row: its prompt fills slots [0, n) (moved there from its
left-padded prefill), and its next token goes to slot `index` at position `index`, so attention
needs no mask beyond the causal rule. Per-row state (`RowState`) comes in with each call.

* new_cache() -> cache {"kv": zeros sharded by the rule table's cache_* names (`kv_cache`),
    "seen": token occurrences i32[R, V] (`logit_processing`)}.
* prefill[b, P](params, cache, tokens int[b, P] left-padded, lengths, rows, seeds, streams,
    temperature, top_k, top_p [b], stops i32[b, T], RowExtras of b rows, kind i32[]) -> (cache,
    Drawn [b]): runs the prompts (Mode.PREFILL), draws each one's first token (step 0) and writes
    its keys/values into cache row rows[i] at slots [0, lengths[i]); a row >= R (padding) writes
    nothing. The echo variant also returns each prompt token's log-probability (Drawn [b, P]).
* extend[b, P](same arguments, tokens i32[b, S] the whole prompts left-padded to the slots, `starts`
    in place of lengths): a prompt whose first tokens' keys are in its row already (a cached prefix)
    runs its last P tokens at slots [starts, starts + P).
* copy(cache, src, dst): row dst's keys and values become row src's (a shared prefix).
* decode[n](params, cache, RowState of n rows, RowExtras, kind i32[], limit i32[]) -> (cache,
    RowState, Drawn [n, K], produced int[n]): up to min(K, limit) decode steps in one dispatch
    (`lax.while_loop`; K = `steps`, compiled; limit a runtime value <= K) over cache
    rows [0, n): each step feeds every live row's token at its slot, draws the next one with key
    (seed, stream, step) (`sampling.stream_keys`) and ends a row on one of its stop ids or when its
    budget runs out; the loop ends after K steps or when no row is live. tokens[r, :produced[r]]
    are row r's new tokens (-1 after). The returned state continues where this one stopped, so the
    next dispatch can be queued before this one's tokens are read. A row's grammar mask applies to
    the dispatch's first step only (a constrained row runs one step per dispatch).
The sampler kind (`sampling.KINDS`: greedy, sample, filtered) is a runtime value, so one program
serves every mix of settings; so are every request's logit processing settings (`RowExtras`).
Programs compile on first use or in `warmup`; the cache is donated.
"""

from __future__ import annotations

import concurrent.futures
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
from qwen_logical.inference import program_bodies as bodies
from qwen_logical.inference.batch_plan import CACHE_GRANULE, round_up
from qwen_logical.inference.logit_processing import RowExtras
from qwen_logical.inference.row_state import RowState
from qwen_logical.inference.sampling import sample_by_kind, sample_rows
from qwen_logical.model import axes as ax
from qwen_logical.sharding import distributed
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.programs import COUNTS, PARAMS, REPLICATED

ROW = REPLICATED  # per-row host state is small: every device holds all of it


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
  compiled in (the `kind` argument then unused: a call of one setting compiles a smaller program);
  processing: whether draws apply the rows' logit processing and report log-probabilities (the
  server's programs); without it the RowExtras are ignored and the programs compile faster.
  """

  def __init__(self, partitioner: Partitioner, rows: int, length: int, steps: int, kind: str | None = None,
               processing: bool = False):
    if steps < 1:
      raise ValueError(f"decode steps per dispatch must be >= 1, got {steps}")
    self.partitioner, self.rows, self.steps = partitioner, rows, int(steps)
    self.kind, self.processing = kind, bool(processing)
    self.length = round_up(length, slot_multiple(partitioner))
    self.batch_multiple = batch_multiple(partitioner)
    self.vocab_size = partitioner.config.vocab_size
    kv_cache.check_cache(partitioner, rows, self.length)
    self.cache_axes = {"kv": kv_cache.cache_logical_axes(partitioner.config), "seen": REPLICATED}
    self._programs: dict[tuple, object] = {}
    self._lock = threading.Lock()
    self.compilations = 0  # programs compiled (or loaded from the persistent cache) by this object

  @property
  def scratch(self) -> int:
    """The slot rows without a request feed: their writes land past every token a row holds."""
    return self.length - 1

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

  def prefill(self, batch: int, bucket: int, echo: bool = False):
    self.partitioner.check_batch(batch, bucket, flag="the prefill rows")
    name = f"prefill{'_echo' if echo else ''}_{batch}x{bucket}_{self._tag}"
    return self._get(("prefill", batch, bucket, echo), lambda: self._rows_program(
        bodies.prefill(self, batch, bucket, echo), name, 3 if echo else 2), self._prefill_specs(batch, bucket))

  def extend(self, batch: int, bucket: int):
    """extend[b, P] (`program_bodies.extend`): P prompt tokens per row after a cached prefix (the
    whole prompts come in, left-padded to the cache's slots)."""
    self.partitioner.check_batch(batch, bucket, flag="the prefill rows")
    name = f"extend_{batch}x{bucket}_{self._tag}"
    return self._get(("extend", batch, bucket), lambda: self._rows_program(bodies.extend(self, batch, bucket), name, 2),
                     self._prefill_specs(batch, self.length))

  def copy(self):
    """copy(cache, src, dst): cache row dst's keys and values become row src's."""
    make = lambda: self.partitioner.program(bodies.copy_row(self), in_axes=(self.cache_axes, ROW, ROW),
                                            out_axes=self.cache_axes, donate=(0,), name="copy_row", keep=True)
    return self._get(("copy",), make, (self._cache_specs(), _spec((), jnp.int32), _spec((), jnp.int32)))

  def decode(self, rows: int):
    state = _specs_of(RowState.empty(rows))
    extras = _specs_of(RowExtras.empty(rows, self.vocab_size))
    specs = (self.partitioner.param_shapes, self._cache_specs(), state, extras, _spec((), jnp.int32),
             _spec((), jnp.int32))
    make = lambda: self.partitioner.program(
        bodies.decode(self, rows), in_axes=(PARAMS, self.cache_axes, ROW, ROW, ROW, ROW),
        out_axes=(self.cache_axes, ROW, ROW, ROW), donate=(1,), name=f"decode_{rows}x{self.steps}_{self._tag}",
        keep=True)
    return self._get(("decode", rows), make, specs)

  @property
  def _tag(self) -> str:
    """The sampler kind and processing in a program's name."""
    return (self.kind or "any") + ("_processing" if self.processing else "")

  def _prefill_specs(self, batch: int, bucket: int):
    stops = RowState.empty(batch).stops
    return (self.partitioner.param_shapes, self._cache_specs(), _spec((batch, bucket), jnp.int32),
            *(_spec((batch,), d) for d in _PREFILL_DTYPES), _spec(stops.shape, jnp.int32),
            _specs_of(RowExtras.empty(batch, self.vocab_size)), _spec((), jnp.int32))

  def _rows_program(self, fn, name: str, outputs: int):
    return self.partitioner.program(fn, in_axes=(PARAMS, self.cache_axes, ax.TOKENS) + (ROW,) * 10,
                                    out_axes=(self.cache_axes,) + (ROW,) * (outputs - 1), donate=(1,), name=name,
                                    keep=True)

  def _cache_specs(self):
    kv = kv_cache.cache_shapes(self.partitioner.config, self.partitioner.layout, self.rows, self.length)
    return {"kv": kv, "seen": _spec((self.rows, self.vocab_size), jnp.int32)}

  def sample(self, logits, keys, temperature, top_k, top_p, kind):
    if self.kind is None:
      return sample_by_kind(logits, keys, temperature, top_k, top_p, kind)
    return sample_rows(logits, keys, temperature, top_k, top_p, self.kind)

  def _cache_program(self):
    part = self.partitioner

    def zeros():
      seen = nn.with_logical_constraint(jnp.zeros((self.rows, self.vocab_size), jnp.int32), REPLICATED)
      return {"kv": kv_cache.zeros_in_jit(part, self.rows, self.length), "seen": seen}

    return part.program(zeros, in_axes=(), out_axes=self.cache_axes, name=f"new_cache_{self.rows}x{self.length}",
                        keep=True)

  # --- running -------------------------------------------------------------------------------
  def run_prefill(self, params, cache, tokens: np.ndarray, lengths, rows, seeds, streams, temperature, top_k,
                  top_p, kind: int, stops=None, extras: RowExtras | None = None, echo: bool = False):
    """prefill[b, P] on host arrays: (new cache, Drawn of [b] on the device[, the prompts' Drawn [b, P]
    with echo]). stops default to none, extras to no processing."""
    program = self.prefill(*tokens.shape, echo=echo)
    return program(params, cache, *self._row_args(tokens, (lengths, rows, seeds, streams, temperature, top_k, top_p),
                                                  stops, extras), self.host(np.int32(kind)))

  def run_extend(self, params, cache, tokens: np.ndarray, starts, rows, seeds, streams, temperature, top_k, top_p,
                 kind: int, stops=None, extras: RowExtras | None = None, bucket: int = 16):
    """extend[b, P = bucket] on host arrays (tokens i32[b, S]: the whole prompts, left-padded): (new
    cache, Drawn of [b] on the device)."""
    program = self.extend(tokens.shape[0], bucket)
    return program(params, cache, *self._row_args(tokens, (starts, rows, seeds, streams, temperature, top_k, top_p),
                                                  stops, extras), self.host(np.int32(kind)))

  def run_copy(self, cache, src: int, dst: int):
    return self.copy()(cache, self.host(np.int32(src)), self.host(np.int32(dst)))

  def _row_args(self, tokens, fields, stops, extras):
    b = tokens.shape[0]
    stops = RowState.empty(b).stops if stops is None else stops
    extras = RowExtras.empty(b, self.vocab_size) if extras is None else extras
    args = [distributed.global_array(np.asarray(tokens, np.int32), self.partitioner.sharding(ax.TOKENS))]
    return args + [self.host(a) for a in fields] + [self.host(stops), jax.tree_util.tree_map(self.host, extras)]

  def run_decode(self, params, cache, state: RowState, kind: int, limit: int | None = None,
                 extras: RowExtras | None = None):
    """decode[n] on a RowState of n rows (host or device arrays), at most `limit` steps (default K):
    (cache, state, Drawn of [n, K] (tokens -1 past each row's end), produced i32[n])."""
    n = len(state.budget)
    program = self.decode(n)
    lift = lambda a: a if isinstance(a, jax.Array) else self.host(a)
    state = jax.tree_util.tree_map(lift, state)
    extras = jax.tree_util.tree_map(lift, RowExtras.empty(n, self.vocab_size) if extras is None else extras)
    limit = self.steps if limit is None else min(int(limit), self.steps)
    return program(params, cache, state, extras, self.host(np.int32(kind)), self.host(np.int32(limit)))

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


def _specs_of(tree):
  return jax.tree_util.tree_map(lambda a: _spec(a.shape, a.dtype), tree)


def local(array: jax.Array) -> np.ndarray:
  """A replicated global array's value, read from this process's own copy (no collective)."""
  return np.asarray(array.addressable_data(0))
