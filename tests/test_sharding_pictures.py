"""The sharding pictures: every grid cell names exactly the devices that hold its block, on every mesh
and table (checked against the addressable shards of placed arrays); head marks; memory; drawing."""

import json
import re

import jax
import numpy as np
import pytest

from conftest import MESHES, mesh_of
from qwen_logical.inference.kv_cache import cache_shape
from qwen_logical.model import axes as ax
from qwen_logical.model.config import preset
from qwen_logical.model.head_layout import HeadLayoutError
from qwen_logical.sharding.layout_draw import draw, use_color
from qwen_logical.sharding.layout_grid import PARAM_CLASSES, Grid
from qwen_logical.sharding.layout_view import sharding_view
from qwen_logical.sharding.partitioner import Partitioner, path_str
from qwen_logical.sharding.report import sharding_report
from qwen_logical.sharding.rules import RuleError, TABLES, get_table

TABLE_NAMES = ("tensor_parallel", "data_parallel", "fsdp", "tp_fsdp")
BATCH, LENGTH = 8, 4
_VIEWS: dict = {}


def _view(mesh_shape: str, table: str, **changes):
  """(partitioner, view) of the tiny model (14 query / 2 KV heads, as the 0.5B), cached per combination."""
  key = (mesh_shape, table, tuple(sorted(changes.items())))
  if key not in _VIEWS:
    cfg = preset("tiny").replace(**changes)
    try:
      part = Partitioner(cfg, mesh_of(mesh_shape), get_table(table))
    except (RuleError, HeadLayoutError) as e:
      pytest.skip(f"{mesh_shape} {table} does not fit the tiny model: {e}")
    _VIEWS[key] = part, sharding_view(part, BATCH, LENGTH, cache_shape(cfg, part.layout, BATCH, LENGTH))
  return _VIEWS[key]


def _blocks_of(grid: Grid) -> dict:
  """Block (start, stop per dimension) -> device ids, as the grid's cells say."""
  out = {}
  for r, row in enumerate(grid.cells):
    for c, devices in enumerate(row):
      out[tuple((s.start, s.stop) for s in grid.block(r, c))] = set(devices)
  return out


def _blocks_held(array) -> dict:
  """Block -> device ids, from the array's real addressable shards."""
  out: dict = {}
  for shard in array.addressable_shards:
    key = tuple((s.start or 0, size if s.stop is None else s.stop) for s, size in zip(shard.index, array.shape))
    out.setdefault(key, set()).add(shard.device.id)
  return out


def _class_of(path: str) -> str | None:
  bare = re.sub(r"^layers(_\d+)?/", "", path)
  return next((name for name, pattern in PARAM_CLASSES if re.fullmatch(pattern, bare)), None)


