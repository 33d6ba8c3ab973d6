"""Whether a model fits this host on CPU: the storage dtype when none is asked for, and the reduced
variant (fewer layers, said out loud) when even that does not fit.

A run's peak host memory on XLA:CPU (every simulated device lives in this process) is about

    process overhead + stored parameters + converted-weight temporaries

* stored parameters: HF parameter count x bytes per value (int8: 1, plus float32 scales), +5% for
  the head layout's padding and repetition on up to 8 model shards;
* converted-weight temporaries: weights stored in another dtype than the compute dtype are
  converted inside each product a block of rows at a time (model/projections.py); 3.5 layers in
  float32 bounds that and the compiler's transient memory (the 7B in bf16 on 1x8: 16.6 GB peak);
* the hash init writes each parameter straight into its shards (no temporaries of its size).

Measured 2026-11-25: `python main.py` (the whole 7B in bf16 on 1x8) peaks at 16.8 GB (estimate 20.3 GB).
"""

from __future__ import annotations

import numpy as np

from qwen_logical.common import host
from qwen_logical.model.config import ModelConfig

PROCESS_OVERHEAD_BYTES = 10**9  # Python, JAX, XLA and the compiler, measured ~0.6-0.9 GB
LAYOUT_OVERHEAD = 1.05
CONVERTED_LAYERS = 3.5


def _bytes_per_value(cfg: ModelConfig) -> float:
  return 1.0 if cfg.quantization == "int8" else float(np.dtype(cfg.param_dtype).itemsize)


def run_host_bytes(cfg: ModelConfig) -> int:
  """Estimated peak host bytes of a run of `cfg` on CPU (see the module docstring)."""
  params = cfg.num_parameters * _bytes_per_value(cfg) * LAYOUT_OVERHEAD
  converted = 0.0
  if cfg.quantization or np.dtype(cfg.param_dtype) != np.dtype(cfg.dtype):
    per_layer = cfg.replace(num_layers=2).num_parameters - cfg.replace(num_layers=1).num_parameters
    converted = CONVERTED_LAYERS * per_layer * np.dtype(cfg.dtype).itemsize
  return int(PROCESS_OVERHEAD_BYTES + params + converted)


def budget_bytes(fraction: float) -> int:
  return int(host.available_host_bytes() * fraction)


def storage_dtype(cfg: ModelConfig, fraction: float) -> tuple[str, str]:
  """(param_dtype, message) for --config.model.param_dtype='' (auto): float32, the fast path on CPU,
  when the model fits this host in float32; else bfloat16 (half the memory, slower matrix products)."""
  budget = budget_bytes(fraction)
  need = run_host_bytes(cfg.replace(param_dtype="float32"))
  if need <= budget:
    return "float32", ""
  return "bfloat16", (f"{cfg.name} needs about {need / 2**30:.1f} GiB in float32, more than this host allows "
                      f"({budget / 2**30:.1f} GiB, {fraction:.0%} of available): weights stored in bfloat16, "
                      "computed in float32. Set --config.model.param_dtype to choose.")


def fit_layers_to_host(cfg: ModelConfig, budget_fraction: float, explicit_layers: bool) -> tuple[ModelConfig, str]:
  """(config, message): fewer layers when the run would not fit the host, said out loud, never silently.

  With `explicit_layers` (the user chose the layer count) the config stays and the message warns.
  """
  budget = budget_bytes(budget_fraction)
  need = run_host_bytes(cfg)
  if need <= budget:
    return cfg, ""
  fit = next((n for n in range(cfg.num_layers, 0, -1) if run_host_bytes(cfg.replace(num_layers=n)) <= budget), 1)
  storage = "int8" if cfg.quantization else np.dtype(cfg.param_dtype).name
  params_gib = cfg.num_parameters * _bytes_per_value(cfg) / 2**30
  message = (f"{cfg.name} with {cfg.num_layers} layers needs about {need / 2**30:.1f} GiB of host memory "
             f"in {storage} ({params_gib:.1f} GiB of parameters); this host allows {budget / 2**30:.1f} GiB "
             f"({budget_fraction:.0%} of available).")
  if explicit_layers:
    return cfg, message + " Running the requested layer count anyway (--config.model.num_layers was set)."
  reduced = cfg.replace(num_layers=fit)
  return reduced, (message + f" RUNNING A REDUCED VARIANT: {fit} of {cfg.num_layers} layers, every other "
                   "dimension as in the full model. Set --config.model.num_layers to choose, store the "
                   "weights in bfloat16 or int8 (--config.model.param_dtype, --config.model.quantization), "
                   "or run on a host with more memory for the full model.")
