"""One process per host: joining the job, and what only process 0 does.

Every other module works on global arrays and meshes; this one holds the few places
where the process boundary shows: starting `jax.distributed`, bringing a global
array to every host, and printing / writing from process 0 only.
"""

from __future__ import annotations

import builtins
import os
import re
import sys
from typing import Callable

from absl import logging

import jax
import numpy as np
from qwen_logical.common.errors import QwenLogicalError
from qwen_logical.common.host import is_main_process


class DistributedError(QwenLogicalError):
  """A multi-process setting that cannot work (bad coordinator, process id, device split)."""


def check_settings(coordinator: str, num_processes: int, process_id: int) -> None:
  """Raises DistributedError naming the flag when explicit multi-process settings are unusable."""
  if not re.fullmatch(r"[^\s:]+:\d{1,5}", coordinator or ""):
    raise DistributedError(f"--config.distributed.coordinator={coordinator!r} is not HOST:PORT (the address of "
                           "process 0, e.g. 10.0.0.1:1234 or 127.0.0.1:12355).")
  if num_processes < 1:
    raise DistributedError(f"--config.distributed.num_processes={num_processes}: give the number of processes "
                           "(one per host) with the coordinator.")
  if not 0 <= process_id < num_processes:
    raise DistributedError(f"--config.distributed.process_id={process_id} must be in [0, {num_processes}) "
                           f"for {num_processes} processes; give each process its own id, 0 on the coordinator.")


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1, *, auto: bool = False,
               cpu: bool = False, initialization_timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> None:
  """Joins this process to the job (call before any other JAX call touches devices).

  Either explicit settings (coordinator HOST:PORT, process count, this process's id) or
  `auto`, where JAX reads the cluster's own environment (SLURM, Open MPI, TPU pods, ...).
  `cpu`: CPU devices talk over gloo (several processes on one machine or across hosts);
  harmless where an accelerator does the work.
  A peer that stops answering for `heartbeat_timeout_s` ends every process with an error.
  """
  if cpu:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if auto:
    jax.distributed.initialize(initialization_timeout=initialization_timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
    return
  check_settings(coordinator, num_processes, process_id)
  jax.distributed.initialize(coordinator, num_processes, process_id,
                             initialization_timeout=initialization_timeout_s,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)


def printer() -> Callable[..., None]:
  """`print` (flushed) on process 0, a no-op elsewhere."""
  if is_main_process():
    return lambda *args, **kwargs: builtins.print(*args, **{"flush": True, **kwargs})
  return lambda *args, **kwargs: None


def global_array(host: np.ndarray, sharding: jax.sharding.Sharding):
  """A host array that is the same on every process, as a global jax.Array with `sharding`.

  Each process builds only its own devices' slices. With one process the numpy array
  is returned as it is (jit places it).
  """
  if jax.process_count() == 1:
    return host
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(array: jax.Array | np.ndarray) -> np.ndarray:
  """The whole of a global array as numpy, on every process (gathered across hosts if needed); numpy as it is."""
  if isinstance(array, np.ndarray) or array.is_fully_addressable:
    return np.asarray(array)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


PEER_FAILED_EXIT_CODE = 3
# What a collective or the coordination service says when another process has gone.
_PEER_FAILURE = re.compile(r"Connection closed by peer|Connection reset by peer|heartbeat timeout|"
                           r"tasks are unhealthy|Gloo \w+ failed|coordination service", re.IGNORECASE)


def peer_failure(error: BaseException) -> str | None:
  """A clear message if `error` means another process of the job died, else None."""
  if jax.process_count() == 1 or not _PEER_FAILURE.search(str(error)):
    return None
  first_line = str(error).strip().splitlines()[0][:300]
  return (f"Process {jax.process_index()} of {jax.process_count()}: another process of this job failed or "
          f"was killed, so this one stops too (exit code {PEER_FAILED_EXIT_CODE}). Look at the other "
          f"processes' logs for the cause. JAX said: {first_line}")


def exit_on_peer_failure(fn: Callable, *args, **kwargs):
  """fn(*args, **kwargs); if a peer process died, logs why and exits at once.

  Exiting with os._exit skips jax.distributed's shutdown barrier, which would
  otherwise wait for the dead peer and then abort with a C++ stack trace.
  """
  try:
    return fn(*args, **kwargs)
  except Exception as error:  # noqa: BLE001 (re-raised unless it is a peer failure)
    message = peer_failure(error)
    if message is None:
      raise
    logging.error(message)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(PEER_FAILED_EXIT_CODE)
