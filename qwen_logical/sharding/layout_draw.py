"""Draws a sharding view (the JSON form of `layout_view.ShardingView`) for a terminal, with `rich`.

    draw(view) -> str     # the mesh, one box grid per layout, a memory bar per device

Each grid's rows and columns are the blocks of the array's split dimensions (their spans and head
marks in the headers); each cell names the devices that hold its block (`CPU 0,4`: two replicas).
On a terminal the cells are coloured by their first device and the boxes are drawn with lines; with
NO_COLOR set, TERM=dumb or stdout not a terminal (a log, a pipe) the output is plain ASCII text.
"""

from __future__ import annotations

import io
import os
import shutil
import sys

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Cell backgrounds by first device id (bold white text on each).
PALETTE = ("dark_blue", "dark_green", "dark_red", "purple4", "dark_cyan", "orange4", "deep_pink4", "grey35")
BAR_WIDTH = 40
# Memory bar segments: (field, plain character, terminal character, terminal style, legend name).
SEGMENTS = (("params", "#", "█", "blue", "parameters"), ("kv_cache", "=", "█", "magenta", "KV cache"),
            ("activation", ".", "█", "yellow", "largest activation"))


def use_color(stream=None) -> bool:
  """Colours and line boxes only on a terminal, and not when NO_COLOR is set or TERM is dumb."""
  stream = stream or sys.stdout
  if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
    return False
  return bool(getattr(stream, "isatty", lambda: False)())


def size_text(nbytes: float) -> str:
  """'1.25 GiB', '159.16 MiB', '3.5 KiB'."""
  if nbytes >= 2**30:
    return f"{nbytes / 2**30:.2f} GiB"
  return f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def device_label(platform: str, devices) -> str:
  """'CPU 0,1,2,3' / 'GPU 4'."""
  return f"{platform} {','.join(str(d) for d in devices)}"


def _header(axis: dict, index: int) -> str:
  """'0:2\\nq 0-1': the block's span along the axis's dim (each span named where the axis folds several
  dims together; the corner names a single one), then its head marks."""
  spans = axis["spans"][index]
  named = len(spans) > 1
  text = " ".join(f"{name} {a}:{b}" if named else f"{a}:{b}" for name, (a, b) in zip(axis["names"], spans))
  mark = axis["marks"][index]
  return text + ("\n" + mark if mark else "")


def _table(color: bool, corner: str) -> Table:
  table = Table(box=box.SQUARE if color else box.ASCII, show_header=True, show_lines=True,
                header_style="bold" if color else "", pad_edge=True)
  table.add_column(corner, style="bold" if color else "")
  return table


def _cell(platform: str, devices, color: bool, note: str = "") -> Text:
  text = (device_label(platform, devices) if devices else "-") + note
  if not color or not devices:
    return Text(text)
  return Text(text, style=f"bold white on {PALETTE[min(devices) % len(PALETTE)]}")


def mesh_table(view: dict, color: bool) -> Table:
  """Rows: the first mesh axis's positions, columns: the second's; each cell the device there (and, with
  several processes, the process it belongs to)."""
  mesh, platform = view["mesh"], view["platform"]
  axes, processes = mesh["axes"], mesh.get("processes") or [[0] * len(r) for r in mesh["devices"]]
  several = len({p for row in processes for p in row}) > 1
  table = _table(color, f"{axes[0]} \\ {axes[1]}" if len(axes) > 1 else axes[0])
  for j in range(len(mesh["devices"][0])):
    table.add_column(f"{axes[1]} {j}" if len(axes) > 1 else str(j), justify="center")
  for i, (row, owners) in enumerate(zip(mesh["devices"], processes)):
    table.add_row(f"{axes[0]} {i}", *(_cell(platform, [d], color, f"\nprocess {p}" if several else "")
                                      for d, p in zip(row, owners)))
  return table


def grid_title(layout: dict) -> str:
  """'q kernel: layers_*/attention/q_kernel (2 layers) [16, 64, 896] float32 (heads, ...) -> (model, ...)'."""
  return (f"{layout['name']}: {layout['members']}  {layout['shape']} {layout['dtype']} "
          f"({', '.join(layout['logical'])}) -> ({', '.join(layout['mesh_axes'])})")


