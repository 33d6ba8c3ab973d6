"""The host side of a generation call, before anything runs: prompts as id lists, the padded shapes
(buckets), the left-padded token array, the slot mask and the stop ids. Pure numpy, no JAX.

Shapes of one call (B prompts, the longest L tokens, N new tokens at most):
* prompt bucket P: the padded prompt length, a power of two from 16, then multiples of 512;
* batch B': a power of two at least B, a multiple of what the mesh's batch axes split;
* cache slots S: at least P + N, a multiple of 64 (and of what splits the sequence axes), so
  max_new_tokens 30 and 33 share programs.
Rows are left-padded: prompt r fills slots [P - len_r, P). The slot mask int[B', S] is 1 on real
prompt slots and on every slot from P on (new tokens), 0 on left padding.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Sequence

import numpy as np

from qwen_logical.inference.results import GenerationError

MIN_PROMPT_BUCKET = 16
LINEAR_BUCKETS_FROM = 512  # prompt buckets double up to here, then grow by this much
CACHE_GRANULE = 64  # cache slots are a multiple of this
STOP_SLOTS = 8  # stop ids are padded to a multiple of this (-1 never matches)


def prompt_bucket(length: int, growth: int = 2) -> int:
  """The padded prompt length for a prompt of `length` tokens: 16, then `growth` times the last up
  to 512 (growth 2: 16, 32, ..., 512; the server's 4: 16, 64, 256, 1024), then every 512 more."""
  bucket = MIN_PROMPT_BUCKET
  while bucket < length:
    bucket = bucket * growth if bucket < LINEAR_BUCKETS_FROM else bucket + LINEAR_BUCKETS_FROM
  return bucket


def round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def prompt_problem(tokens: Sequence[int], max_new_tokens: int, context: int, vocab_size: int,
                   name: str = "The prompt") -> tuple[str, str] | None:
  """(field, message) of the first reason prompt `tokens` plus `max_new_tokens` new tokens cannot run
  in a context of `context` tokens of a `vocab_size` vocabulary, or None. The one check of a
  prompt's fit: `generate` (via BatchPlanner) and the serving engine raise its message."""
  if not tokens:
    return "tokens", (f"{name} is empty: generation needs at least one prompt token (e.g. the chat "
                      "template's system turn, or a BOS/EOS id).")
  bad = [t for t in tokens if not _is_int(t) or not 0 <= t < vocab_size]
  if bad:
    return "tokens", (f"{name} has token id(s) {bad[:5]} outside [0, {vocab_size}) of this model's vocabulary; "
                      "was it encoded with another model's tokenizer?")
  if len(tokens) >= context:
    return "tokens", (f"{name} has {len(tokens)} tokens, longer than the context of {context} leaves for a prompt "
                      f"(at least one new token must fit): shorten it to at most {context - 1} tokens (or "
                      "truncate its start).")
  if not _is_int(max_new_tokens) or max_new_tokens < 1:
    return "max_new_tokens", f"max_new_tokens={max_new_tokens!r} must be a positive integer."
  if len(tokens) + max_new_tokens > context:
    return "max_new_tokens", (f"{name} ({len(tokens)} tokens) plus max_new_tokens={max_new_tokens} is "
                              f"{len(tokens) + max_new_tokens} tokens, more than the context of {context}; use "
                              f"max_new_tokens <= {context - len(tokens)} or a shorter prompt.")
  return None


def prompt_ids(prompts: Any, tokenizer=None, attention_mask=None) -> list[list[int]]:
  """str | [str] | [int] | [[int]] | int[B, L] array (+ mask: 1 on real tokens) -> id lists."""
  if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                  and all(isinstance(p, str) for p in prompts)):
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if tokenizer is None:
      raise GenerationError("Text prompts need a tokenizer: pass tokenizer=Tokenizer.from_directory(DIR) "
                            "(qwen_logical.tokenizer), or pass token ids.")
    return [list(tokenizer.encode(t)) for t in texts]
  if hasattr(prompts, "__array__") and hasattr(prompts, "shape"):  # numpy or JAX
    array = np.asarray(prompts)
    if array.ndim == 1:
      array = array[None]
    if array.ndim != 2:
      raise GenerationError(f"Token prompts must be int[B, L] or int[L]; got shape {array.shape}.")
    if attention_mask is None:
      return [row.tolist() for row in array]
    mask = np.asarray(attention_mask).reshape(array.shape).astype(bool)
    return [row[m].tolist() for row, m in zip(array, mask)]
  if isinstance(prompts, (list, tuple)):
    if not prompts:
      raise GenerationError("No prompts given: pass a str, a list of str, or token ids.")
    if all(isinstance(t, (int, np.integer)) for t in prompts):
      return [[int(t) for t in prompts]]
    return [[int(t) for t in p] for p in prompts]
  raise GenerationError(f"Cannot generate from a {type(prompts).__name__}: pass a str, a list of str, "
                        "a list of token ids, a list of such lists, or an int[B, L] array.")


