"""Where each layout's blocks live: layout class -> grid of cells -> device ids (pure data, no drawing).

A *grid* shows one array's sharded dimensions. Its rows are the blocks of the first dimension the
sharding splits, its columns the blocks of the others (one split dimension: a single row; none: a
single cell); the cell at (row r, column c) holds exactly one block, and `cells[r][c]` lists the ids
of the devices that hold it (more than one: replicas). Everything is computed from the *global*
sharding (`sharding.devices_indices_map(shape)`), never from addressable shards, so every process
of a multi-process job computes the same picture.

Head dimensions carry marks per block, read from the head layout's index map: `q 6 +1 pad` (query
heads 6 and one zero pad), `kv 1 copy 2/4` (the second of four copies of KV head 1).

`layout_grids(partitioner, ...)` gives one grid per distinct layout of each layout class (q kernel,
k/v kernels, o kernel, MLP in/out (a mixture's experts: expert x mlp x embed), the router, embedding,
lm_head when untied, norms), not one per layer, then
the activations at the block boundary and the KV cache when their shapes are given.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec

from qwen_logical.model import axes as ax
from qwen_logical.model.head_layout import KV, PADDING, QUERY, HeadLayout
from qwen_logical.sharding import validation
from qwen_logical.sharding.report import compact_paths
from qwen_logical.sharding.rules import format_mesh_axes
from qwen_logical.sharding.tree_paths import path_str, within_layer

Span = tuple[int, int]  # [start, stop) along one dimension

# Layout classes of the parameters: (name, pattern on the path without its layer prefix).
PARAM_CLASSES = (
    ("q kernel", r"attention/q_kernel"),
    ("k/v kernels", r"attention/[kv]_kernel"),
    ("o kernel", r"attention/o_kernel"),
    ("MLP in (gate, up)", r"mlp/(gate|up)_kernel"),
    ("MLP out (down)", r"mlp/down_kernel"),
    ("router", r"mlp/router_kernel"),
    ("embedding", r"embed_tokens/embedding"),
    ("lm_head", r"lm_head"),
    ("norms", r"(\w+/)?\w*norm/scale"),
)
# Logical names of head dimensions -> the head kind whose index map marks them.
HEAD_KINDS = {ax.HEADS: QUERY, ax.ACTIVATION_HEADS: QUERY, ax.KV_HEADS: KV, ax.ACTIVATION_KV_HEADS: KV,
              ax.CACHE_KV_HEADS: KV}


@dataclasses.dataclass(frozen=True)
class GridAxis:
  """The rows (or the columns) of a grid.

  dims: the array dimensions this axis runs along (rows: at most one; columns: the other split ones).
  names: their logical names.
  spans: per row (column), per dim in `dims`, the block's [start, stop).
  marks: per row (column), head marks of its block ('' where the dims carry no heads).
  """

  dims: tuple[int, ...]
  names: tuple[str, ...]
  spans: tuple[tuple[Span, ...], ...]
  marks: tuple[str, ...]

  def to_dict(self) -> dict:
    return {"dims": list(self.dims), "names": list(self.names), "spans": [[list(s) for s in b] for b in self.spans],
            "marks": list(self.marks)}


@dataclasses.dataclass(frozen=True)
class Grid:
  """One layout: an array of `shape` named `logical`, sharded as `mesh_axes`, as rows x columns of
  cells; `cells[r][c]` are the device ids holding block (rows.spans[r], cols.spans[c])."""

  name: str  # the layout class: 'q kernel', 'KV cache', ...
  members: str  # what it stands for: 'layers_*/attention/k_kernel, ... (2 layers)'
  shape: tuple[int, ...]
  dtype: str
  logical: tuple[str, ...]
  mesh_axes: tuple[str, ...]  # per dimension, formatted: 'model', 'batch+model', 'None'
  rows: GridAxis
  cols: GridAxis
  cells: tuple[tuple[tuple[int, ...], ...], ...]

  def block(self, row: int, col: int) -> tuple[slice, ...]:
    """The index of cell (row, col)'s block in the whole array (one slice per dimension)."""
    index = [slice(0, size) for size in self.shape]
    for axis, position in ((self.rows, row), (self.cols, col)):
      for dim, (start, stop) in zip(axis.dims, axis.spans[position]):
        index[dim] = slice(start, stop)
    return tuple(index)

  def to_dict(self) -> dict:
    return {"name": self.name, "members": self.members, "shape": list(self.shape), "dtype": self.dtype,
            "logical": list(self.logical), "mesh_axes": list(self.mesh_axes), "rows": self.rows.to_dict(),
            "cols": self.cols.to_dict(), "cells": [[list(c) for c in row] for row in self.cells]}


def _ranges(values: Sequence[int]) -> str:
  """[0, 1, 2, 5] -> '0-2,5'."""
  out: list[list[int]] = []
  for v in values:
    if out and v == out[-1][1] + 1:
      out[-1][1] = v
    else:
      out.append([v, v])
  return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def head_mark(layout: HeadLayout, kind: str, span: Span) -> str:
  """What layout heads [start, stop) of `kind` hold: 'q 0-1', 'q 6 +1 pad', '2 pad', 'kv 1 copy 2/4'."""
  source = layout.source(kind)[span[0]:span[1]].tolist()
  if kind == QUERY:
    real = [h for h in source if h != PADDING]
    pads = len(source) - len(real)
    text = f"q {_ranges(real)}" if real else ""
    return (f"{text} +{pads} pad" if text else f"{pads} pad") if pads else text
  if layout.kv_repeat == 1:
    return f"kv {_ranges(source)}"
  r = layout.kv_repeat
  return ", ".join(f"kv {h} copy {j % r + 1}/{r}" for j, h in zip(range(*span), source))


