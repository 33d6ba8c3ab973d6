"""Runs one protocol Call on the inference programs: the same code on process 0 and on every
follower, so all processes run the same programs in the same order.

    cache = new_cache(programs)
    cache, result = execute(programs, params, cache, call)

Results are host arrays read from this process's own replicated copy:
PREFILL / EXTEND (flag: the bucket P) -> the first tokens' Drawn [b] (with echo, (Drawn [b], the
prompts' Drawn [b, P]));
DECODE -> (Drawn [n, W], produced int[n], the next RowState); COPY, RESET -> None (RESET: a fresh
zero cache). With speculative programs (prompt lookup) the "cache" is (the cache, each row's token
history int[R, S] on the host: its prompt, then its tokens), and DECODE runs speculative rounds
unless the call asks for plain steps (rows that need logit processing or log-probabilities); a
row's tokens then come several per round, W = rounds x (K + 1), with zero log-probabilities.
"""

from __future__ import annotations

import jax
import numpy as np

from qwen_logical.inference.logit_processing import TOP_LOGPROBS, RowExtras
from qwen_logical.inference.programs import CachePrograms, RowState, local
from qwen_logical.inference.row_state import Drawn
from qwen_logical.inference.sampling import kind_index
from qwen_logical.inference.speculative import SpeculativePrograms, record_prompts
from qwen_logical.serving.protocol import (COPY, DECODE, DECODE_FIELDS, EXTEND, EXTEND_FIELDS, EXTRA_FIELDS, PREFILL,
                                           PREFILL_FIELDS, RESET, Call)


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
  pack = lambda kv: (kv, history) if speculative else kv
  extras = RowExtras(**{n: a[n] for n in EXTRA_FIELDS}) if call.op in (PREFILL, EXTEND, DECODE) else None
  if call.op in (PREFILL, EXTEND):
    run = programs.run_prefill if call.op == PREFILL else programs.run_extend
    fields = PREFILL_FIELDS if call.op == PREFILL else EXTEND_FIELDS
    echo = {"echo": bool(call.flag)} if call.op == PREFILL else {"bucket": call.flag}
    kv, drawn, *prompt = run(params, kv, a["tokens"], *(a[n] for n in fields), kind, stops=a["stops"], extras=extras,
                             **echo)
    drawn = jax.tree_util.tree_map(local, drawn)
    if speculative:
      _record_prompts(history, call.op, a, drawn.tokens, call.flag)
    return pack(kv), ((drawn, jax.tree_util.tree_map(local, prompt[0])) if prompt else drawn)
  if call.op == DECODE:
    state = RowState(**{n: a[n] for n in DECODE_FIELDS}, stops=a["stops"])
    n = len(state.budget)
    if speculative and not call.flag:
      kv, state, rows, tokens, produced, _ = programs.run_speculate(params, kv, state, history[:n], call.limit or None,
                                                                    kind=kind)
      history[:n] = local(rows)
      tokens = local(tokens)
      top = np.zeros(tokens.shape + (TOP_LOGPROBS,), np.int32)
      drawn = Drawn(tokens, np.zeros(tokens.shape, np.float32), top, top.astype(np.float32))
    else:
      kv, state, drawn, produced = programs.run_decode(params, kv, state, kind, call.limit or None, extras=extras)
      drawn = jax.tree_util.tree_map(local, drawn)
      if speculative:
        _record_steps(history, a["index"], drawn.tokens)
    return pack(kv), (drawn, local(produced), jax.tree_util.tree_map(local, state))
  if call.op == COPY:
    if speculative:
      history[call.flag] = history[call.limit]
    return pack(programs.run_copy(kv, call.limit, call.flag)), None
  if call.op == RESET:  # after a failed call, whose buffers may have been donated
    return new_cache(programs), None
  return cache, None


def _record_prompts(history: np.ndarray, op: int, a: dict, first: np.ndarray, bucket: int) -> None:
  """Each prefilled (or extended) row's prompt at [0, n) and first token into its history."""
  tokens, width = a["tokens"], a["tokens"].shape[1]  # prompts are left-padded
  lengths = a["lengths"] if op == PREFILL else a["starts"] + bucket
  record_prompts(history, a["rows"], [t[width - n:] for t, n in zip(tokens, lengths)], first)


def _record_steps(history: np.ndarray, index: np.ndarray, tokens: np.ndarray) -> None:
  """Plain steps' tokens i32[n, K] (-1 past a row's end) into the rows' histories after slot index."""
  for row, (start, new) in enumerate(zip(index, tokens)):
    new = new[new >= 0]
    history[row, start + 1:start + 1 + len(new)] = new[:history.shape[1] - start - 1]
