"""Host memory facts and fitting a model shape into them."""

from __future__ import annotations

import os


def available_host_bytes() -> int:
  """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def layers_that_fit(bytes_fixed: int, bytes_per_layer: int, budget: int, wanted: int) -> int:
  """How many of `wanted` layers fit in `budget` beside `bytes_fixed` (at least 1)."""
  room = max(budget - bytes_fixed, 0)
  return max(1, min(wanted, room // max(bytes_per_layer, 1)))
