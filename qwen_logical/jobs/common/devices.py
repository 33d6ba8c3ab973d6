"""Device setup before JAX starts: simulated CPU devices, the platform, joining a multi-process job."""

from __future__ import annotations

from absl import logging
from ml_collections import ConfigDict

from qwen_logical.sharding import distributed
from qwen_logical.sharding.mesh import simulate_cpu_devices


def setup_devices(config: ConfigDict, devices_needed: int) -> None:
  """Makes `devices_needed` devices available to the job (over all its processes).

  Reads config.platform, config.num_cpu_devices and config.distributed only. Runs before
  JAX initialises. On CPU each process simulates its share of the devices (all of them
  when alone; --config.num_cpu_devices, per process, overrides); accelerators bring their own.
  """
  d = config.distributed
  multi = bool(d.coordinator) or d.auto
  processes = d.num_processes if multi and d.num_processes > 0 else 1
  if config.num_cpu_devices > 0:
    count = config.num_cpu_devices
  elif devices_needed % processes == 0:
    count = devices_needed // processes
  else:
    raise distributed.DistributedError(
        f"the job needs {devices_needed} devices, which do not split evenly over "
        f"--config.distributed.num_processes={d.num_processes}; set --config.num_cpu_devices (per process) "
        "or use a mesh whose size is a multiple of the process count.")
  on_cpu = config.platform in ("", "cpu")
  if on_cpu:
    simulate_cpu_devices(count)
  if config.platform:
    import jax
    jax.config.update("jax_platforms", config.platform)
  if multi:
    _join(d, on_cpu)


def _join(d: ConfigDict, on_cpu: bool) -> None:
  import jax
  distributed.initialize(d.coordinator, d.num_processes, d.process_id, auto=d.auto, cpu=on_cpu,
                         initialization_timeout_s=d.initialization_timeout_s,
                         heartbeat_timeout_s=d.heartbeat_timeout_s)
  if not distributed.is_main_process():
    logging.set_verbosity(logging.WARNING)
  logging.info("Process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
