"""The one program builder: programs get their shardings from logical names under the rule table, the
package builds no program and no sharding elsewhere, and compiled programs are kept on disk and
loaded (without tracing) only for the same source, owner, name and arguments."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from conftest import compile_events, mesh_of
from hf_reference import model_config, tiny_hf_model
from qwen_logical.model import axes as ax
from qwen_logical.sharding import programs
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.program_store import ProgramStore
from qwen_logical.sharding.rules import get_table

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qwen_logical")


def _partitioner(mesh="2x4", table="tensor_parallel"):
  return Partitioner(model_config(tiny_hf_model(heads=4, kv_heads=2)), mesh_of(mesh), get_table(table))


def _double_rows():
  """A program of (params, x [B, L, E]) -> (x * 2 (activation_batch, length, embed), the sum replicated)."""
  part = _partitioner()
  fn = lambda params, x: (x * 2, jnp.sum(x) + 0 * params["final_norm"]["scale"][0])
  return part, part.program(fn, in_axes=(programs.PARAMS, ax.EMBED_ACTIVATION),
                            out_axes=(ax.EMBED_ACTIVATION, programs.REPLICATED), name="double_rows", keep=True)


def test_shardings_come_from_the_logical_names():
  part, program = _double_rows()
  x = np.arange(8 * 3 * 32, dtype=np.float32).reshape(8, 3, 32)
  doubled, total = program(part.init(progress=False), x)
  assert doubled.sharding.spec == part.sharding(ax.EMBED_ACTIVATION).spec == PartitionSpec("batch", None, None)
  assert total.sharding.is_fully_replicated and float(total) == float(x.sum())
  np.testing.assert_array_equal(np.asarray(doubled), 2 * x)


def test_only_the_builder_builds_programs_and_only_sharding_builds_shardings():
  jits, shardings = [], []
  for folder, _, files in os.walk(PACKAGE):
    for name in (f for f in files if f.endswith(".py")):
      path = os.path.join(folder, name)
      text = open(path).read()
      relative = os.path.relpath(path, PACKAGE)
      if re.search(r"jax\.jit\b|@jit\b|from jax import jit", text):
        jits.append(relative)
      if re.search(r"NamedSharding\(|PartitionSpec\(", text) and not relative.startswith("sharding"):
        shardings.append(relative)
  assert jits == [os.path.join("sharding", "programs.py")]
  assert shardings == []


def test_a_kept_program_is_loaded_for_the_same_key_only(tmp_path, monkeypatch, without_jax_cache):
  store = ProgramStore(str(tmp_path))
  monkeypatch.setattr(programs, "_STORE", store)
  part, program = _double_rows()
  args = (part.param_shapes, jax.ShapeDtypeStruct((8, 3, 32), jnp.float32))
  program.compile(*args)
  assert len(os.listdir(tmp_path)) == 1
  loaded_before = programs.COUNTS.loaded
  events, stop = compile_events()
  try:
    again = _double_rows()[1].compile(*args)  # another Program object: the same key
  finally:
    stop()
  assert events == [] and programs.COUNTS.loaded == loaded_before + 1
  x = np.ones((8, 3, 32), np.float32)
  np.testing.assert_array_equal(np.asarray(again(part.init(progress=False), x)[0]), 2 * x)
  # Another shape, another owner (mesh), another name: other keys.
  keys = {store.key(part.fingerprint, "double_rows", args),
          store.key(part.fingerprint, "double_rows", (args[0], jax.ShapeDtypeStruct((8, 5, 32), jnp.float32))),
          store.key(_partitioner("1x8").fingerprint, "double_rows", args),
          store.key(part.fingerprint, "other", args)}
  assert len(keys) == 4
  # A damaged entry is compiled again (and rewritten), never an error.
  [entry] = os.listdir(tmp_path)
  with open(tmp_path / entry, "wb") as f:
    f.write(b"not a program")
  devices = part.mesh.devices.flat
  assert store.load(entry, devices) is None
  program.compile(*args)
  assert store.load(entry, devices) is not None


def test_kept_inference_programs_are_named_by_every_size_they_close_over(tmp_path, monkeypatch, without_jax_cache):
  """The empty cache takes no argument: its name carries its rows and slots, so caches of two sizes
  are two entries (one name for both once loaded a 64-slot cache where 192 were needed)."""
  from qwen_logical.inference.programs import CachePrograms
  monkeypatch.setattr(programs, "_STORE", ProgramStore(str(tmp_path)))
  part = _partitioner("1x1")
  for _ in range(2):  # the second round loads what the first kept
    for slots in (64, 192):
      cache = CachePrograms(part, 2, slots, steps=4).new_cache()
      assert {leaf.shape[-2] for leaf in jax.tree_util.tree_leaves(cache["kv"])} == {slots}
  assert len(os.listdir(tmp_path)) == 2


def test_a_program_loaded_from_jax_cache_is_not_kept(tmp_path, monkeypatch):
  """JAX's own cache deserializes executables that do not serialize whole again on XLA:CPU, so the
  store keeps only programs compiled from scratch."""
  monkeypatch.setattr(programs, "_STORE", ProgramStore(str(tmp_path / "programs")))
  settings = {"jax_compilation_cache_dir": str(tmp_path / "jax"), "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  previous = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  try:
    from jax._src import compilation_cache
    compilation_cache.reset_cache()
    part, program = _double_rows()
    args = (part.param_shapes, jax.ShapeDtypeStruct((8, 7, 32), jnp.float32))
    program.compile(*args)  # compiled: kept (and written to JAX's cache)
    kept = os.listdir(tmp_path / "programs")
    for entry in kept:
      os.remove(tmp_path / "programs" / entry)
    _double_rows()[1].compile(*args)  # from JAX's cache now: not kept
    assert len(kept) == 1 and os.listdir(tmp_path / "programs") == []
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()
