"""The compiled programs of generation for one Partitioner: prefill and decode per bucket.

A program is keyed by `ProgramKey` (batch B, prompt bucket P, cache slots S, sampling, stop
slots) and compiled once, on first use; `compilations` counts them.

* prefill(params, tokens int[B, P], slot_mask int[B, S], seed u32, stops int[T])
    -> (cache, token int[B], done bool[B]): builds the empty cache inside the program, runs the
    prompt through the model in Mode.PREFILL (last token's logits only) and picks token 0.
* decode(params, cache, token int[B], done bool[B], index i32, slot_mask, seed, stops, pad i32)
    -> (cache, token, done, index + 1): feeds `token` at slot `index` in Mode.DECODE and picks the
    next one; rows already done emit `pad`. The cache is donated (updated in place).
Every array is sharded by the partitioner's rule table: the cache by `cache_*` names
(`qwen_logical.inference.kv_cache`), tokens and flags by `activation_batch`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from qwen_logical.inference import kv_cache
from qwen_logical.inference.batch_plan import CACHE_GRANULE
from qwen_logical.inference.sampling import SamplingParams, row_keys, sample
from qwen_logical.model import axes as ax
from qwen_logical.model.model import Mode
from qwen_logical.sharding.partitioner import Partitioner


@dataclasses.dataclass(frozen=True)
class ProgramKey:
  """What one compiled program is specialised to."""

  batch: int
  prompt: int
  slots: int
  sampling: SamplingParams
  stop_slots: int


def _shards(partitioner: Partitioner, name: str) -> int:
  return math.prod(partitioner.mesh_shape[a] for a in partitioner.table.mesh_axes(name))


def batch_multiple(partitioner: Partitioner) -> int:
  """Padded batches are a multiple of this: what splits the token rows and the cache rows."""
  return math.lcm(*(_shards(partitioner, n) for n in (ax.ACTIVATION_BATCH, ax.CACHE_BATCH)))


def slot_multiple(partitioner: Partitioner) -> int:
  """Cache slot counts are a multiple of this: the granule and what splits the sequence axes."""
  return math.lcm(CACHE_GRANULE, *(_shards(partitioner, n) for n in (ax.CACHE_SEQUENCE, ax.ACTIVATION_LENGTH)))


class Programs:
  """Prefill and decode programs of one Partitioner, compiled per ProgramKey on first use."""

  def __init__(self, partitioner: Partitioner):
    self.partitioner = partitioner
    self._compiled: dict[tuple[str, ProgramKey], Any] = {}
    self.compilations = 0  # programs compiled so far (prefill and decode, every key)

  def get(self, kind: str, key: ProgramKey) -> tuple[Callable, float]:
    """(the compiled 'prefill' or 'decode' program for `key`, seconds spent compiling it now)."""
    if (kind, key) in self._compiled:
      return self._compiled[(kind, key)], 0.0
    start = time.perf_counter()
    lower = self.lower_prefill if kind == "prefill" else self.lower_decode
    compiled = lower(key).compile()
    self._compiled[(kind, key)] = compiled
    self.compilations += 1
    return compiled, time.perf_counter() - start

  # --- shardings -----------------------------------------------------------------------
  def _replicated(self) -> NamedSharding:
    return NamedSharding(self.partitioner.mesh, PartitionSpec())

  def _rows(self) -> NamedSharding:
    return self.partitioner.sharding((ax.ACTIVATION_BATCH,))

  # --- programs ------------------------------------------------------------------------
  def lower_prefill(self, key: ProgramKey):
    part, batch = self.partitioner, key.batch

    def prefill(params, tokens, slot_mask, seed, stop_ids):
      with part.bound():
        cache = kv_cache.zeros_in_jit(part, batch, key.slots)
        logits, cache = part.model.apply({"params": params}, tokens, slot_mask, mode=Mode.PREFILL,
                                         cache=cache, last_token_only=True)
        keys = row_keys(jax.random.key(seed), jnp.arange(batch), 0)
        token = sample(logits[:, -1], keys, key.sampling)
        return cache, token, jnp.isin(token, stop_ids)

    rows, rep, tokens = self._rows(), self._replicated(), part.sharding(ax.TOKENS)
    fn = jax.jit(prefill, in_shardings=(part.param_shardings, tokens, tokens, rep, rep),
                 out_shardings=(kv_cache.cache_shardings(part, batch, key.slots), rows, rows))
    return fn.lower(part.param_shapes, _spec((batch, key.prompt), jnp.int32), _spec((batch, key.slots), jnp.int32),
                    _spec((), jnp.uint32), _spec((key.stop_slots,), jnp.int32))

  def lower_decode(self, key: ProgramKey):
    part, batch = self.partitioner, key.batch

    def decode(params, cache, token, done, index, slot_mask, seed, stop_ids, pad_id):
      with part.bound():
        logits, cache = part.model.apply({"params": params}, token[:, None], slot_mask, mode=Mode.DECODE,
                                         cache=cache, cache_index=index)
        keys = row_keys(jax.random.key(seed), jnp.arange(batch), index - key.prompt + 1)
        new = sample(logits[:, 0], keys, key.sampling)
        new = jnp.where(done, pad_id, new)
        return cache, new, done | jnp.isin(new, stop_ids), index + 1

    rows, rep = self._rows(), self._replicated()
    cache_sh = kv_cache.cache_shardings(part, batch, key.slots)
    fn = jax.jit(decode,
                 in_shardings=(part.param_shardings, cache_sh, rows, rows, rep, part.sharding(ax.TOKENS),
                               rep, rep, rep),
                 out_shardings=(cache_sh, rows, rows, rep),
                 donate_argnums=(1,))
    cache = kv_cache.cache_shapes(part.config, part.layout, batch, key.slots)
    return fn.lower(part.param_shapes, cache, _spec((batch,), jnp.int32), _spec((batch,), jnp.bool_),
                    _spec((), jnp.int32), _spec((batch, key.slots), jnp.int32), _spec((), jnp.uint32),
                    _spec((key.stop_slots,), jnp.int32), _spec((), jnp.int32))


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype)
