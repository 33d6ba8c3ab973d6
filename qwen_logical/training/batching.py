"""Examples into fixed-shape batches: a held-out split, over-long conversations, length buckets.

Batches come in a few fixed lengths (buckets), so the train and eval steps compile once per bucket
and never again. Rows are right-padded (attention_mask 0, loss_mask 0); an eval batch that is not
full is filled with empty rows. Each process builds only its own rows (`data_shard` in
`training.step` says which block of every batch it holds).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import numpy as np
from absl import logging

from qwen_logical.training.data import DataError, Example

OVERLONG = ("truncate", "skip")


def bucket_lengths(max_length: int, count: int = 3, multiple: int = 8) -> tuple[int, ...]:
  """max_length, max_length / 2, ... (`count` of them, rounded up to `multiple`), ascending."""
  lengths = {max_length}
  for i in range(1, count):
    lengths.add(min(max_length, max(multiple, math.ceil(max_length / 2**i / multiple) * multiple)))
  return tuple(sorted(lengths))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds `length` tokens."""
  fitting = [b for b in buckets if b >= length]
  if not fitting:
    raise DataError(f"an example of {length} tokens is longer than the largest length bucket {max(buckets)}; "
                    "fit the examples to --config.train.max_length first (batching.fit_length).")
  return min(fitting)


def split_indices(count: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, eval) indices of `count` conversations: a seeded shuffle, the first eval_fraction held out
  (at least one when eval_fraction > 0 and there are two or more)."""
  if not 0 <= eval_fraction < 1:
    raise DataError(f"--config.train.eval_fraction={eval_fraction} must be in [0, 1).")
  order = np.random.RandomState(seed).permutation(count)
  held = 0 if eval_fraction == 0 or count < 2 else max(1, int(round(count * eval_fraction)))
  return np.sort(order[held:]), np.sort(order[:held])


def fit_length(examples: Sequence[Example], max_length: int, overlong: str, what: str) -> list[Example]:
  """Examples of at most max_length tokens: longer ones truncated (their trained tokens past the
  end dropped) or skipped, as `overlong` says; either way counted and logged as a warning. A
  truncated example left with no trained token is skipped too."""
  if overlong not in OVERLONG:
    raise DataError(f"--config.train.overlong={overlong!r}: use one of {OVERLONG}.")
  out, truncated, skipped = [], 0, 0
  for example in examples:
    if len(example) > max_length:
      if overlong == "skip":
        skipped += 1
        continue
      mask = example.loss_mask[:max_length].copy()
      mask[-1] = 0.0
      example = dataclasses.replace(example, tokens=example.tokens[:max_length], loss_mask=mask)
      truncated += 1
      if not mask.any():
        skipped += 1
        continue
    out.append(example)
  if truncated or skipped:
    logging.warning("%s: %d conversation(s) longer than --config.train.max_length=%d tokens: %d truncated, "
                    "%d skipped (overlong=%s; raise max_length to keep them whole)", what,
                    truncated + (skipped if overlong == "skip" else 0), max_length, truncated, skipped, overlong)
  return out


def collate(examples: Sequence[Example], rows: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
  """A [rows, length] batch: the examples right-padded, then empty rows up to `rows`."""
  tokens = np.full((rows, length), pad_id, np.int32)
  loss_mask = np.zeros((rows, length), np.float32)
  attention_mask = np.zeros((rows, length), np.int32)
  for row, example in enumerate(examples):
    n = len(example)
    tokens[row, :n], loss_mask[row, :n], attention_mask[row, :n] = example.tokens, example.loss_mask, 1
  return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": attention_mask}


@dataclasses.dataclass
class Dataset:
  """One process's examples (each at most max(buckets) tokens) and how to batch them."""

  examples: list[Example]
  buckets: tuple[int, ...]
  pad_id: int

  def __len__(self) -> int:
    return len(self.examples)

  @property
  def trained_tokens(self) -> int:
    return int(sum(e.loss_mask.sum() for e in self.examples))

  def length_of(self, examples: Sequence[Example]) -> int:
    """The bucket of the longest example (the smallest bucket when there is none)."""
    return bucket_for(max((len(e) for e in examples), default=1), self.buckets)

  def epochs(self, rows: int, seed: int) -> Iterator[list[Example]]:
    """Endless groups of `rows` examples: each epoch a new seeded shuffle, groups running across epochs."""
    if not self.examples:
      raise DataError("no training examples are left (all held out, skipped or too long); add data, "
                      "lower --config.train.eval_fraction or raise --config.train.max_length.")
    rng, pending = np.random.RandomState(seed), []
    while True:
      pending += [self.examples[i] for i in rng.permutation(len(self.examples))]
      while len(pending) >= rows:
        yield pending[:rows]
        pending = pending[rows:]

  def eval_groups(self, rows: int, count: int | None = None) -> list[list[Example]]:
    """The examples in order, `rows` at a time; `count` groups (empty ones appended) when given."""
    groups = [self.examples[i:i + rows] for i in range(0, len(self.examples), rows)]
    return groups + [[] for _ in range(max(0, (count or 0) - len(groups)))]

  def collate(self, examples: Sequence[Example], rows: int, length: int | None = None) -> dict[str, np.ndarray]:
    return collate(examples, rows, length or self.length_of(examples), self.pad_id)
