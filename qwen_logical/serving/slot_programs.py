"""The compiled programs of the serving engine: one KV cache of N slots (rows) x S cache slots.

Every request owns one cache row while it runs; its tokens fill slots [0, index] of that row
(prompts are moved to slot 0 when inserted), so each row's slot mask is the causal one and its
next token's position is its index. Per-row state lives on the host and comes in with each call;
only the cache stays on the device, donated to every program that writes it.

* new_cache() -> cache: zeros, sharded by the rule table's cache_* names (`kv_cache`).
* prefill[b, P](params, cache, tokens int[b, P], lengths int[b], rows int[b], seeds u32[b],
    temperature f32[b], top_k i32[b], top_p f32[b]) -> (cache, first int[b]):
    runs b left-padded prompts of bucket P through the model (Mode.PREFILL, a cache of P slots
    made inside), samples each one's first token (step 0, the FILTERED kind) and writes its
    keys/values into cache row rows[i] at slots [0, lengths[i]); a row >= N (padding) writes nothing.
* decode[kind, n](params, cache, tokens int[n], index int[n], seeds u32[n], steps int[n],
    temperature f32[n], top_k i32[n], top_p f32[n]) -> (cache, next int[n]):
    feeds the token of each of cache rows [0, n) at its own slot `index` (Mode.DECODE,
    cache_index int[n], the model reading and writing those rows of the whole cache in place) and
    samples its next token with key (seed, step) (`sampling.request_keys`); kind GREEDY, SAMPLE
    or FILTERED; n a power of two, a multiple of batch_multiple (or N), covering the running rows.

Programs compile on first use (or in `warmup`), once per prefill (b, P) and decode (kind, n);
`compilations` counts them. Tokens come back replicated, so every process reads them locally.
"""

from __future__ import annotations

import collections

import time

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qwen_logical.inference import kv_cache
from qwen_logical.inference.batch_plan import prompt_bucket, round_up
from qwen_logical.inference.programs import batch_multiple, slot_multiple
from qwen_logical.inference.sampling import FILTERED, GREEDY, SAMPLE, request_keys, sample_rows
from qwen_logical.model import axes as ax
from qwen_logical.model.model import Mode
from qwen_logical.sharding import distributed
from qwen_logical.sharding.partitioner import Partitioner

DECODE_KINDS = (GREEDY, SAMPLE, FILTERED)


