"""Compiled programs kept on disk, so a restart on the same machine loads them without tracing.

JAX's persistent compilation cache (also on) skips XLA's compilation, but it still traces and
lowers every program to find its key: about a second per program for the 24 unrolled layers of a
0.5B model. This store keys a serialized executable by everything that shapes it instead:

* the package's source and the jax / jaxlib / flax versions (any code change is a new key);
* the program's owner (model config, head layout, rule table, mesh devices and platform);
* the program's name and its arguments' tree, shapes, dtypes and shardings.

A missing, unreadable or incompatible entry is compiled as usual (and written again); nothing is
ever loaded for another key. Only single-process jobs use it: with several processes every one
traces, and JAX's cache serves them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import tempfile
from typing import Any

import flax
import jax
import jaxlib
from absl import logging
from jax.experimental import serialize_executable

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
  """A hash of every .py file of the package and of the versions of what compiles it."""
  digest = hashlib.sha256(f"{jax.__version__} {jaxlib.__version__} {flax.__version__}".encode())
  for folder, _, files in sorted(os.walk(PACKAGE)):
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(folder, name)
      digest.update(os.path.relpath(path, PACKAGE).encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def describe_args(args) -> str:
  """The arguments' tree and each leaf's shape, dtype and sharding (not their values)."""
  leaves, tree = jax.tree_util.tree_flatten(args)
  shown = [(tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)),
            repr(getattr(x, "sharding", None))) for x in leaves]
  return f"{tree}|{shown}"


class ProgramStore:
  """Serialized executables under `directory`, one file per key."""

  def __init__(self, directory: str):
    self.directory = directory
    os.makedirs(directory, exist_ok=True)

  def key(self, owner: str, name: str, args) -> str:
    text = "\n".join((source_fingerprint(), owner, name, describe_args(args)))
    return hashlib.sha256(text.encode()).hexdigest()

  def load(self, key: str, devices) -> Any | None:
    """The program kept under `key`, loaded to run on `devices` (its mesh's, in mesh order), or None."""
    path = os.path.join(self.directory, key)
    if not os.path.exists(path):
      return None
    try:
      with open(path, "rb") as f:
        return serialize_executable.deserialize_and_load(*pickle.load(f), execution_devices=list(devices))
    except Exception as e:  # noqa: BLE001 (a damaged or foreign entry is compiled again)
      logging.warning("Compiled program %s could not be loaded (%s: %s); compiling it again", key[:12],
                      type(e).__name__, e)
      return None

  def save(self, key: str, compiled) -> None:
    try:
      blob = pickle.dumps(serialize_executable.serialize(compiled))
    except Exception as e:  # noqa: BLE001 (some executables cannot be serialized: they are just not kept)
      logging.info("Compiled program %s is not kept on disk (%s)", key[:12], e)
      return
    handle, tmp = tempfile.mkstemp(dir=self.directory)
    with os.fdopen(handle, "wb") as f:
      f.write(blob)
    os.replace(tmp, os.path.join(self.directory, key))  # readers see a whole file or none
