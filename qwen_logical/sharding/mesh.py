"""Device meshes from shape strings ("2x4" = batch x model), and CPU device simulation."""

from __future__ import annotations

import os
import re
from qwen_logical.common.errors import QwenLogicalError

BATCH = "batch"
MODEL = "model"
MESH_AXES = (BATCH, MODEL)

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


class MeshError(QwenLogicalError):
  """A mesh shape that is malformed or does not match the available devices."""


def parse_mesh_shape(shape: str) -> tuple[int, int]:
  """'2x4' -> (2, 4): batch x model."""
  match = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", str(shape))
  if not match or 0 in (int(match[1]), int(match[2])):
    raise MeshError(f"Mesh shape {shape!r} is not 'BATCHxMODEL' with positive sizes, e.g. '1x8' or '2x4'.")
  return int(match[1]), int(match[2])


def simulate_cpu_devices(count: int) -> None:
  """Asks XLA for `count` host (CPU) devices. Must run before JAX initialises its backends.

  Raises MeshError if JAX is already running with another device count, since the
  flag would then be silently ignored.
  """
  import jax  # Importing is fine; only backend initialisation reads the flag.
  from jax._src import xla_bridge

  flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
  wanted = f"{flags} {_DEVICE_COUNT_FLAG}={count}".strip()
  if xla_bridge.backends_are_initialized():
    have = jax.local_device_count("cpu") if jax.default_backend() == "cpu" else None
    if have is not None and have != count:
      raise MeshError(
          f"JAX is already running with {have} CPU device(s); {count} were asked for. Set "
          f"XLA_FLAGS={_DEVICE_COUNT_FLAG}={count} before JAX starts (before the first "
          "jax.devices() call), or use a mesh of that many devices.")
    return
  os.environ["XLA_FLAGS"] = wanted
  jax.config.update("jax_num_cpu_devices", count)


def make_mesh(shape: str | tuple[int, int], devices=None):
  """A ('batch', 'model') mesh with Auto axis types over all devices (or `devices`).

  The device count must equal the mesh size: a mesh on a subset of devices would
  leave the rest idle without saying so.
  """
  import jax
  from jax.sharding import AxisType

  dims = parse_mesh_shape(shape) if isinstance(shape, str) else tuple(shape)
  devices = list(jax.devices() if devices is None else devices)
  size = dims[0] * dims[1]
  if len(devices) != size:
    platform = devices[0].platform if devices else "none"
    raise MeshError(
        f"Mesh {dims[0]}x{dims[1]} needs {size} devices but JAX sees {len(devices)} ({platform}). "
        f"On CPU, simulate devices with XLA_FLAGS={_DEVICE_COUNT_FLAG}={size} set before JAX "
        f"starts (main.py does this from --config.num_cpu_devices); otherwise choose a mesh "
        f"whose sizes multiply to {len(devices)}, e.g. --config.mesh=1x{len(devices)}.")
  return jax.make_mesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def mesh_name(mesh) -> str:
  return "x".join(str(mesh.shape[a]) for a in MESH_AXES)


def every_device(mesh):
  """The PartitionSpec that splits an array's first dimension over every device of `mesh` (for
  programs without a model: `programs.build_on_mesh`)."""
  from jax.sharding import PartitionSpec

  return PartitionSpec(tuple(mesh.axis_names))
