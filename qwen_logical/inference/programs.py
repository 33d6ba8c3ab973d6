"""The compiled programs of generation for one Partitioner: prefill and decode per bucket.

A program is keyed by `ProgramKey` (batch B, prompt bucket P, cache slots S, sampling, stop
slots) and compiled once, on first use; `compilations` counts them. Settings of one sampler kind
(`sampling.GREEDY`, `SAMPLE`, `FILTERED`) share a program: the temperature, top_k and top_p are
runtime values (the last three arguments, which `get`'s callable passes itself).

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
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qwen_logical.inference import kv_cache
from qwen_logical.inference.batch_plan import CACHE_GRANULE
from qwen_logical.inference.sampling import SamplingParams, row_keys, sample_rows
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
    """(the 'prefill' or 'decode' program for `key` with key.sampling's values bound, seconds
    spent compiling it now)."""
    shared = dataclasses.replace(key, sampling=_KIND_SETTINGS[key.sampling.kind])
    seconds = 0.0
    if (kind, shared) not in self._compiled:
      start = time.perf_counter()
      lower = self.lower_prefill if kind == "prefill" else self.lower_decode
      self._compiled[(kind, shared)] = lower(shared).compile()
      self.compilations += 1
      seconds = time.perf_counter() - start
    compiled, s = self._compiled[(kind, shared)], key.sampling
    values = (np.float32(s.temperature), np.int32(s.top_k), np.float32(s.top_p))
    return (lambda *args: compiled(*args, *values)), seconds

  # --- shardings -----------------------------------------------------------------------
  def _replicated(self) -> NamedSharding:
    return NamedSharding(self.partitioner.mesh, PartitionSpec())

  def _rows(self) -> NamedSharding:
    return self.partitioner.sharding((ax.ACTIVATION_BATCH,))

  # --- programs ------------------------------------------------------------------------
  def lower_prefill(self, key: ProgramKey):
    part, batch = self.partitioner, key.batch

    def prefill(params, tokens, slot_mask, seed, stop_ids, *settings):
      with part.bound():
        cache = kv_cache.zeros_in_jit(part, batch, key.slots)
        logits, cache = part.model.apply({"params": params}, tokens, slot_mask, mode=Mode.PREFILL,
                                         cache=cache, last_token_only=True)
        keys = row_keys(jax.random.key(seed), jnp.arange(batch), 0)
        token = _sample(logits[:, -1], keys, settings, key.sampling.kind)
        return cache, token, jnp.isin(token, stop_ids)

    rows, rep, tokens = self._rows(), self._replicated(), part.sharding(ax.TOKENS)
    fn = jax.jit(prefill, in_shardings=(part.param_shardings, tokens, tokens, rep, rep) + (rep,) * 3,
                 out_shardings=(kv_cache.cache_shardings(part, batch, key.slots), rows, rows))
    return fn.lower(part.param_shapes, _spec((batch, key.prompt), jnp.int32), _spec((batch, key.slots), jnp.int32),
                    _spec((), jnp.uint32), _spec((key.stop_slots,), jnp.int32), *_SETTING_SPECS)

  def lower_decode(self, key: ProgramKey):
    part, batch = self.partitioner, key.batch

    def decode(params, cache, token, done, index, slot_mask, seed, stop_ids, pad_id, *settings):
      with part.bound():
        logits, cache = part.model.apply({"params": params}, token[:, None], slot_mask, mode=Mode.DECODE,
                                         cache=cache, cache_index=index)
        keys = row_keys(jax.random.key(seed), jnp.arange(batch), index - key.prompt + 1)
        new = _sample(logits[:, 0], keys, settings, key.sampling.kind)
        new = jnp.where(done, pad_id, new)
        return cache, new, done | jnp.isin(new, stop_ids), index + 1

    rows, rep = self._rows(), self._replicated()
    cache_sh = kv_cache.cache_shardings(part, batch, key.slots)
    fn = jax.jit(decode,
                 in_shardings=(part.param_shardings, cache_sh, rows, rows, rep, part.sharding(ax.TOKENS),
                               rep, rep, rep) + (rep,) * 3,
                 out_shardings=(cache_sh, rows, rows, rep),
                 donate_argnums=(1,))
    cache = kv_cache.cache_shapes(part.config, part.layout, batch, key.slots)
    return fn.lower(part.param_shapes, cache, _spec((batch,), jnp.int32), _spec((batch,), jnp.bool_),
                    _spec((), jnp.int32), _spec((batch, key.slots), jnp.int32), _spec((), jnp.uint32),
                    _spec((key.stop_slots,), jnp.int32), _spec((), jnp.int32), *_SETTING_SPECS)


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype)


# One setting per kind stands for all of that kind in the program cache; the values are runtime scalars.
_KIND_SETTINGS = {s.kind: s for s in (SamplingParams(), SamplingParams(1.0), SamplingParams(1.0, top_k=1))}
_SETTING_SPECS = (_spec((), jnp.float32), _spec((), jnp.int32), _spec((), jnp.float32))


def _sample(logits, keys, settings, kind: str):
  """Every row with the call's (temperature, top_k, top_p) runtime scalars."""
  rows = logits.shape[0]
  return sample_rows(logits, keys, *(jnp.broadcast_to(v, (rows,)) for v in settings), kind)
