"""The one program builder: a function plus the logical axis names of its inputs and outputs
becomes a compiled, sharded program (in the spirit of T5X's `Partitioner.partition`).

    program = build(partitioner, step, in_axes=(PARAMS, CACHE, ("activation_batch",), REPLICATED),
                    out_axes=(CACHE, REPLICATED), donate=(1,), name="decode")
    program(params, cache, tokens, seed)            # traced and compiled on first call
    program.compile(*abstract_args)                 # ahead of time (warm-up)

Axes are pytrees like the arguments, whose leaves are logical-name tuples (or PartitionSpecs of
logical names: the partitioner's `logical_specs`); `()` (REPLICATED) replicates, None leaves the
choice to XLA. The rule table resolves them to shardings (`Partitioner.sharding`), and the rule
table and abstract mesh are entered inside the traced function, so the program never depends on an
ambient context. Nothing outside this module calls `jax.jit`.

Every compilation is counted process-wide (`COUNTS`): compiled from scratch, or loaded from JAX's
persistent compilation cache (`enable_compilation_cache`).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Callable, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from qwen_logical.sharding.program_store import ProgramStore

REPLICATED: tuple = ()  # a replicated array (scalars, per-row host state)
PARAMS = "<the parameter tree's logical names>"  # Partitioner.program puts its logical_specs here


def is_names(node) -> bool:
  """Whether `node` is one array's logical names: a PartitionSpec, or a tuple of str/None."""
  return isinstance(node, PartitionSpec) or (
      isinstance(node, tuple) and all(isinstance(n, str) or n is None for n in node))


def resolve(partitioner, axes) -> Any:
  """A tree of logical-name leaves -> the same tree of NamedSharding under the partitioner's table
  (None leaves stay None: unspecified; Sharding leaves stay as they are: the arrays of another
  partitioner on the same mesh, such as a draft model's)."""
  keep = lambda node: isinstance(node, jax.sharding.Sharding)
  return jax.tree_util.tree_map(lambda n: n if keep(n) else partitioner.sharding(tuple(n)), axes,
                                is_leaf=lambda n: is_names(n) or keep(n))


@dataclasses.dataclass
class CompileCounts:
  """Process-wide XLA compilations: `compiled` from scratch, `loaded` from the persistent cache."""

  compiled: int = 0
  loaded: int = 0

  def snapshot(self) -> tuple[int, int]:
    return self.compiled, self.loaded


COUNTS = CompileCounts()
_LOCK = threading.Lock()
_THIS_THREAD = threading.local()  # .jax_cache_hits: hits of JAX's cache in this thread (events fire where they happen)


def _on_event(name: str, *_args, **_kwargs) -> None:
  if name == "/jax/compilation_cache/cache_hits":
    _THIS_THREAD.jax_cache_hits = getattr(_THIS_THREAD, "jax_cache_hits", 0) + 1
  with _LOCK:
    if name == "/jax/compilation_cache/cache_hits":
      COUNTS.loaded += 1
    elif name == "/jax/compilation_cache/cache_misses":
      COUNTS.compiled += 1


def _on_duration(name: str, *_args, **_kwargs) -> None:
  # Without a persistent cache there are no hit/miss events: every backend compile is from scratch.
  if name == "/jax/core/compile/backend_compile_duration" and not _cache_enabled():
    with _LOCK:
      COUNTS.compiled += 1


jax.monitoring.register_event_listener(_on_event)
jax.monitoring.register_event_duration_secs_listener(_on_duration)


def _cache_enabled() -> bool:
  return bool(jax.config.jax_compilation_cache_dir)


_STORE: ProgramStore | None = None  # compiled programs on disk (`program_store`), when the cache is on


