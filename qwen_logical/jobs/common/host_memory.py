"""Host memory of one run on CPU, in one place: an estimate from the config before anything is built
(which storage dtype, whether a reduced variant), then a bound from the compiled programs before any
weight exists, then the measured peak.

On XLA:CPU every (simulated) device lives in this process, so a run's peak resident memory is the
process's own plus the devices'.

**From the config** (`run_host_bytes`: `storage_dtype`, `fit_layers_to_host`), about

    process overhead + stored parameters + converted-weight temporaries

* stored parameters: HF parameter count x bytes per value (int8: 1, plus float32 scales), +5% for
  the head layout's padding and repetition on up to 8 model shards;
* converted-weight temporaries: weights stored in another dtype than the compute dtype are
  converted inside each product a block of rows at a time (model/projections.py); 3.5 layers in
  float32 bounds that and the compiler's transient memory (the 7B in bf16 on 1x8: 16.6 GB peak);
* the hash init writes each parameter straight into its shards (no temporaries of its size).

Measured 2026-11-25: `python main.py` (the whole 7B in bf16 on 1x8) peaks at 16.8 GB (estimate 20.3 GB).

**From the compiled programs** (`estimate`, for each run of verify_large), a bound of

    overhead + parameters + max(forward temporaries + outputs, init temporaries) + host logits

* overhead: this process's peak resident memory so far, measured once JAX is up and the forward
  is compiled (Python, JAX, the XLA runtime and the compiler's own transient memory);
* parameters: every device's stored parameter bytes, replicas included (from the shardings);
* forward: the compiled forward's temporaries and outputs per device (XLA's buffer assignment,
  `compiled.memory_analysis()`), summed over the devices;
* init: the largest temporaries of one sharded-init program, summed over the devices (an int8
  kernel's float32 values before its scales exist; a bf16 init fuses into its output: none);
* temporaries include, per device, the operands of the largest YNNPACK fusion: XLA:CPU's YNNPACK
  fusions allocate outside buffer assignment (the int8 init of the 7B's embedding on one device
  peaks 1.3 GiB above memory_analysis()'s 2.5 GiB, whose float32 operand is 2.0 GiB; with
  --xla_cpu_experimental_ynn_fusion_type= they agree exactly), so their operands bound it;
* host logits: the float32 [B, L, V] copy brought to the host.

Weights exist in the forward and in init, never both with the other's temporaries, hence the max.
Both compare against `allowance_bytes(fraction)`: the host's available memory times a fraction.
"""

from __future__ import annotations

import dataclasses
import math
import re
import resource
import sys

import numpy as np

from qwen_logical.common import host
from qwen_logical.model.config import ModelConfig
from qwen_logical.sharding.collectives import shape_bytes
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.report import sharding_report

GiB = 2**30
PROCESS_OVERHEAD_BYTES = 10**9  # Python, JAX, XLA and the compiler, measured ~0.6-0.9 GB
LAYOUT_OVERHEAD = 1.05
CONVERTED_LAYERS = 3.5


def allowance_bytes(fraction: float) -> int:
  """What a run may use now: the host's available memory times `fraction`."""
  return int(host.available_host_bytes() * fraction)


def size_text(nbytes: float) -> str:
  """'17.9 GiB', or '312 MiB' under a GiB (tiny models)."""
  return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.0f} MiB"


# --- from the config --------------------------------------------------------------------------------
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


def storage_dtype(cfg: ModelConfig, fraction: float) -> tuple[str, str]:
  """(param_dtype, message) for --config.model.param_dtype='' (auto): float32, the fast path on CPU,
  when the model fits this host in float32; else bfloat16 (half the memory, slower matrix products)."""
  budget = allowance_bytes(fraction)
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
  budget = allowance_bytes(budget_fraction)
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


# --- from the compiled programs, and measured -------------------------------------------------------
def _status_bytes(field: str) -> int | None:
  """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is no procfs."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def peak_rss_bytes() -> int:
  """This process's peak resident memory so far (VmHWM; getrusage's ru_maxrss where there is no procfs)."""
  peak = _status_bytes("VmHWM")
  if peak is None:
    peak = maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
  return peak


def maxrss_bytes(ru_maxrss: int) -> int:
  """getrusage/wait4's ru_maxrss in bytes (kilobytes on Linux, bytes on macOS)."""
  return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024


