"""Every test process sees 8 simulated CPU devices (set before JAX initialises)."""

import os
import socket

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# One persistent compilation cache per test run: tests build the same programs on the same meshes many
# times (each Partitioner, Generator or Engine compiles its own), and a program seen before loads instead.
_XLA_CACHE = tempfile.mkdtemp(prefix="qwen_logical_tests_xla_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)  # the run's cache goes with the run
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from qwen_logical.sharding.mesh import make_mesh  # noqa: E402

MESHES = ("1x1", "1x8", "2x4", "4x2", "8x1")


def mesh_of(shape: str):
  """The mesh for `shape`; 1x1 uses the first device only."""
  return make_mesh(shape, devices=jax.devices()[:1] if shape == "1x1" else None)


@pytest.fixture(scope="session")
def eight_devices():
  assert len(jax.devices()) == 8, "tests expect 8 simulated CPU devices"
  return jax.devices()


@pytest.fixture
def without_jax_cache():
  """JAX's persistent compilation cache off for one test (every program compiled from scratch)."""
  from jax._src import compilation_cache
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", previous)
  compilation_cache.reset_cache()


def compile_events():
  """(a list that gets one entry per XLA compilation from now on, a function that stops counting)."""
  events = []

  def listener(name, *_args, **_kwargs):
    if name == "/jax/core/compile/backend_compile_duration":
      events.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  return events, lambda: jax.monitoring.unregister_event_duration_listener(listener)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
