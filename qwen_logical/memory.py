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