def param_bytes(partitioner: Partitioner) -> int:
  """Stored parameter bytes over every device of the mesh, replicas included (from the shardings)."""
  return sum(sharding_report(partitioner).bytes_by_device.values())


# "%name = f32[128,3584]{1,0} op(...)" (a tuple-shaped instruction does not match: no operand of interest)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[^\s=]+)\s*=\s*(?P<shape>[a-z]+\d*\[[\d,]*\])")
_YNN_FUSION = re.compile(r"\bfusion\((?P<operands>[^)]*)\).*__ynn_fusion")


def ynn_workspace_bytes(hlo_text: str) -> int:
  """Per device, the operand bytes of the largest YNNPACK fusion in a compiled module's text (0 if none).

  Operands print before their users, so one pass over the text knows every operand's shape.
  """
  sizes: dict[str, int] = {}
  worst = 0
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    sizes[match["name"]] = shape_bytes(match["shape"])
    fusion = _YNN_FUSION.search(line)
    if fusion:
      operands = (name.strip().lstrip("%") for name in fusion["operands"].split(","))
      worst = max(worst, sum(sizes.get(name, 0) for name in operands))
  return worst


def program_bytes(compiled, devices: int) -> tuple[int, int]:
  """(temporaries, outputs) of a compiled SPMD program, summed over its `devices` (XLA reports one
  device's); temporaries include the largest YNNPACK fusion's operands (the module docstring says why)."""
  stats = compiled.memory_analysis()
  temp = int(stats.temp_size_in_bytes) + ynn_workspace_bytes(compiled.as_text())
  return devices * temp, devices * int(stats.output_size_in_bytes)


def init_temp_bytes(partitioner: Partitioner) -> int:
  """The largest temporaries of one sharded-init program, summed over the devices (compiles each, ~1 s
  for the 7B: one small program per parameter kind)."""
  from qwen_logical.sharding.init import init_programs
  devices = partitioner.mesh.devices.size
  seed, layer = np.uint32(0), np.int32(0)
  return max((program_bytes(program.lower(seed, layer).compile(), devices)[0]
              for program in init_programs(partitioner).values()), default=0)


@dataclasses.dataclass(frozen=True)
class HostEstimate:
  """The pieces of one run's host-memory bound, in bytes (see the module docstring)."""

  overhead: int
  params: int
  forward_temp: int
  forward_output: int
  init_temp: int
  host_logits: int

  @property
  def total(self) -> int:
    return (self.overhead + self.params + max(self.forward_temp + self.forward_output, self.init_temp)
            + self.host_logits)

  def describe(self) -> str:
    """'process 0.4 + parameters 14.6 + forward temporaries 2.9 + outputs 0.1 + host logits 0.1 GiB'."""
    parts = [("process", self.overhead), ("parameters", self.params)]
    if self.init_temp > self.forward_temp + self.forward_output:
      parts.append(("init temporaries", self.init_temp))
    else:
      parts += [("forward temporaries", self.forward_temp), ("outputs", self.forward_output)]
    parts.append(("host logits", self.host_logits))
    return " + ".join(f"{name} {value / GiB:.2f}" for name, value in parts) + " GiB"

  def to_dict(self) -> dict[str, int]:
    return {**dataclasses.asdict(self), "total": self.total}


def estimate(partitioner: Partitioner, compiled_forward, logits_shape: tuple[int, ...]) -> HostEstimate:
  """The bound for running `compiled_forward` (already compiled) on freshly initialised weights.

  Call it before any weight exists: the overhead is the process's peak so far.
  """
  devices = partitioner.mesh.devices.size
  forward_temp, forward_output = program_bytes(compiled_forward, devices)
  return HostEstimate(overhead=peak_rss_bytes(), params=param_bytes(partitioner), forward_temp=forward_temp,
                      forward_output=forward_output, init_temp=init_temp_bytes(partitioner),
                      host_logits=math.prod(logits_shape) * np.dtype(np.float32).itemsize)


def over_allowance(estimate_: HostEstimate, allowance: int, fraction: float) -> str:
  """The reason a run is skipped ('needs 30.4 GiB (...), this host allows 16.1 GiB ...'), or "" when it fits."""
  if estimate_.total <= allowance:
    return ""
  return (f"needs {size_text(estimate_.total)} ({estimate_.describe()}), this host allows "
          f"{size_text(allowance)} ({fraction:.0%} of the memory available when it started; "
          "--config.verify.host_memory_fraction)")
