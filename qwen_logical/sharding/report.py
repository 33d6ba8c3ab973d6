"""The sharding report: per parameter, logical axes -> mesh axes -> shard shape -> bytes per device."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import jax
import numpy as np
from jax.sharding import PartitionSpec

from qwen_logical.model.quantization import storage_bytes
from qwen_logical.sharding.partitioner import Partitioner, path_str
from qwen_logical.sharding.rules import as_axes, format_mesh_axes
from qwen_logical.sharding.tree_paths import layer_index, layer_key, with_layer


@dataclasses.dataclass
class ParamRow:
  path: str
  shape: tuple[int, ...]
  dtype: str
  logical: tuple
  mesh_axes: tuple
  shard_shape: tuple[int, ...]
  bytes_total: int
  bytes_per_device: int

  @property
  def replicated(self) -> bool:
    return all(a is None for a in self.mesh_axes)


@dataclasses.dataclass
class ShardingReport:
  name: str
  devices: int
  head_plan: str
  rows: list[ParamRow]
  bytes_by_device: dict[str, int]  # measured from the arrays when given, else expected from specs
  canonical_bytes: int  # the HF model's parameter bytes (no padding/repetition)

  @property
  def replicated(self) -> list[str]:
    return [r.path for r in self.rows if r.replicated]

  @property
  def total_bytes(self) -> int:
    return sum(r.bytes_total for r in self.rows)

  def to_dict(self) -> dict:
    return {"name": self.name, "devices": self.devices, "head_plan": self.head_plan,
            "total_bytes": self.total_bytes, "canonical_bytes": self.canonical_bytes,
            "bytes_by_device": self.bytes_by_device, "replicated": self.replicated,
            "params": [dataclasses.asdict(r) for r in self.rows]}

  def format(self) -> str:
    header = ("parameter", "shape", "logical axes", "mesh axes", "shard shape", "MiB/device")
    lines = [tuple(map(str, (
        r.path, "x".join(map(str, r.shape)), _axes(r.logical), _axes(r.mesh_axes, mesh=True),
        "x".join(map(str, r.shard_shape)), f"{r.bytes_per_device / 2**20:.3f}"
        + ("  replicated" if r.replicated and self.devices > 1 else "")))) for r in self.rows]
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [f"Sharding of {self.name} ({self.devices} devices)", f"Head layout: {self.head_plan}",
           fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*row).rstrip() for row in lines]
    total = self.total_bytes
    overhead = total / self.canonical_bytes - 1 if self.canonical_bytes else 0.0
    out.append(f"Total parameters: {total / 2**20:.2f} MiB in the mesh layout "
               f"({overhead:+.2%} vs the HF model's {self.canonical_bytes / 2**20:.2f} MiB).")
    per_device = ", ".join(f"{d}: {b / 2**20:.2f}" for d, b in self.bytes_by_device.items())
    out.append(f"Per-device MiB: {per_device}")
    if self.devices > 1:
      rep = self.replicated
      out.append(f"Replicated on every device ({len(rep)}): "
                 + (compact_paths(rep) if rep else "none"))
    return "\n".join(out)


def compact_paths(paths: list[str]) -> str:
  """Parameter paths with unrolled layers folded: 'layers_0/a', 'layers_1/a' -> 'layers_*/a (2 layers)'."""
  groups: dict[str, int] = {}
  folded = set()
  for path in paths:
    if layer_index(path) is not None:
      path = with_layer(path, layer_key("*"))
      folded.add(path)
    groups[path] = groups.get(path, 0) + 1
  return ", ".join(f"{k} ({n} layer{'s' * (n > 1)})" if k in folded else k for k, n in groups.items())


def _axes(values, mesh: bool = False) -> str:
  if mesh:
    return "(" + ", ".join(format_mesh_axes(v) for v in values) + ")"
  return "(" + ", ".join(str(v) for v in values) + ")"


def _shard_shape(shape, spec: PartitionSpec, mesh_shape) -> tuple[int, ...]:
  out = []
  for size, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    out.append(size // math.prod(mesh_shape[n] for n in as_axes(entry)))
  return tuple(out)


def sharding_report(partitioner: Partitioner, params=None) -> ShardingReport:
  """The report for `partitioner`; with `params`, per-device bytes are measured from the arrays."""
  p = partitioner
  is_spec = lambda x: isinstance(x, PartitionSpec)
  logical = jax.tree_util.tree_leaves(p.logical_specs, is_leaf=is_spec)
  shapes = jax.tree_util.tree_leaves_with_path(p.param_shapes)
  shardings = jax.tree_util.tree_leaves(p.param_shardings)
  rows = []
  for (path, shape), names, sharding in zip(shapes, logical, shardings):
    spec = sharding.spec
    mesh_axes = tuple(spec) + (None,) * (len(shape.shape) - len(spec))
    shard = _shard_shape(shape.shape, spec, p.mesh_shape)
    itemsize = np.dtype(shape.dtype).itemsize
    rows.append(ParamRow(path_str(path), tuple(shape.shape), str(shape.dtype), tuple(names), mesh_axes,
                         shard, math.prod(shape.shape) * itemsize, math.prod(shard) * itemsize))
  by_device: dict[str, int] = defaultdict(int)
  if params is not None:
    for array in jax.tree_util.tree_leaves(params):
      for shard in array.addressable_shards:
        by_device[str(shard.device.id)] += shard.data.nbytes
  else:
    for device in p.mesh.devices.flat:
      by_device[str(device.id)] = sum(r.bytes_per_device for r in rows)
  return ShardingReport(p.name, p.mesh.devices.size, p.layout.describe(), rows, dict(by_device),
                        storage_bytes(p.config))


def _block(index: tuple[slice, ...], shape) -> tuple[tuple[int, int], ...]:
  return tuple((s.start or 0, size if s.stop is None else s.stop) for s, size in zip(index, shape))


def device_picture(path: str, shape, sharding, logical) -> str:
  """A text picture of which devices hold which block of an array.

  Blocks of the first split dimension run down, of the second across (one split
  dimension: a single row); further split dimensions are named inside the cell. Each
  cell names the devices holding that block ("d0,d4": replicas).
  """
  shape = tuple(shape)
  blocks: dict[tuple, list[int]] = defaultdict(list)
  for device, index in sharding.devices_indices_map(shape).items():
    blocks[_block(index, shape)].append(device.id)
  split = [d for d in range(len(shape)) if len({b[d] for b in blocks}) > 1]
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  title = (f"{path} {list(shape)} ({', '.join(map(str, logical))}) -> "
           f"({', '.join(format_mesh_axes(a) for a in spec)})")
  if not split:
    devices = sorted(next(iter(blocks.values())))
    return f"{title}\n    whole array on every device ({len(devices)})"
  name = lambda d: str(logical[d]) if d < len(logical) else f"dim{d}"
  span = lambda d, block: f"{block[d][0]}:{block[d][1]}"
  rows_dim, cols_dim = split[0], (split[1] if len(split) > 1 else None)
  rows = sorted({b[rows_dim] for b in blocks})
  cols = sorted({b[cols_dim] for b in blocks}) if cols_dim is not None else [None]
  cells: dict[tuple, list[str]] = defaultdict(list)
  for block, devices in blocks.items():
    extra = "".join(f" {name(d)} {span(d, block)}" for d in split[2:])
    key = (block[rows_dim], block[cols_dim] if cols_dim is not None else None)
    cells[key].append(",".join(f"d{i}" for i in sorted(devices)) + extra)
  if cols_dim is None:  # one split dimension: a row of blocks over a row of devices
    table = [[name(rows_dim)] + [f"{r[0]}:{r[1]}" for r in rows],
             ["devices"] + [" ".join(cells[(r, None)]) for r in rows]]
  else:
    table = [[f"{name(rows_dim)} \\ {name(cols_dim)}"] + [f"{c[0]}:{c[1]}" for c in cols]]
    for r in rows:
      table.append([f"{r[0]}:{r[1]}"] + [" ".join(cells.get((r, c), ["-"])) for c in cols])
  widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
  lines = ["    " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
  return "\n".join([title] + lines)