def grid_table(layout: dict, platform: str, color: bool) -> Table:
  rows, cols = layout["rows"], layout["cols"]
  corner = " \\ ".join(" ".join(axis["names"]) for axis in (rows, cols) if axis["names"])
  table = _table(color, corner)
  for j in range(len(cols["spans"])):
    table.add_column(_header(cols, j) or "whole array", justify="center")
  for i, cells in enumerate(layout["cells"]):
    table.add_row(_header(rows, i) or "devices", *(_cell(platform, devices, color) for devices in cells))
  return table


def _times(held: int, share: int) -> str:
  return f" (x{held / share:.2f})" if share else ""


def memory_lines(view: dict, color: bool) -> list[Text]:
  """A bar per device (parameters, KV cache, the largest activation, to one scale), each part's bytes and
  how many times its even share it is (above 1: replicas or repeated KV heads)."""
  platform, memory = view["platform"], view["memory"]
  devices, share = memory["devices"], memory["even_share"]
  top = max((m["total"] for m in devices), default=0) or 1
  names = [device_label(platform, [m["device"]]) for m in devices]
  width = max(map(len, names), default=0)
  legend = ", ".join(f"{(c if color else p)} {name}" for _, p, c, _, name in SEGMENTS)
  lines = [Text(f"Memory per device: {legend} ({memory['activation']})"),
           Text(f"  (xN): N times an even split of the HF model over {len(devices)} devices (parameters "
                f"{size_text(share['params'])}, KV cache {size_text(share['kv_cache'])} each)")]
  for name, m in zip(names, devices):
    line = Text(f"  {name.ljust(width)} |")
    used = cumulative = 0
    for field, plain, char, style, _ in SEGMENTS:
      cumulative += m[field]
      n = round(BAR_WIDTH * cumulative / top) - used
      line.append((char if color else plain) * n, style=style if color else "")
      used += n
    line.append(" " * (BAR_WIDTH - used) + f"| {size_text(m['total'])}: params {size_text(m['params'])}"
                f"{_times(m['params'], share['params'])}, KV {size_text(m['kv_cache'])}"
                f"{_times(m['kv_cache'], share['kv_cache'])}, activation {size_text(m['activation'])}")
    lines.append(line)
  if devices:
    low, high = min(devices, key=lambda m: m["total"]), max(devices, key=lambda m: m["total"])
    if high["total"] > 1.005 * low["total"]:
      lines.append(Text(f"  uneven: max {size_text(high['total'])} on {device_label(platform, [high['device']])}, "
                        f"min {size_text(low['total'])} on {device_label(platform, [low['device']])} "
                        f"(x{high['total'] / max(low['total'], 1):.2f})"))
    else:
      lines.append(Text(f"  even: {size_text(high['total'])} on each of the {len(devices)} devices"))
  return lines


def draw(view: dict, color: bool | None = None, width: int | None = None) -> str:
  """The picture of `view` as text: colour and line boxes when `color` (default: `use_color()`)."""
  color = use_color() if color is None else color
  if width is None:
    width = shutil.get_terminal_size((160, 24)).columns if color else 240
  out = io.StringIO()
  console = Console(file=out, width=width, color_system="256" if color else None, force_terminal=color,
                    no_color=not color, highlight=False, emoji=False, markup=False, legacy_windows=False)
  console.print(Text(f"Sharding pictures of {view['name']}: cells name the devices holding each block"))
  console.print(Text(f"mesh {' x '.join(map(str, view['mesh']['shape']))} ({', '.join(view['mesh']['axes'])})"))
  console.print(mesh_table(view, color))
  for layout in view["layouts"]:
    console.print(Text(grid_title(layout)), soft_wrap=True)
    console.print(grid_table(layout, view["platform"], color))
  for note in view["notes"]:
    console.print(Text(f"note: {note}"), soft_wrap=True)
  for line in memory_lines(view, color):
    console.print(line, soft_wrap=True)
  return out.getvalue().rstrip("\n")
