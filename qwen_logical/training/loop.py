"""The train loop: batches by bucket, the jitted step, a progress bar with loss, tokens/s and MFU, eval.

MFU = 6 x (model parameters) x (tokens per second) / (the mesh's peak FLOP/s). Tokens are the real
(unpadded) tokens of each batch; 6N per token is the usual forward + backward estimate (attention's
own products are not counted). The peak is `peak_tflops` per device from the config, or, when 0,
measured once on this mesh: a float32 matrix product on every device at once (on simulated CPU
devices that is what the host's cores give together).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from qwen_logical.common.host import is_main_process
from qwen_logical.common.progress import Progress
from qwen_logical.sharding import programs
from qwen_logical.sharding.mesh import every_device
from qwen_logical.training.batching import Dataset
from qwen_logical.training.step import StepFns


@dataclasses.dataclass
class LoopSettings:
  steps: int  # the last optimizer step (a restored state continues from its own step)
  batch_size: int  # global rows per optimizer step
  rows: int  # this process's rows per step (batch_size / data shards)
  eval_every: int = 0  # 0 = only at the end
  seed: int = 0
  peak_flops: float = 0.0  # the mesh's, FLOP/s; 0 = not known (no MFU)
  num_parameters: int = 0


def agree_max(value: int) -> int:
  """The largest `value` over all processes (every process must run the same shapes)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def measure_peak_flops(mesh, size: int = 512, repeats: int = 3) -> float:
  """The FLOP/s of a float32 [size, size] x [size, size] product on every device of `mesh` at once."""
  devices, spec = mesh.devices.size, every_device(mesh)
  ones = programs.build_on_mesh(mesh, lambda: jnp.ones((devices, size, size), jnp.float32), out_spec=spec,
                                name="peak_flops_operand")
  product = programs.build_on_mesh(mesh, lambda a: jnp.einsum("bij,bjk->bik", a, a), out_spec=spec,
                                   name="peak_flops")
  x = ones()
  jax.block_until_ready(product(x))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(product(x))
  return 2.0 * size**3 * devices * repeats / (time.perf_counter() - start)


class TrainProgress(Progress):
  """The progress bar of the train loop: step, loss, tokens/s and MFU."""

  def __init__(self, total_steps: int, first_step: int):
    super().__init__("Fine-tuning", total_steps, total_steps)
    self.items = self.bytes = first_step
    self.status = ""

  def step(self, status: str) -> None:
    self.status = status
    self.update(1, 1)

  def _counts(self) -> str:
    return f"step {self.items}/{self.total_items} {self.status}, {time.perf_counter() - self.start:.0f} s"


def evaluate(fns: StepFns, trainable, frozen, data: Dataset, rows: int) -> dict[str, float]:
  """Loss over every held-out example (each trained token counted once); NaN without any."""
  groups = data.eval_groups(rows, agree_max(-(-len(data) // rows)))
  loss_sum, tokens = 0.0, 0
  for group in groups:
    length = agree_max(data.length_of(group))
    metrics = jax.device_get(fns.eval_step(trainable, frozen, data.collate(group, rows, length)))
    loss_sum, tokens = loss_sum + float(metrics["loss_sum"]), tokens + int(metrics["tokens"])
  return {"eval_loss": loss_sum / tokens if tokens else float("nan"), "eval_tokens": tokens}


def train_loop(fns: StepFns, state, frozen, train: Dataset, held_out: Dataset, settings: LoopSettings,
               *, learning_rate: Callable[[int], float] | None = None,
               after_step: Callable[[Any], None] | None = None) -> tuple[Any, dict[str, list]]:
  """Runs optimizer steps from state.step to settings.steps; returns (state, history).

  history: 'train' (per step: step, loss, tokens, grad_norm, learning_rate, tokens_per_s, mfu) and
  'eval' (step, eval_loss, eval_tokens) every eval_every steps and after the last. `after_step(state)`
  runs after every step (checkpointing decides there whether to save).
  """
  s = settings
  first = int(jax.device_get(state.step))
  history: dict[str, list] = {"train": [], "eval": []}
  groups = train.epochs(s.rows, s.seed)
  for _ in range(first):  # a restored run continues the same example order
    next(groups)
  bar = TrainProgress(s.steps, first)
  for step in range(first + 1, s.steps + 1):
    examples = next(groups)
    batch = train.collate(examples, s.rows, agree_max(train.length_of(examples)))
    start = time.perf_counter()
    state, metrics = fns.train_step(state, frozen, batch)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    seconds = time.perf_counter() - start
    real = int(batch["attention_mask"].sum()) * (s.batch_size // s.rows)
    record = {"step": step, **metrics, "tokens_per_s": real / seconds,
              "learning_rate": float(learning_rate(step - 1)) if learning_rate else float("nan")}
    record["mfu"] = 6.0 * s.num_parameters * record["tokens_per_s"] / s.peak_flops if s.peak_flops else float("nan")
    history["train"].append(record)
    bar.step(f"loss {record['loss']:.4f}, {record['tokens_per_s']:.0f} tokens/s, MFU {100 * record['mfu']:.2f}%")
    if after_step is not None:
      after_step(state)
    if (s.eval_every and step % s.eval_every == 0) or step == s.steps:
      result = {"step": step, **evaluate(fns, state.trainable, frozen, held_out, s.rows)}
      history["eval"].append(result)
      if is_main_process():
        logging.info("Step %d: train loss %.4f, eval loss %.4f over %d tokens", step, record["loss"],
                     result["eval_loss"], result["eval_tokens"])
  bar.close()
  return state, history
