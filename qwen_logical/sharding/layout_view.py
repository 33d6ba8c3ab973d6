"""The whole picture of one (model, mesh, rule table) as data: the mesh, the layout grids, bytes per device.

`sharding_view(partitioner, batch, length, cache_shape)` gathers what `layout_grid` and
`device_memory` compute; `ShardingView.to_dict()` is the JSON form the jobs write into their reports
(a notebook can draw it) and the form `layout_draw.draw` draws:

    {"name": "2x4 tensor_parallel", "platform": "CPU",
     "mesh": {"axes": ["batch", "model"], "shape": [2, 4], "devices": [[0, 1, 2, 3], [4, 5, 6, 7]],
              "processes": [[0, 0, 0, 0], [0, 0, 0, 0]]},
     "layouts": [Grid.to_dict(), ...],   # cells[r][c] -> device ids
     "memory": {"devices": [{"device", "params", "kv_cache", "activation", "total"}, ...],
                "activation": "logits [8, 16, 151936]", "even_share": {"params", "kv_cache"}},
     "notes": [...]}

Everything comes from global shardings, so every process builds the same view.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from qwen_logical.sharding.device_memory import DeviceMemory, device_memory, even_share
from qwen_logical.sharding.layout_grid import Grid, layout_grids


@dataclasses.dataclass(frozen=True)
class MeshView:
  """The mesh: axis names, sizes, and the device id (and its process) at each position ([batch][model])."""

  axes: tuple[str, ...]
  shape: tuple[int, ...]
  devices: tuple[tuple[int, ...], ...]
  processes: tuple[tuple[int, ...], ...]

  def to_dict(self) -> dict:
    return {"axes": list(self.axes), "shape": list(self.shape), "devices": [list(r) for r in self.devices],
            "processes": [list(r) for r in self.processes]}


@dataclasses.dataclass(frozen=True)
class ShardingView:
  """The mesh, one grid per distinct layout, and bytes per device."""

  name: str
  platform: str  # 'CPU', 'GPU', 'TPU': how cells name their devices
  mesh: MeshView
  grids: tuple[Grid, ...]
  memory: tuple[DeviceMemory, ...]
  activation: str  # which activation is the largest
  even_share: dict[str, int]  # per device: HF parameters and canonical KV cache bytes / device count
  notes: tuple[str, ...]

  def to_dict(self) -> dict:
    return {"name": self.name, "platform": self.platform, "mesh": self.mesh.to_dict(),
            "layouts": [g.to_dict() for g in self.grids],
            "memory": {"devices": [m.to_dict() for m in self.memory], "activation": self.activation,
                       "even_share": dict(self.even_share)},
            "notes": list(self.notes)}


def mesh_view(mesh) -> MeshView:
  devices = mesh.devices.reshape(mesh.devices.shape[0], -1) if mesh.devices.ndim > 1 else mesh.devices[None]
  return MeshView(tuple(mesh.axis_names), tuple(int(s) for s in mesh.devices.shape),
                  tuple(tuple(int(d.id) for d in row) for row in devices),
                  tuple(tuple(int(d.process_index) for d in row) for row in devices))


def sharding_view(partitioner, batch: int, length: int, cache_shape: Sequence[int] | None = None) -> ShardingView:
  """The view for a [batch, length] token batch and (when given) a KV cache whose one layer's keys are
  `cache_shape` (inference.kv_cache.cache_shape; the cache's shape is that module's to make)."""
  p = partitioner
  grids, notes = layout_grids(p, batch, length, cache_shape)
  memory, activation = device_memory(p, batch, length, cache_shape)
  platform = p.mesh.devices.flat[0].platform.upper()
  return ShardingView(p.name, platform, mesh_view(p.mesh), tuple(grids), tuple(memory), activation,
                      even_share(p, cache_shape), tuple(notes))
