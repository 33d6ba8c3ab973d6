"""A small progress bar for long host-side loops (checkpoint loading and export)."""

from __future__ import annotations

import sys
import time

from absl import logging

from qwen_logical.common.host import is_main_process


class Progress:
  """Counts items and bytes; redraws one line on a terminal, logs every ~10% otherwise."""

  def __init__(self, label: str, total_items: int, total_bytes: int, enabled: bool = True, stream=None):
    self.label, self.total_items, self.total_bytes = label, total_items, max(total_bytes, 1)
    self.items = self.bytes = 0
    self.enabled = enabled and is_main_process()  # only process 0 draws progress
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.start = time.perf_counter()
    self._next_log = 0.1

  def update(self, items: int = 1, nbytes: int = 0) -> None:
    self.items += items
    self.bytes += nbytes
    if not self.enabled:
      return
    fraction = self.bytes / self.total_bytes
    if self.tty:
      filled = int(30 * fraction)
      self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self._counts()}")
      self.stream.flush()
    elif fraction >= self._next_log or self.items == self.total_items:
      logging.info("%s: %s", self.label, self._counts())
      self._next_log = fraction + 0.1

  def close(self) -> float:
    elapsed = time.perf_counter() - self.start
    if self.enabled and self.tty:
      self.stream.write("\n")
    return elapsed

  def _counts(self) -> str:
    elapsed = time.perf_counter() - self.start
    return (f"{self.items}/{self.total_items} tensors, {self.bytes / 2**20:.0f}/"
            f"{self.total_bytes / 2**20:.0f} MiB, {elapsed:.1f} s")
