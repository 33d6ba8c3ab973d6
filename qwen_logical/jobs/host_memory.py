"""Whether a random model's sharded init fits this host, and the reduced variant when it does not."""

from __future__ import annotations

import numpy as np

from qwen_logical.common import host
from qwen_logical.model.config import ModelConfig

# Sharded init on CPU holds, besides the finished shards, temporaries of about 3.5x the
# parameter being generated (random bits, the normal transform); measured on the 7B shape.
INIT_TEMPORARY_FACTOR = 3.5


def init_host_bytes(cfg: ModelConfig) -> int:
  """Estimated peak host bytes of sharded init on CPU: all shards plus one parameter's temporaries."""
  itemsize = np.dtype(cfg.param_dtype).itemsize
  per_layer = (cfg.replace(num_layers=2).num_parameters - cfg.replace(num_layers=1).num_parameters) * itemsize
  # +15% per layer for head plan padding/repetition and allocator slack.
  total = cfg.num_parameters * itemsize + int(0.15 * per_layer) * cfg.num_layers
  stacked = cfg.num_layers if cfg.scan_layers else 1  # scanned layers make one array per kernel
  largest = max(cfg.vocab_size, stacked * cfg.intermediate_size) * cfg.hidden_size * itemsize
  return total + int(INIT_TEMPORARY_FACTOR * largest)


def fit_layers_to_host(cfg: ModelConfig, budget_fraction: float, explicit_layers: bool) -> tuple[ModelConfig, str]:
  """(config, message): fewer layers when init would not fit the host, said out loud, never silently.

  With `explicit_layers` (the user chose the layer count) the config stays and the message warns.
  """
  budget = int(host.available_host_bytes() * budget_fraction)
  need = init_host_bytes(cfg)
  if need <= budget:
    return cfg, ""
  fit = next((n for n in range(cfg.num_layers, 0, -1) if init_host_bytes(cfg.replace(num_layers=n)) <= budget), 1)
  dtype = np.dtype(cfg.param_dtype)
  params_gib = cfg.num_parameters * dtype.itemsize / 2**30
  message = (f"{cfg.name} with {cfg.num_layers} layers needs about {need / 2**30:.1f} GiB of host memory "
             f"to initialise in {dtype.name} ({params_gib:.1f} GiB of parameters); this host "
             f"allows {budget / 2**30:.1f} GiB ({budget_fraction:.0%} of available).")
  if explicit_layers:
    return cfg, message + " Running the requested layer count anyway (--config.model.num_layers was set)."
  reduced = cfg.replace(num_layers=fit)
  return reduced, (message + f" RUNNING A REDUCED VARIANT: {fit} of {cfg.num_layers} layers, every other "
                   "dimension as in the full model. Set --config.model.num_layers to choose, or run on a "
                   "host with more memory for the full model.")
