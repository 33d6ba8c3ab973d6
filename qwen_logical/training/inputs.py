"""The train and eval datasets of a fine-tuning run: a JSONL file or the built-in set, this process's part.

    train, held_out = make_datasets(tokenizer, data="chats.jsonl", max_length=512, eval_fraction=0.1,
                                    seed=0, shard=(index, count))
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from absl import logging

from qwen_logical.training import builtin_data
from qwen_logical.training.batching import Dataset, bucket_lengths, fit_length, split_indices
from qwen_logical.training.data import (Conversation, DataError, check_messages, count_conversations,
                                        read_conversations, tokenize_conversation)


def builtin_conversations() -> list[Conversation]:
  return [Conversation(f"built-in:{i}", check_messages(list(m), f"built-in:{i}"))
          for i, m in enumerate(builtin_data.CONVERSATIONS)]


def _conversations(data: str, train_idx: np.ndarray, eval_idx: np.ndarray, total: int | None):
  """(train, eval) conversations at the given indices, reading only those lines of `data`."""
  if not data:
    every = builtin_conversations()
    return [every[i] for i in train_idx], [every[i] for i in eval_idx]
  wanted = sorted(set(train_idx.tolist()) | set(eval_idx.tolist()))
  read = dict(zip(wanted, read_conversations(data, lines=wanted)))
  return [read[i] for i in train_idx], [read[i] for i in eval_idx]


def _tokenize(tokenizer, conversations: Sequence[Conversation]):
  return [tokenize_conversation(tokenizer, c.messages, c.where) for c in conversations]


def make_datasets(tokenizer, *, data: str, max_length: int, eval_fraction: float, seed: int,
                  overlong: str = "truncate", shard: tuple[int, int] = (0, 1), num_buckets: int = 3
                  ) -> tuple[Dataset, Dataset]:
  """(train, eval) Datasets of this process: the conversations of `data` (a JSONL file; "" = the
  built-in set) split by a seeded shuffle, every `shard[1]`-th of each split from `shard[0]`,
  tokenised with the tokenizer's chat template, over-long ones truncated or skipped (counted, logged)."""
  if max_length < 2:
    raise DataError(f"--config.train.max_length={max_length} must be at least 2 tokens.")
  total = count_conversations(data) if data else len(builtin_data.CONVERSATIONS)
  if data and total == 0:
    raise DataError(f"{data} holds no conversations; each line must be {{\"messages\": [...]}}.")
  train_idx, eval_idx = split_indices(total, eval_fraction, seed)
  index, count = shard
  train_conv, eval_conv = _conversations(data, train_idx[index::count], eval_idx[index::count], total)
  name = data or "the built-in conversations"
  train = fit_length(_tokenize(tokenizer, train_conv), max_length, overlong, f"{name} (train)")
  held_out = fit_length(_tokenize(tokenizer, eval_conv), max_length, overlong, f"{name} (eval)")
  if not train:
    raise DataError(f"no training examples are left from {name} on this process (part {index} of {count}: "
                    f"{len(train_conv)} read, the rest held out; over-long ones {overlong}); add data, lower "
                    "--config.train.eval_fraction, raise --config.train.max_length or use overlong=truncate.")
  buckets = bucket_lengths(max_length, num_buckets)
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  train_ds, eval_ds = Dataset(train, buckets, pad_id), Dataset(held_out, buckets, pad_id)
  logging.info("Data %s: %d conversations, %d train (%d trained tokens) / %d eval on this process "
               "(part %d of %d); length buckets %s", name, total, len(train_ds), train_ds.trained_tokens,
               len(eval_ds), index, count, buckets)
  return train_ds, eval_ds
