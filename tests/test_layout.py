"""The package's layout: rooms along the data flow, no circles, small modules, the README's names.

The import graph is read from the source with `ast` (nothing is imported), function-level imports
included: a deferred import still ties two modules together.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qwen_logical"
README = ROOT / "README.md"

# Rooms in the order data flows through them; a module may import from its own room or one to its
# left. The facade (qwen_logical/__init__.py) re-exports the library and sits after every library
# room; jobs come last, and nothing but a job imports a job.
ROOMS = ("common", "model", "sharding", "checkpoints", "inference", "training", "serving")
FACADE = "qwen_logical"
JOBS = "jobs"
ORDER = {name: i for i, name in enumerate(ROOMS + (FACADE, JOBS))}

MAX_LINES = 300
# Modules allowed over MAX_LINES: {path relative to the repository root: the reason}.
LONG_MODULES: dict[str, str] = {}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  """Dotted name -> file, for every module of the package."""
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _room(module: str) -> str:
  parts = module.split(".")
  return FACADE if len(parts) == 1 else parts[1]


def _imports(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """The package modules `module` imports (`from pkg import submodule` resolves to the submodule)."""
  is_package = path.name == "__init__.py"
  out = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split(".")[:len(module.split(".")) + (1 if is_package else 0) - node.level]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module
      out.add(target)
      out.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known)
  return {name for name in out if name in known and name != module}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_the_graph_is_read():
  graph = _graph()
  rooms = {_room(m) for m in graph}
  assert set(ROOMS) | {FACADE, JOBS} <= rooms, f"rooms found: {sorted(rooms)}"
  assert {_room(m) for m in graph[FACADE]} >= {"model", "sharding", "checkpoints", "inference"}
  assert "qwen_logical.model.axes" in graph["qwen_logical.sharding.rules"]
  unknown = rooms - set(ORDER)
  assert not unknown, f"modules outside the known rooms {list(ORDER)}: {sorted(unknown)}; add the room to ROOMS"


def _upward(graph: dict[str, set[str]]) -> list[str]:
  return [f"{module} -> {target}" for module, targets in sorted(graph.items()) for target in sorted(targets)
          if ORDER[_room(target)] > ORDER[_room(module)]]


def _circles(graph: dict[str, set[str]]) -> list[str]:
  """One entry per back edge found by a depth-first walk: every circle shows up at least once."""
  circles, state = [], {}

  def visit(module: str, stack: list[str]):
    state[module] = "open"
    stack.append(module)
    for target in sorted(graph.get(module, ())):
      if state.get(target) == "open":
        circles.append(" -> ".join(stack[stack.index(target):] + [target]))
      elif target not in state:
        visit(target, stack)
    stack.pop()
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [])
  return circles


def test_no_import_runs_upward():
  upward = _upward(_graph())
  assert not upward, ("imports against the data flow " + " -> ".join(ROOMS) + " (then the facade, then "
                      "jobs); move the shared code to the left room:\n  " + "\n  ".join(upward))


def test_no_import_circles():
  circles = _circles(_graph())
  assert not circles, "import circles (function-level imports count):\n  " + "\n  ".join(circles)


def test_the_checks_catch_what_they_forbid():
  graph = {"qwen_logical.model.layers": {"qwen_logical.sharding.rules"},
           "qwen_logical.sharding.rules": {"qwen_logical.model.axes"},
           "qwen_logical.model.axes": {"qwen_logical.model.layers"},
           "qwen_logical.inference.generate": {"qwen_logical.jobs.run", "qwen_logical.common.errors"},
           "qwen_logical": {"qwen_logical.inference.generate"}}
  assert _upward(graph) == ["qwen_logical.inference.generate -> qwen_logical.jobs.run",
                            "qwen_logical.model.layers -> qwen_logical.sharding.rules"]
  assert _circles(graph) == ["qwen_logical.model.axes -> qwen_logical.model.layers -> "
                             "qwen_logical.sharding.rules -> qwen_logical.model.axes"]


def test_modules_stay_small():
  too_long = []
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = str(path.relative_to(ROOT))
    lines = len(path.read_text(encoding="utf-8").splitlines())
    if lines > MAX_LINES and rel not in LONG_MODULES:
      too_long.append(f"{rel}: {lines} lines")
  assert not too_long, (f"modules over {MAX_LINES} lines; split them by job (or list one in LONG_MODULES "
                        "with the reason):\n  " + "\n  ".join(too_long))
  stale = [p for p in LONG_MODULES if not (ROOT / p).exists()
           or len((ROOT / p).read_text(encoding="utf-8").splitlines()) <= MAX_LINES]
  assert not stale, f"LONG_MODULES entries no longer needed: {stale}"


def _readme_library_names() -> set[str]:
  """`ql.NAME` in the README's python blocks that `import qwen_logical as ql`."""
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
  names = set()
  for block in blocks:
    if "import qwen_logical as ql" in block:
      names.update(re.findall(r"\bql\.([A-Za-z_]\w*)", block))
  return names


def test_readme_library_example_names_exist():
  names = _readme_library_names()
  assert len(names) >= 5, f"README.md should show a library example using `import qwen_logical as ql`: {names}"
  import qwen_logical as ql  # pylint: disable=import-outside-toplevel
  missing = sorted(n for n in names if not hasattr(ql, n))
  assert not missing, f"README.md's library example uses names qwen_logical no longer exports: {missing}"
  not_public = sorted(n for n in names if n not in ql.__all__)
  assert not not_public, f"README.md uses names missing from qwen_logical.__all__: {not_public}"


@pytest.mark.parametrize("source, expected", [
    ("from qwen_logical.model import axes", {"qwen_logical.model", "qwen_logical.model.axes"}),
    ("from . import rules\nfrom .mesh import BATCH", {"qwen_logical.sharding", "qwen_logical.sharding.rules",
                                                      "qwen_logical.sharding.mesh"}),
    ("def f():\n  import qwen_logical.jobs.run", {"qwen_logical.jobs.run"}),
])
def test_imports_are_resolved(tmp_path, source, expected):
  path = tmp_path / "validation.py"
  path.write_text(source)
  known = set(_modules())
  assert _imports("qwen_logical.sharding.validation", path, known) == expected