def enable_compilation_cache(directory: str) -> bool:
  """Turns the compilation caches on in `directory` ("" leaves them off): JAX's persistent cache
  (XLA executables by their HLO) and, for a single process, the program store (executables by
  what shapes them: no tracing on a hit). A later run on this machine loads its programs instead
  of compiling them. Returns whether they are on."""
  global _STORE
  if not directory:
    return False
  directory = os.path.expanduser(directory)
  os.makedirs(directory, exist_ok=True)
  if jax.process_count() == 1:
    _STORE = ProgramStore(os.path.join(directory, "programs"))
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # small programs count too
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return True


class Program:
  """One function compiled for one mesh and rule table: call it like the function."""

  def __init__(self, name: str, jitted, owner: str = "", devices=()):
    self.name = name
    self._jitted = jitted
    self._owner = owner  # what shapes the program besides its arguments (`program_store`)
    self._devices = tuple(devices)  # where a loaded program runs (its mesh's devices, in mesh order)

  def __call__(self, *args):
    return self._jitted(*args)

  def lower(self, *args):
    """Lowered for these (abstract or concrete) arguments: HLO, cost analysis."""
    return self._jitted.lower(*args)

  def compile(self, *args):
    """Compiled for these (abstract) arguments; call the result with concrete ones. With the
    compilation cache on, a program compiled before on this machine is loaded instead."""
    store = _STORE if self._owner else None
    key = store.key(self._owner, self.name, args) if store else None
    compiled = store.load(key, self._devices) if store else None
    if compiled is not None and not _same_inputs(compiled, args):
      compiled = None  # a name that does not determine its program: compile, keep the right one
    if compiled is not None:
      with _LOCK:
        COUNTS.loaded += 1
      return compiled
    hits = getattr(_THIS_THREAD, "jax_cache_hits", 0)
    compiled = self._jitted.lower(*args).compile()
    # An executable that JAX's cache deserialized does not serialize whole again on XLA:CPU (loaded
    # later, it misses its kernels: "Function ... not found"): keep only what was compiled here.
    if store and getattr(_THIS_THREAD, "jax_cache_hits", 0) == hits:
      store.save(key, compiled)
    return compiled


def _same_inputs(compiled, args) -> bool:
  """Whether a loaded program takes arguments of these shapes and dtypes."""
  wanted = [(tuple(a.shape), str(a.dtype)) for a in jax.tree_util.tree_leaves(args)]
  taken = [(tuple(a.shape), str(a.dtype)) for a in jax.tree_util.tree_leaves(compiled.in_avals)]
  return wanted == taken


def build(partitioner, fn: Callable, *, in_axes: Sequence | None = None, out_axes=None,
          donate: Sequence[int] = (), name: str | None = None, keep: bool = False) -> Program:
  """`fn` as a Program whose inputs and outputs are sharded by their logical names.

  in_axes: one axes tree per positional argument (None: XLA chooses); out_axes: one for the
  result; donate: positions of arguments whose buffers the result may reuse (the KV cache, the
  training state). The rule table and abstract mesh are entered inside the trace.
  keep: the compiled program may be kept on disk and loaded by later runs (`program_store`);
  only for a program whose `name` and arguments determine it (every size it closes over is in
  its name).
  """
  def bound(*args):
    with partitioner.bound():
      return fn(*args)

  kwargs = {"donate_argnums": tuple(donate)}
  if in_axes is not None:
    kwargs["in_shardings"] = tuple(resolve(partitioner, a) if a is not None else None for a in in_axes)
  if out_axes is not None:
    kwargs["out_shardings"] = resolve(partitioner, out_axes)
  bound.__name__ = name or getattr(fn, "__name__", "program")
  return Program(bound.__name__, jax.jit(bound, **kwargs), owner=partitioner.fingerprint if keep else "",
                 devices=partitioner.mesh.devices.flat)


def build_on_mesh(mesh: jax.sharding.Mesh, fn: Callable, *, out_spec: PartitionSpec, name: str) -> Program:
  """`fn` on a mesh without a model (calibration), its output sharded by mesh axes `out_spec`."""
  fn.__name__ = name
  return Program(name, jax.jit(fn, out_shardings=NamedSharding(mesh, out_spec)))