class SlotPrograms:
  """The engine's programs for `rows` cache rows of `length` slots (a multiple of `slot_multiple`)."""

  def __init__(self, partitioner: Partitioner, rows: int, context: int):
    self.partitioner = partitioner
    self.rows = rows
    self.length = round_up(context, slot_multiple(partitioner))
    self.batch_multiple = batch_multiple(partitioner)
    kv_cache.check_cache(partitioner, rows, self.length)
    self.cache_shardings = kv_cache.cache_shardings(partitioner, rows, self.length)
    self._compiled: dict[tuple, object] = {}
    self.compilations = 0
    self.decode_runs = collections.Counter()  # decode steps run per (kind, n)

  # --- shapes ------------------------------------------------------------------------------
  def bucket(self, prompt_length: int) -> int:
    """The prompt bucket P of a prompt: 16, 32, ... (batch_plan.prompt_bucket), at most S."""
    return min(prompt_bucket(prompt_length), self.length)

  def buckets(self, context: int) -> list[int]:
    """Every bucket a prompt of 1 .. context - 1 tokens can get."""
    found, length = [], 1
    while length < context:
      found.append(self.bucket(length))
      length = found[-1] + 1
    return found

  def prefill_batch(self, count: int) -> int:
    """Rows of the prefill that inserts `count` requests: a power of two, a multiple of batch_multiple."""
    return round_up(1 << (count - 1).bit_length(), self.batch_multiple)

  def prefill_batches(self) -> list[int]:
    return sorted({self.prefill_batch(n) for n in range(1, self.rows + 1)})

  def decode_rows(self, count: int) -> int:
    """Rows n of the decode step whose highest running row is count - 1: the prefill batch rule
    (a power of two, a multiple of batch_multiple), at most N."""
    return min(self.prefill_batch(count), self.rows)

  def decode_sizes(self) -> list[int]:
    return sorted({self.decode_rows(n) for n in range(1, self.rows + 1)})

  @property
  def max_prefill_batch(self) -> int:
    return self.prefill_batch(self.rows)

  # --- programs ------------------------------------------------------------------------------
  def _get(self, key: tuple, lower):
    if key not in self._compiled:
      self._compiled[key] = lower().compile()
      self.compilations += 1
    return self._compiled[key]

  def new_cache(self):
    """A zero cache on the mesh (all processes call this together)."""
    return self._get(("cache",), self._lower_cache)()

  def prefill(self, batch: int, bucket: int):
    return self._get(("prefill", batch, bucket), lambda: self._lower_prefill(batch, bucket))

  def decode(self, kind: str, rows: int):
    return self._get(("decode", kind, rows), lambda: self._lower_decode(kind, rows))

  def warmup(self, context: int) -> int:
    """Compiles every program the engine can need; returns how many compiled now."""
    before = self.compilations
    builds = [lambda k=kind, n=rows: self.decode(k, n) for kind in DECODE_KINDS for rows in self.decode_sizes()]
    builds += [lambda b=batch, p=bucket: self.prefill(b, p) for bucket in self.buckets(context)
               for batch in self.prefill_batches()]
    builds.append(lambda: self._get(("cache",), self._lower_cache))
    start = time.perf_counter()
    for done, build in enumerate(builds, 1):  # a line per program: each can take many seconds
      build()
      logging.info("Serving programs compiled: %d/%d, %.0f s", done, len(builds), time.perf_counter() - start)
    return self.compilations - before

  def _replicated(self) -> NamedSharding:
    return NamedSharding(self.partitioner.mesh, PartitionSpec())

  def _lower_cache(self):
    part = self.partitioner

    def zeros():
      with part.bound():
        return kv_cache.zeros_in_jit(part, self.rows, self.length)

    return jax.jit(zeros, out_shardings=self.cache_shardings).lower()

  def _lower_prefill(self, batch: int, bucket: int):
    part = self.partitioner
    part.check_batch(batch, bucket, flag="slots")

    def prefill(params, cache, tokens, lengths, rows, seeds, temperature, top_k, top_p):
      with part.bound():
        mask = (jnp.arange(bucket)[None, :] >= bucket - lengths[:, None]).astype(jnp.int32)
        small = kv_cache.zeros_in_jit(part, batch, bucket)
        logits, small = part.model.apply({"params": params}, tokens, mask, mode=Mode.PREFILL, cache=small,
                                         last_token_only=True)
        first = sample_rows(logits[:, -1], request_keys(seeds, jnp.zeros_like(lengths)), temperature, top_k,
                            top_p, FILTERED)
        cache = jax.tree_util.tree_map(lambda big, new, names: _insert(big, new, lengths, rows, names), cache,
                                       small, kv_cache.cache_logical_axes(part.config))
        return cache, first

    rep = self._replicated()
    fn = jax.jit(prefill, in_shardings=(part.param_shardings, self.cache_shardings, part.sharding(ax.TOKENS))
                 + (rep,) * 6, out_shardings=(self.cache_shardings, rep), donate_argnums=(1,))
    return fn.lower(part.param_shapes, self._cache_specs(), _spec((batch, bucket), jnp.int32),
                    *_row_specs(batch, (jnp.int32, jnp.int32, jnp.uint32, jnp.float32, jnp.int32, jnp.float32)))

  def _lower_decode(self, kind: str, rows: int):
    part, length = self.partitioner, self.length

    def decode(params, cache, tokens, index, seeds, steps, temperature, top_k, top_p):
      with part.bound():
        mask = jnp.ones((rows, length), jnp.int32)  # the causal rule alone: rows fill slots [0, index]
        logits, cache = part.model.apply({"params": params}, tokens[:, None], mask, index[:, None],
                                         mode=Mode.DECODE, cache=cache, cache_index=index)
        new = sample_rows(logits[:, 0], request_keys(seeds, steps), temperature, top_k, top_p, kind)
        return cache, new

    rep = self._replicated()
    fn = jax.jit(decode, in_shardings=(part.param_shardings, self.cache_shardings) + (rep,) * 7,
                 out_shardings=(self.cache_shardings, rep), donate_argnums=(1,))
    return fn.lower(part.param_shapes, self._cache_specs(),
                    *_row_specs(rows, (jnp.int32, jnp.int32, jnp.uint32, jnp.int32, jnp.float32, jnp.int32,
                                       jnp.float32)))

  def _cache_specs(self):
    return kv_cache.cache_shapes(self.partitioner.config, self.partitioner.layout, self.rows, self.length)

  # --- running -------------------------------------------------------------------------------
  def run_prefill(self, params, cache, tokens: np.ndarray, lengths, rows, seeds, temperature, top_k, top_p):
    """Runs prefill[b, P] on host arrays; (new cache, first tokens int[b] on the host)."""
    part = self.partitioner
    program = self.prefill(*tokens.shape)
    args = [distributed.global_array(tokens, part.sharding(ax.TOKENS))]
    args += [self._host_row(a) for a in (lengths, rows, seeds, temperature, top_k, top_p)]
    cache, first = program(params, cache, *args)
    return cache, _local(first)

  def run_decode(self, kind: str, params, cache, *row_arrays):
    """Runs decode[kind, n] on host arrays int/int/u32/int/f32/i32/f32[n] (cache rows [0, n));
    (new cache, next tokens int[n])."""
    program = self.decode(kind, len(row_arrays[0]))
    self.decode_runs[kind, len(row_arrays[0])] += 1
    cache, new = program(params, cache, *(self._host_row(a) for a in row_arrays))
    return cache, _local(new)

  def _host_row(self, array: np.ndarray):
    return distributed.global_array(np.asarray(array), self._replicated())


