"""Facts about this host and process: available memory, and whether this process speaks."""

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


def is_main_process() -> bool:
  """True on process 0 of a multi-process job (and in a single process): the one that prints and writes."""
  import jax
  return jax.process_index() == 0