def stop_and_pad_ids(tokenizer=None, stop_ids: Sequence[int] | None = None,
                     pad_id: int | None = None) -> tuple[tuple[int, ...], int]:
  """(stop ids, pad id): as given, else the tokenizer's; pad falls back to the first stop id, then 0."""
  if stop_ids is None:
    stop_ids = tuple(getattr(tokenizer, "stop_ids", ()) or ())
  stops = tuple(int(s) for s in np.atleast_1d(np.asarray(stop_ids, np.int64)).tolist())
  if pad_id is None:
    pad_id = getattr(tokenizer, "pad_id", None)
    pad_id = pad_id if pad_id is not None else (stops[0] if stops else 0)
  return stops, int(pad_id)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """One call's padded host arrays. tokens int32[B, P] (left-padded with pad_id), slot_mask
  int32[B, S], stops int32[STOP_SLOTS * k] (-1 padded); `ids` are the real rows' prompts."""

  ids: list[list[int]]
  max_new_tokens: int
  batch: int
  prompt: int
  slots: int
  tokens: np.ndarray
  slot_mask: np.ndarray
  stop_ids: tuple[int, ...]
  stops: np.ndarray
  pad_id: int

  @property
  def real(self) -> int:
    """Rows that hold a prompt (the rest pad the batch)."""
    return len(self.ids)

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.batch, self.prompt, self.slots)

  @property
  def prompt_tokens(self) -> int:
    return sum(len(p) for p in self.ids)


@dataclasses.dataclass(frozen=True)
class BatchPlanner:
  """Plans calls for a model of `vocab_size` tokens and a context of `max_length` tokens; batch and
  slot counts are multiples of what the mesh splits them over."""

  max_length: int
  vocab_size: int
  batch_multiple: int = 1
  slot_multiple: int = CACHE_GRANULE

  def check(self, ids: list[list[int]], max_new_tokens: int) -> None:
    """GenerationError naming the prompt and the fix for a request that cannot run."""
    for r, row in enumerate(ids):
      problem = prompt_problem(row, max_new_tokens, self.max_length, self.vocab_size, f"Prompt {r}")
      if problem:
        raise GenerationError(problem[1])

  def plan(self, ids: list[list[int]], max_new_tokens: int, stop_ids: Sequence[int] = (),
           pad_id: int = 0) -> BatchPlan:
    """The checked, padded arrays for prompts `ids` and up to `max_new_tokens` new tokens each."""
    self.check(ids, max_new_tokens)
    max_new_tokens = int(max_new_tokens)
    real, longest = len(ids), max(len(p) for p in ids)
    prompt = min(prompt_bucket(longest), round_up(self.max_length, MIN_PROMPT_BUCKET))
    batch = round_up(1 << (real - 1).bit_length(), self.batch_multiple)
    slots = round_up(prompt + max_new_tokens, self.slot_multiple)
    tokens = np.full((batch, prompt), pad_id, np.int32)
    slot_mask = np.ones((batch, slots), np.int32)
    slot_mask[:, :prompt] = 0
    for r, row in enumerate(ids):
      tokens[r, prompt - len(row):] = row
      slot_mask[r, prompt - len(row):prompt] = 1
    slot_mask[real:, prompt - 1] = 1  # padding rows: one real slot keeps their softmax well defined
    stops = np.full(round_up(max(len(stop_ids), 1), STOP_SLOTS), -1, np.int32)
    stops[:len(stop_ids)] = stop_ids
    return BatchPlan(ids=ids, max_new_tokens=max_new_tokens, batch=batch, prompt=prompt, slots=slots,
                     tokens=tokens, slot_mask=slot_mask, stop_ids=tuple(stop_ids), stops=stops, pad_id=pad_id)
