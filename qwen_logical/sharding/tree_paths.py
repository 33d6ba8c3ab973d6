"""Pytree key paths as names: how parameters are named in reports, checks and the init."""

from __future__ import annotations


def path_keys(path) -> tuple[str, ...]:
  """A pytree key path as its dict keys, e.g. ('layers', 'attention', 'q_kernel')."""
  return tuple(str(getattr(k, "key", k)) for k in path)


def path_str(path) -> str:
  """A pytree key path as 'layers/attention/q_kernel'."""
  return "/".join(path_keys(path))
