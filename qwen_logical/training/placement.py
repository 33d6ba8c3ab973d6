"""Training batches on the mesh: whether a batch splits, which rows each process holds, placing them.

A batch is a dict of [B, L] arrays with logical axes (activation_batch, activation_length): tokens
int32, loss_mask float32, attention_mask int32 (see `training.step`).
"""

from __future__ import annotations

import jax
import numpy as np

from qwen_logical.model import axes as ax
from qwen_logical.sharding import validation
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.training.state import TrainingError

BATCH_KEYS = ("tokens", "loss_mask", "attention_mask")
_DTYPES = {"tokens": np.int32, "loss_mask": np.float32, "attention_mask": np.int32}
Batch = dict  # {'tokens': int32[B, L], 'loss_mask': float32[B, L], 'attention_mask': int32[B, L]}


def check_batch_size(partitioner: Partitioner, batch_size: int, grad_accum: int = 1,
                     flag: str = "--config.train.batch_size") -> None:
  """TrainingError unless each micro-batch (batch_size / grad_accum rows) splits over the batch shards."""
  shards = partitioner.batch_shards
  if grad_accum < 1 or batch_size % (grad_accum * shards):
    raise TrainingError(
        f"{flag}={batch_size} does not split into --config.train.grad_accum={grad_accum} micro-batches "
        f"over the {shards} batch shards of mesh {partitioner.name} (activation_batch -> "
        f"{partitioner.table.mapping().get(ax.ACTIVATION_BATCH)}); use a batch size that is a multiple "
        f"of {grad_accum * shards}, or change grad_accum, the mesh or the rule table.")


def data_shard(partitioner: Partitioner) -> tuple[int, int]:
  """(index, count): this process holds block `index` of `count` equal blocks of every batch's rows.

  With one process (0, 1). Processes that share rows (the batch split over fewer devices than the
  processes hold) get the same index and must read the same examples."""
  shards = partitioner.batch_shards
  indices = partitioner.sharding(ax.TOKENS).addressable_devices_indices_map((shards, 1)).values()
  starts = sorted({index[0].indices(shards)[0] for index in indices})
  block = len(starts)
  return starts[0] // block, shards // block


def global_rows(partitioner: Partitioner, local_rows: int) -> int:
  """Rows of the global batch when this process holds `local_rows` of them."""
  return local_rows * data_shard(partitioner)[1]


def place_batch(partitioner: Partitioner, batch: Batch) -> Batch:
  """Host rows -> global arrays split (activation_batch, activation_length). In a multi-process job each
  process passes its own rows (`data_shard` says which)."""
  sharding = partitioner.sharding(ax.TOKENS)
  out = {}
  for key in BATCH_KEYS:
    if key not in batch:
      raise TrainingError(f"a training batch needs {BATCH_KEYS}; {key!r} is missing.")
    value = batch[key]
    if isinstance(value, jax.Array):
      out[key] = value
    elif jax.process_count() == 1:
      out[key] = jax.device_put(np.asarray(value, _DTYPES[key]), sharding)
    else:
      local = np.asarray(value, _DTYPES[key])
      global_shape = (global_rows(partitioner, local.shape[0]), local.shape[1])
      out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out


def check_rows(partitioner: Partitioner, batch: Batch, grad_accum: int) -> None:
  """TrainingError / RuleError unless `batch` (host rows of this process, or global arrays) fits the mesh."""
  tokens = batch.get("tokens")
  if tokens is None or np.ndim(tokens) != 2:
    raise TrainingError(f"batch['tokens'] must be int32[B, L], got {None if tokens is None else np.shape(tokens)}.")
  rows = tokens.shape[0] if isinstance(tokens, jax.Array) else global_rows(partitioner, tokens.shape[0])
  check_batch_size(partitioner, rows, grad_accum)
  problems = validation.check_array(f"token batch {tuple(tokens.shape)}", (rows, tokens.shape[1]), ax.TOKENS,
                                    partitioner.table, partitioner.mesh_shape)
  validation.raise_if(problems, partitioner.table, partitioner.mesh_shape)