def _insert(big: jax.Array, small: jax.Array, lengths: jax.Array, rows: jax.Array, names) -> jax.Array:
  """Writes prefill row i's keys/values (small [.., b, K, P, D], its prompt at [P - lengths[i], P))
  into big [.., N, K, S, D] row rows[i] at slots [0, lengths[i]); other rows keep theirs."""
  batch_axis, slot_axis = big.ndim - 4, big.ndim - 2
  n, bucket = big.shape[batch_axis], small.shape[slot_axis]
  match = rows[None, :] == jnp.arange(n)[:, None]  # [N, b]
  source = jnp.argmax(match, axis=1)  # the prefill row each cache row takes (if any)
  shape = lambda *sizes: (1,) * batch_axis + sizes  # broadcast over the leading layers axis, if any
  moved = jnp.take(small, source, axis=batch_axis)  # [.., N, K, P, D]
  start = bucket - jnp.take(lengths, source)  # each row's left padding
  slots = jnp.minimum(jnp.arange(bucket)[None, :] + start[:, None], bucket - 1)  # [N, P]
  moved = jnp.take_along_axis(moved, slots.reshape(shape(n, 1, bucket, 1)), axis=slot_axis)
  head = jax.lax.slice_in_dim(big, 0, bucket, axis=slot_axis)
  head = jnp.where(match.any(axis=1).reshape(shape(n, 1, 1, 1)), moved.astype(big.dtype), head)
  big = jax.lax.dynamic_update_slice_in_dim(big, head, 0, axis=slot_axis)
  return nn.with_logical_constraint(big, names)


def _row_specs(rows: int, dtypes) -> list[jax.ShapeDtypeStruct]:
  return [_spec((rows,), d) for d in dtypes]


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype)


def _local(array: jax.Array) -> np.ndarray:
  """A replicated global array's value, read from this process's own copy (no collective)."""
  return np.asarray(array.addressable_data(0))
