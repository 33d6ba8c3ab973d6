"""One process per host: joining the job, and what only process 0 does.

Every other module works on global arrays and meshes; this one holds the few places
where the process boundary shows: starting `jax.distributed`, bringing a global
array to every host, and printing / writing from process 0 only.
"""

from __future__ import annotations

import builtins
from typing import Callable

import jax
import numpy as np


def is_main_process() -> bool:
  return jax.process_index() == 0


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


def to_host(array: jax.Array) -> np.ndarray:
  """The whole of a global array as numpy, on every process (gathered across hosts if needed)."""
  if array.is_fully_addressable:
    return np.asarray(array)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))