@pytest.mark.parametrize("table", TABLE_NAMES)
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_cells_are_the_devices_that_hold_each_block(mesh_shape, table):
  part, view = _view(mesh_shape, table)
  devices = {d.id for d in part.mesh.devices.flat}
  assert [d for row in view.mesh.devices for d in row] == [d.id for d in part.mesh.devices.flat]
  for grid in view.grids:  # every cell one block, every device in one cell
    held = [d for row in grid.cells for cell in row for d in cell]
    assert sorted(held) == sorted(devices), grid.name
  by_layout = {(g.name, g.shape, g.logical, g.mesh_axes): g for g in view.grids}
  logical = jax.tree_util.tree_leaves(part.logical_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  leaves = jax.tree_util.tree_leaves_with_path(part.param_shapes)
  checked = set()
  for (path, shape), names, sharding in zip(leaves, logical, jax.tree_util.tree_leaves(part.param_shardings)):
    name = _class_of(path_str(path))
    if name is None:
      continue
    array = jax.device_put(np.zeros(shape.shape, np.int8), sharding)  # a placed tiny array, as the param is
    spec = tuple(sharding.spec) + (None,) * (len(shape.shape) - len(sharding.spec))
    key = (name, tuple(shape.shape), tuple(names), tuple(str(a) if not isinstance(a, tuple) else "+".join(a)
                                                           for a in spec))
    grid = by_layout[key]
    assert _blocks_of(grid) == _blocks_held(array), (path_str(path), grid.name)
    checked.add(grid.name)
  assert {"q kernel", "k/v kernels", "o kernel", "MLP in (gate, up)", "MLP out (down)", "embedding", "lm_head",
          "norms"} <= checked
  for name, logical_names in (("activations at the block boundary", ax.EMBED_ACTIVATION), ("KV cache", ax.KV_CACHE)):
    grid = next(g for g in view.grids if g.name == name)
    array = jax.device_put(np.zeros(grid.shape, np.int8), part.sharding(logical_names))
    assert _blocks_of(grid) == _blocks_held(array), name


def test_padded_and_repeated_heads_are_marked():
  part, view = _view("1x8", "tensor_parallel")  # 14 query / 2 KV heads on 8 shards: KV x4, groups 7 -> 8
  q = next(g for g in view.grids if g.name == "q kernel")
  assert q.cols.marks == ("q 0-1", "q 2-3", "q 4-5", "q 6 +1 pad", "q 7-8", "q 9-10", "q 11-12", "q 13 +1 pad")
  assert [cell for row in q.cells for cell in row] == [(d,) for d in range(8)]
  kv = next(g for g in view.grids if g.name == "KV cache")
  assert kv.cols.marks[:5] == ("kv 0 copy 1/4", "kv 0 copy 2/4", "kv 0 copy 3/4", "kv 0 copy 4/4", "kv 1 copy 1/4")
  _, dp = _view("2x4", "data_parallel")
  assert all(not any(g.rows.marks + g.cols.marks) for g in dp.grids if g.name != "activations at the block boundary")


def test_one_grid_per_distinct_layout_not_per_layer():
  _, view = _view("2x4", "tensor_parallel")
  names = [g.name for g in view.grids]
  assert names == ["q kernel", "k/v kernels", "o kernel", "MLP in (gate, up)", "MLP out (down)", "embedding",
                   "lm_head", "norms", "activations at the block boundary", "KV cache"]
  assert next(g for g in view.grids if g.name == "k/v kernels").members == (
      "layers_*/attention/k_kernel (2 layers), layers_*/attention/v_kernel (2 layers)")
  _, tied = _view("2x4", "tensor_parallel", tie_word_embeddings=True)
  assert "lm_head" not in [g.name for g in tied.grids]


def test_memory_per_device_matches_the_arrays():
  part, view = _view("2x4", "tp_fsdp")
  expected = sharding_report(part).bytes_by_device
  assert {str(m.device): m.params for m in view.memory} == expected
  kv = next(g for g in view.grids if g.name == "KV cache")
  block = np.prod([s.stop - s.start for s in kv.block(0, 0)]) * 4
  assert all(m.kv_cache == 2 * part.config.num_layers * block for m in view.memory)
  # tiny (vocab 256, hidden 112): the hidden states [8/2, 4, 112] outweigh the logits [8/2, 4, 256/4].
  assert view.activation == "hidden states [8, 4, 112]" and view.memory[0].activation == 4 * 4 * 112 * 4
  # Tensor parallel on 2x4 replicates the weights over 'batch' and repeats each KV head twice.
  _, tp = _view("2x4", "tensor_parallel")
  assert tp.memory[0].kv_cache == 2 * tp.even_share["kv_cache"]
  assert 2 <= tp.memory[0].params / tp.even_share["params"] < 2.5  # and the padded / repeated heads


def test_the_report_carries_cells_to_devices():
  _, view = _view("2x4", "tensor_parallel")
  data = json.loads(json.dumps(view.to_dict()))
  assert data["mesh"] == {"axes": ["batch", "model"], "shape": [2, 4], "devices": [[0, 1, 2, 3], [4, 5, 6, 7]],
                          "processes": [[0] * 4, [0] * 4]}
  q = data["layouts"][0]
  assert q["name"] == "q kernel" and q["cells"] == [[[0, 4], [1, 5], [2, 6], [3, 7]]]
  assert q["cols"]["spans"] == [[[0, 4]], [[4, 8]], [[8, 12]], [[12, 16]]] and q["rows"]["spans"] == [[]]
  assert [m["device"] for m in data["memory"]["devices"]] == list(range(8))


@pytest.mark.parametrize("mesh_shape", ["2x4", "1x8"])
def test_plain_drawing_names_every_device(mesh_shape):
  _, view = _view(mesh_shape, "tensor_parallel")
  text = draw(view.to_dict(), color=False)
  assert "\x1b[" not in text and text.isascii()
  sections = re.split(r"\n(?=[A-Za-z])", text)
  for name in ("mesh", "q kernel", "k/v kernels", "o kernel", "MLP in", "MLP out", "embedding", "KV cache"):
    section = next(s for s in sections if s.startswith(name))
    named = {int(d) for cell in re.findall(r"CPU ([\d,]+)", section) for d in cell.split(",")}
    assert named == set(range(8)), (name, section)
  assert "+1 pad" in text and "copy 2/" in text and "Memory per device" in text
  assert ("CPU 0,4" in text) == (mesh_shape == "2x4")


def test_the_mesh_names_each_devices_process_when_there_are_several():
  _, view = _view("2x4", "tensor_parallel")
  data = view.to_dict()
  assert "process" not in draw(data, color=False).split("q kernel")[0]
  data["mesh"]["processes"] = [[0] * 4, [1] * 4]  # as two processes of four devices each report it
  mesh = draw(data, color=False).split("q kernel")[0]
  assert mesh.count("process 0") == 4 and mesh.count("process 1") == 4


def test_colour_only_on_a_terminal(monkeypatch):
  _, view = _view("1x8", "tensor_parallel")
  assert "\x1b[" in draw(view.to_dict(), color=True)

  class Tty:
    def isatty(self):
      return True

  monkeypatch.delenv("NO_COLOR", raising=False)
  monkeypatch.setenv("TERM", "xterm")
  assert use_color(Tty()) and not use_color(object())
  monkeypatch.setenv("NO_COLOR", "1")
  assert not use_color(Tty())


def test_every_table_is_covered():
  # expert_parallel differs from tensor_parallel only in experts: test_qwen3 draws them.
  assert {get_table(name).name for name in TABLE_NAMES} == {t.name for t in TABLES.values()} - {"expert_parallel"}


@pytest.mark.parametrize("show", [True, False])
def test_the_run_job_prints_the_pictures_after_the_table_and_reports_them(tmp_path, show):
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  report = tmp_path / "report.json"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NO_COLOR")}
  result = subprocess.run([sys.executable, "main.py", "--config=configs/tp8.py", "--config.mesh=2x4",
                           "--config.model.preset=tiny", "--config.model.num_layers=1", "--config.seq_len=4",
                           f"--config.show_sharding={show}", f"--config.report={report}"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert ("Sharding pictures of 2x4 tensor_parallel" in out) == show
  if show:
    assert out.index("Replicated on every device") < out.index("Sharding pictures") < out.index("Forward pass")
    assert "\x1b[" not in out and re.search(r"\|\s+CPU 0,4\s+\|", out) and "Memory per device" in out
  layouts = json.loads(report.read_text())["layouts"]
  assert layouts["mesh"]["devices"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert [g["name"] for g in layouts["layouts"]][:2] == ["q kernel", "k/v kernels"]
  assert layouts["layouts"][0]["cells"] == [[[0, 4], [1, 5], [2, 6], [3, 7]]]