def _blocks(shape: tuple[int, ...], sharding) -> dict[tuple[Span, ...], list[int]]:
  """Block (one span per dimension) -> ids of the devices holding it, from the global sharding."""
  blocks: dict[tuple[Span, ...], list[int]] = defaultdict(list)
  for device, index in sharding.devices_indices_map(shape).items():
    block = tuple((s.start or 0, size if s.stop is None else s.stop) for s, size in zip(index, shape))
    blocks[block].append(device.id)
  return blocks


def grid(name: str, members: str, shape: Sequence[int], dtype, logical: Sequence[str], sharding,
         layout: HeadLayout) -> Grid:
  """The grid of one array of `shape` (logical names `logical`) placed by `sharding`."""
  shape = tuple(int(s) for s in shape)
  blocks = _blocks(shape, sharding)
  split = [d for d in range(len(shape)) if len({b[d] for b in blocks}) > 1]
  row_dims, col_dims = (tuple(split[:1]), tuple(split[1:])) if len(split) > 1 else ((), tuple(split))

  def axis(dims: tuple[int, ...]) -> GridAxis:
    spans = sorted({tuple(b[d] for d in dims) for b in blocks})
    marks = tuple(" ".join(head_mark(layout, HEAD_KINDS[logical[d]], s[i]) for i, d in enumerate(dims)
                           if logical[d] in HEAD_KINDS) for s in spans)
    return GridAxis(dims, tuple(logical[d] for d in dims), tuple(spans), marks)

  rows, cols = axis(row_dims), axis(col_dims)
  row_of = {s: i for i, s in enumerate(rows.spans)}
  col_of = {s: i for i, s in enumerate(cols.spans)}
  cells: list[list[tuple[int, ...]]] = [[() for _ in cols.spans] for _ in rows.spans]
  for block, devices in blocks.items():
    r, c = row_of[tuple(block[d] for d in row_dims)], col_of[tuple(block[d] for d in col_dims)]
    cells[r][c] = tuple(sorted(devices))
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  return Grid(name, members, shape, np.dtype(dtype).name, tuple(logical),
              tuple(format_mesh_axes(a) for a in spec), rows, cols, tuple(map(tuple, cells)))


def param_grids(partitioner) -> list[Grid]:
  """One grid per distinct (shape, logical axes, sharding) of each parameter layout class."""
  p = partitioner
  logical = jax.tree_util.tree_leaves(p.logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  shapes = jax.tree_util.tree_leaves_with_path(p.param_shapes)
  shardings = jax.tree_util.tree_leaves(p.param_shardings)
  groups: dict[tuple, list] = {}
  for (path, shape), names, sharding in zip(shapes, logical, shardings):
    path = path_str(path)
    name = next((n for n, pattern in PARAM_CLASSES if re.fullmatch(pattern, within_layer(path))), None)
    if name is None:  # biases and int8 scales follow their kernel's rows; the sharding table lists them
      continue
    key = (name, tuple(shape.shape), tuple(names), tuple(sharding.spec))
    groups.setdefault(key, [shape, tuple(names), sharding, []])[3].append(path)
  order = {n: i for i, (n, _) in enumerate(PARAM_CLASSES)}
  return [grid(key[0], compact_paths(paths), shape.shape, shape.dtype, names, sharding, p.layout)
          for key, (shape, names, sharding, paths) in sorted(groups.items(), key=lambda kv: order[kv[0][0]])]


def array_grid(partitioner, name: str, members: str, shape: Sequence[int], logical: Sequence[str],
               dtype=None) -> Grid | str:
  """The grid of an activation or cache array of `shape` named `logical` (compute dtype unless `dtype`),
  or, when the table cannot split that shape over the mesh, a note saying so."""
  p = partitioner
  problems = validation.check_array(name, shape, logical, p.table, p.mesh_shape)
  if problems:
    return f"{name} {list(shape)}: not pictured ({problems[0]})"
  return grid(name, members, shape, dtype or p.config.dtype, logical, p.sharding(logical), p.layout)


def layout_grids(partitioner, batch: int, length: int, cache_shape: Sequence[int] | None = None
                 ) -> tuple[list[Grid], list[str]]:
  """(grids, notes): the parameter layout classes, the activations at the block boundary for a
  [batch, length] token batch, and the KV cache of one layer's keys (or values) when `cache_shape`
  (in `axes.KV_CACHE` order, from inference.kv_cache.cache_shape) is given; notes name what is not
  pictured."""
  cfg = partitioner.config
  extra = [array_grid(partitioner, "activations at the block boundary", "hidden states between decoder layers",
                      (batch, length, cfg.hidden_size), ax.EMBED_ACTIVATION)]
  if cache_shape is not None:
    extra.append(array_grid(partitioner, "KV cache", f"keys (and values) of each of {cfg.num_layers} layers",
                            cache_shape, ax.KV_CACHE))
  grids = param_grids(partitioner) + [g for g in extra if isinstance(g, Grid)]
  return grids, [g for g in extra if isinstance(g, str)]
