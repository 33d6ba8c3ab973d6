"""AdamW with linear warmup and cosine decay, from the fine-tuning config.

Weight decay is decoupled and multiplied by the learning rate, as torch.optim.AdamW does
(p <- p - lr * (adam_update + weight_decay * p)); it applies to every leaf except biases and norm
scales (leaves named `bias`, `*_bias` or `scale`). Global-norm clipping and gradient accumulation are
the train step's (`training.step`): the norm is the canonical model's on every mesh, and the
accumulated gradient is exactly the one-batch gradient (summed over micro-batches, divided by the
total trained-token count).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import optax

from qwen_logical.sharding.tree_paths import path_keys
from qwen_logical.training.state import TrainingError


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """AdamW and its schedule. `steps` counts optimizer steps (each of grad_accum micro-batches)."""

  learning_rate: float = 1e-4
  warmup_steps: int = 0
  steps: int = 100
  weight_decay: float = 0.0
  clip_norm: float = 1.0  # 0 = no clipping
  grad_accum: int = 1
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  end_learning_rate_fraction: float = 0.0  # the cosine decays to learning_rate * this at `steps`

  def __post_init__(self):
    checks = {"learning_rate": self.learning_rate > 0, "steps": self.steps > 0,
              "warmup_steps": 0 <= self.warmup_steps <= self.steps, "weight_decay": self.weight_decay >= 0,
              "clip_norm": self.clip_norm >= 0, "grad_accum": self.grad_accum >= 1,
              "b1": 0 <= self.b1 < 1, "b2": 0 <= self.b2 < 1, "eps": self.eps > 0}
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
      raise TrainingError(f"--config.train.{bad[0]}={getattr(self, bad[0])!r} is out of range "
                          "(learning_rate, steps, eps > 0; 0 <= warmup_steps <= steps; weight_decay, "
                          "clip_norm >= 0; grad_accum >= 1; 0 <= b1, b2 < 1).")

  @classmethod
  def from_config(cls, train: Mapping[str, Any]) -> "OptimizerSettings":
    """The settings named in a config's `train` section (others keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(train).items() if k in names})


def learning_rate_schedule(settings: OptimizerSettings) -> optax.Schedule:
  """0 -> learning_rate linearly over warmup_steps, then a cosine down to the end fraction at `steps`."""
  s = settings
  decay_steps = max(s.steps - s.warmup_steps, 1)
  cosine = optax.cosine_decay_schedule(s.learning_rate, decay_steps, alpha=s.end_learning_rate_fraction)
  if s.warmup_steps == 0:
    return cosine
  warmup = optax.linear_schedule(0.0, s.learning_rate, s.warmup_steps)
  return optax.join_schedules([warmup, cosine], [s.warmup_steps])


def decays(path) -> bool:
  """Whether weight decay applies to the leaf at `path` (not to biases and norm scales)."""
  name = path_keys(path)[-1]
  return not (name == "bias" or name.endswith("_bias") or name == "scale")


def decay_mask(params):
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def make_optimizer(settings: OptimizerSettings) -> optax.GradientTransformation:
  """optax AdamW with the schedule; no clipping inside (the train step clips the canonical norm)."""
  return optax.adamw(learning_rate_schedule(settings), b1=settings.b1, b2=settings.b2, eps=settings.eps,
                     weight_decay=settings.weight_decay, mask=decay_mask)
