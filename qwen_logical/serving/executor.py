"""Runs one protocol Call on the inference programs: the same code on process 0 and on every
follower, so all processes run the same programs in the same order.

    cache, result = execute(programs, params, cache, call)

PREFILL -> the first tokens int[b]; DECODE -> (tokens int[n, K], produced int[n], the next RowState),
host arrays read from this process's own replicated copy; RESET -> a fresh zero cache, no result.
"""

from __future__ import annotations

import jax

from qwen_logical.inference.programs import CachePrograms, RowState, local
from qwen_logical.inference.sampling import kind_index
from qwen_logical.serving.protocol import DECODE, DECODE_FIELDS, PREFILL, PREFILL_FIELDS, RESET, Call


def execute(programs: CachePrograms, params, cache, call: Call):
  """(the cache after `call`, its host result or None)."""
  a, kind = call.arrays, kind_index(call.kind)
  if call.op == PREFILL:
    cache, first = programs.run_prefill(params, cache, a["tokens"], *(a[n] for n in PREFILL_FIELDS), kind)
    return cache, local(first)
  if call.op == DECODE:
    state = RowState(**{n: a[n] for n in DECODE_FIELDS}, stops=a["stops"])
    cache, state, tokens, produced = programs.run_decode(params, cache, state, kind, call.limit or None)
    return cache, (local(tokens), local(produced), jax.tree_util.tree_map(local, state))
  if call.op == RESET:  # after a failed call, whose buffers may have been donated
    return programs.new_cache(), None
  return cache, None
