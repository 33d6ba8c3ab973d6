"""Runs one protocol Call on the inference programs: the same code on process 0 and on every
follower, so all processes run the same programs in the same order.

    cache = new_cache(programs)
    cache, result = execute(programs, params, cache, call)

PREFILL -> the first tokens int[b]; DECODE -> (tokens int[n, W], produced int[n], the next RowState),
host arrays read from this process's own replicated copy; RESET -> a fresh zero cache, no result.
With speculative programs (prompt lookup) the "cache" is (the KV cache, each row's token history
int[R, S] on the host: its prompt, then its tokens), and DECODE runs speculative rounds; a row's
tokens then come several per round, W = rounds x (K + 1).
"""

from __future__ import annotations

import jax
import numpy as np

from qwen_logical.inference.programs import CachePrograms, RowState, local
from qwen_logical.inference.sampling import kind_index
from qwen_logical.inference.speculative import SpeculativePrograms, record_prompts
from qwen_logical.serving.protocol import DECODE, DECODE_FIELDS, PREFILL, PREFILL_FIELDS, RESET, Call


def new_cache(programs: CachePrograms):
  """A zero cache (and, for speculative programs, an empty history)."""
  if isinstance(programs, SpeculativePrograms):
    return programs.new_cache(), np.zeros((programs.rows, programs.length), np.int32)
  return programs.new_cache()


def execute(programs: CachePrograms, params, cache, call: Call):
  """(the cache after `call`, its host result or None)."""
  a, kind = call.arrays, kind_index(call.kind)
  speculative = isinstance(programs, SpeculativePrograms)
  kv, history = cache if speculative and cache is not None else (cache, None)
  if call.op == PREFILL:
    kv, first = programs.run_prefill(params, kv, a["tokens"], *(a[n] for n in PREFILL_FIELDS), kind)
    first = local(first)
    if speculative:
      width = a["tokens"].shape[1]  # prompts are left-padded
      record_prompts(history, a["rows"], [t[width - n:] for t, n in zip(a["tokens"], a["lengths"])], first)
    return (kv, history) if speculative else kv, first
  if call.op == DECODE:
    state = RowState(**{n: a[n] for n in DECODE_FIELDS}, stops=a["stops"])
    if speculative:
      n = len(state.budget)
      kv, state, rows, tokens, produced, _ = programs.run_speculate(params, kv, state, history[:n], call.limit or None,
                                                                    kind=kind)
      history[:n] = local(rows)
      cache = (kv, history)
    else:
      cache, state, tokens, produced = programs.run_decode(params, kv, state, kind, call.limit or None)
    return cache, (local(tokens), local(produced), jax.tree_util.tree_map(local, state))
  if call.op == RESET:  # after a failed call, whose buffers may have been donated
    return new_cache(programs), None
  return cache, None
