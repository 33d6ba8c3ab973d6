"""Whether one combination computes the reference's model: its logits, greedy tokens and shardings.

Logits [B, L, V] are compared position by position (a position is one row of V logits), with
tolerances that scale with the logits: real checkpoints have logit std ~3 and maxima ~30, where
float32 all-reduces summed in another order differ by ~1e-3, while a random 0.02-init model's
logits are ten times smaller. A position passes when

    max_v |candidate - reference| <= atol + rtol * max_v |reference|

and the whole passes when every position does, the smallest per-position Pearson correlation
(PCC) is at least min_pcc, the mean KL divergence KL(softmax(reference) || softmax(candidate))
is at most max_kl, the top-k token sets overlap, and the greedy tokens agree.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import PartitionSpec

from qwen_logical.sharding.partitioner import Partitioner, path_str
from qwen_logical.sharding.rules import as_axes, format_mesh_axes


@dataclasses.dataclass(frozen=True)
class Tolerances:
  """The verdict's thresholds (config.verify.*); see the module docstring."""

  rtol: float
  atol: float
  min_pcc: float
  max_kl: float
  top_k: int
  min_top_k_overlap: float


def _rows(x: np.ndarray) -> np.ndarray:
  """[..., V] -> float64[positions, V]."""
  return np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])


def pearson_rows(logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Per position, the Pearson correlation of the two rows of V logits (1.0 for identical constant rows)."""
  a, b = _rows(logits), _rows(reference)
  a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
  scale = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
  same = np.abs(a - b).max(-1) == 0
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(scale > 0, (a * b).sum(-1) / np.where(scale > 0, scale, 1), np.where(same, 1.0, 0.0))


def _log_softmax(x: np.ndarray) -> np.ndarray:
  shifted = x - x.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def kl_rows(logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Per position, KL(softmax(reference) || softmax(logits)) in nats (float64)."""
  log_p, log_q = _log_softmax(_rows(reference)), _log_softmax(_rows(logits))
  return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)


def top_k_overlap(logits: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
  """Per position, the fraction of the reference's top-k token ids also in `logits`' top-k."""
  k = min(k, reference.shape[-1])
  top = lambda x: np.argpartition(-x.reshape(-1, x.shape[-1]), k - 1, axis=-1)[:, :k]
  a, b = top(logits), top(reference)
  return np.array([len(np.intersect1d(x, y, assume_unique=True)) / k for x, y in zip(a, b)])


@dataclasses.dataclass(frozen=True)
class LogitComparison:
  """Candidate vs reference logits, the numbers the verdict reads (all JSON-able floats).

  max_abs_logit_diff: max |difference| anywhere.
  max_rel_logit_diff: max over positions of max|difference| / max|reference| in that position.
  tolerance_used: max over positions of max|difference| / (atol + rtol * max|reference|); <= 1 passes.
  pcc_min: smallest per-position Pearson correlation. kl_mean: mean per-position KL (nats).
  """

  max_abs_logit_diff: float
  max_rel_logit_diff: float
  tolerance_used: float
  pcc_min: float
  kl_mean: float
  top_k_overlap_min: float
  top_k_overlap_mean: float

  def failures(self, tol: Tolerances) -> list[str]:
    """What exceeds `tol`, one message each (empty: the logits agree)."""
    out = []
    if not self.tolerance_used <= 1.0:
      out.append(f"|logit diff| exceeds atol {tol.atol:.3g} + rtol {tol.rtol:.3g} * max|logit| at some position "
                 f"({self.tolerance_used:.3g}x the tolerance; max |diff| {self.max_abs_logit_diff:.3g}, "
                 f"relative {self.max_rel_logit_diff:.3g})")
    if not self.pcc_min >= tol.min_pcc:
      out.append(f"per-position PCC {self.pcc_min:.9f} < {tol.min_pcc}")
    if not self.kl_mean <= tol.max_kl:
      out.append(f"mean KL {self.kl_mean:.3g} > {tol.max_kl:.3g}")
    if not self.top_k_overlap_min >= tol.min_top_k_overlap:
      out.append(f"top-{tol.top_k} overlap {self.top_k_overlap_min:.3f} < {tol.min_top_k_overlap}")
    return out


def _row_metrics(a: np.ndarray, b: np.ndarray, k: int) -> dict[str, np.ndarray]:
  """Per-position numbers of candidate rows `a` vs reference rows `b` (both [rows, V])."""
  return {"diff": np.abs(a.astype(np.float64) - b).max(-1), "scale": np.abs(b).max(-1).astype(np.float64),
          "pcc": pearson_rows(a, b), "kl": kl_rows(a, b), "overlap": top_k_overlap(a, b, k)}


def compare_logits(logits: np.ndarray, reference: np.ndarray, tol: Tolerances,
                   rows_per_chunk: int = 64) -> LogitComparison:
  """Compares float[..., V] `logits` with the `reference` of the same shape.

  Positions are taken `rows_per_chunk` at a time, so the float64 temporaries stay small
  next to the [B, L, V] logits (V is 152k for Qwen2.5).
  """
  if np.shape(logits) != np.shape(reference):
    raise ValueError(f"logits {np.shape(logits)} and reference {np.shape(reference)} differ in shape")
  a = np.reshape(logits, (-1, np.shape(logits)[-1]))
  b = np.reshape(reference, a.shape)
  chunks = [_row_metrics(a[i:i + rows_per_chunk], b[i:i + rows_per_chunk], tol.top_k)
            for i in range(0, len(a), rows_per_chunk)]
  m = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
  diff, scale = m["diff"], m["scale"]
  with np.errstate(invalid="ignore", divide="ignore"):
    relative = np.where(scale > 0, diff / np.where(scale > 0, scale, 1), np.where(diff > 0, np.inf, 0.0))
  return LogitComparison(
      max_abs_logit_diff=float(diff.max()), max_rel_logit_diff=float(relative.max()),
      tolerance_used=float((diff / (tol.atol + tol.rtol * scale)).max()),
      pcc_min=float(m["pcc"].min()), kl_mean=float(m["kl"].mean()),
      top_k_overlap_min=float(m["overlap"].min()), top_k_overlap_mean=float(m["overlap"].mean()))


def greedy_failures(tokens: list[list[int]], reference: list[list[int]]) -> list[str]:
  rows = [i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b]
  if rows or len(tokens) != len(reference):
    return [f"greedy tokens differ from the single-device run in prompt(s) {rows}"]
  return []


def unclaimed_replication(partitioner: Partitioner) -> list[str]:
  """Parameter axes the table claims to shard that this mesh does not split, as messages."""
  table, mesh_shape = partitioner.table, partitioner.mesh_shape
  found = []
  specs = jax.tree_util.tree_leaves_with_path(partitioner.logical_specs,
                                              is_leaf=lambda x: isinstance(x, PartitionSpec))
  for (path, logical), sharding in zip(specs, jax.tree_util.tree_leaves(partitioner.param_shardings)):
    actual = tuple(sharding.spec) + (None,) * (len(logical) - len(sharding.spec))
    for name, mesh_axes in zip(logical, actual):
      claimed = [a for a in table.claimed_axes(name) if mesh_shape.get(a, 1) > 1]
      have = as_axes(mesh_axes)
      missing = [a for a in claimed if a not in have]
      if missing:
        found.append(f"{path_str(path)}: '{name}' is claimed sharded over {'+'.join(claimed)} by "
                     f"{table.name} but is split over {format_mesh_axes(mesh_axes)} "
                     f"(missing {'+'.join(missing)})")
  return found
