"""The verification suite's text: one block per combination, the summary table, device pictures."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import PartitionSpec

from qwen_logical.jobs.verify.verdict import Tolerances
from qwen_logical.sharding.collectives import KINDS
from qwen_logical.sharding.partitioner import Partitioner, path_str
from qwen_logical.sharding.report import compact_paths, device_picture
from qwen_logical.sharding.tree_paths import layer_index, layer_kind_path

_SHORT = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
          "collective-permute": "CP"}
LEGEND = ("collectives per forward: AR all-reduce, AG all-gather, RS reduce-scatter, A2A all-to-all, "
          "CP collective-permute; tol used: the worst position's max|dlogit| / (atol + rtol * max|logit|)")


def _key_param(path: str) -> str:
  """'layers_0/mlp/down_kernel' -> 'layers/mlp/down_kernel' (unrolled layers: the first stands for all)."""
  return layer_kind_path(path) if layer_index(path) == 0 else path


def pictures(partitioner: Partitioner, key_params: tuple[str, ...]) -> list[str]:
  """How each key parameter lies over the devices (sharding.report.device_picture)."""
  specs = dict(jax.tree_util.tree_leaves_with_path(partitioner.logical_specs,
                                                   is_leaf=lambda x: isinstance(x, PartitionSpec)))
  shapes = jax.tree_util.tree_leaves_with_path(partitioner.param_shapes)
  shardings = jax.tree_util.tree_leaves(partitioner.param_shardings)
  out = []
  for (path, shape), sharding in zip(shapes, shardings):
    if _key_param(path_str(path)) in key_params:
      out.append(device_picture(path_str(path), shape.shape, sharding, tuple(specs[path])))
  return out


def collectives_text(collectives: dict, long: bool = False) -> str:
  parts = []
  for kind in KINDS:
    c = collectives[kind]
    if c["count"]:
      name = kind if long else _SHORT[kind]
      parts.append(f"{name} {c['count']}" + (f" ({c['bytes'] / 2**20:.2f} MiB)" if long else ""))
  return ", ".join(parts) if parts else "none"


def agreement_text(entry: dict[str, Any], tol: Tolerances) -> str:
  """The logit and token comparison of one combination against its thresholds."""
  return (f"vs 1x1: max |dlogit| {entry['max_abs_logit_diff']:.3g} (relative {entry['max_rel_logit_diff']:.3g}; "
          f"{entry['tolerance_used']:.3g} of atol {tol.atol:.3g} + rtol {tol.rtol:.3g} * max|logit|), "
          f"1-PCC {1 - entry['pcc_min']:.3g} (<= {1 - tol.min_pcc:.3g}), mean KL {entry['kl_mean']:.3g} "
          f"(<= {tol.max_kl:.3g}), top-{tol.top_k} overlap min {entry['top_k_overlap_min']:.3f} "
          f"(>= {tol.min_top_k_overlap}), greedy tokens {'agree' if entry['greedy_tokens_agree'] else 'DIFFER'}")


def format_combination(entry: dict[str, Any], tol: Tolerances) -> str:
  head = f"== {entry['mesh']} x {entry['rules']}: {entry['status'].upper()}"
  if entry["status"] == "skipped":
    return f"{head}\n   {entry['reason']}"
  lines = [head]
  if "timings" in entry:
    t = entry["timings"]
    per_device = entry["bytes_by_device"].values()
    lines += [
        f"   head plan: {entry['head_plan']}; weights: {entry['weights']}",
        f"   params MiB/device: max {max(per_device) / 2**20:.2f}, min {min(per_device) / 2**20:.2f} "
        f"over {entry['devices']} devices; replicated: {compact_paths(entry['replicated']) or 'none'}",
        f"   times: weights {t['weights_s']:.2f} s, compile {t['compile_s']:.2f} s, forward "
        f"{t['run_s']:.3f} s, generate {t['generate_s']:.2f} s (compile {t['generate_compile_s']:.2f} s)",
        "   " + agreement_text(entry, tol),
        "   collectives per forward: " + collectives_text(entry["collectives"], long=True),
    ]
    lines += ["   " + line for p in entry["pictures"] for line in p.splitlines()]
  lines += [f"   FAILED: {f}" for f in entry.get("failures", [])]
  return "\n".join(lines)


_HEADER = ("mesh", "rules", "status", "max|dlogit|", "tol used", "1-PCC", "mean KL", "top-k min", "greedy",
           "MiB/dev", "replicated", "collectives/forward", "weights s", "compile s", "forward s")


def _row(e: dict[str, Any]) -> tuple:
  if e["status"] == "skipped" or "timings" not in e:
    return (e["mesh"], e["rules"], e["status"]) + ("-",) * (len(_HEADER) - 3)
  t = e["timings"]
  return (e["mesh"], e["rules"], e["status"], f"{e['max_abs_logit_diff']:.2e}", f"{e['tolerance_used']:.3f}",
          f"{1 - e['pcc_min']:.1e}", f"{e['kl_mean']:.1e}", f"{e['top_k_overlap_min']:.3f}",
          "agree" if e["greedy_tokens_agree"] else "DIFFER", f"{max(e['bytes_by_device'].values()) / 2**20:.1f}",
          str(len(e["replicated"])) if e["devices"] > 1 else "-", collectives_text(e["collectives"]),
          f"{t['weights_s']:.2f}", f"{t['compile_s']:.2f}", f"{t['run_s']:.3f}")


def summary_table(entries: list[dict[str, Any]]) -> str:
  rows = [_row(e) for e in entries]
  widths = [max(len(str(r[i])) for r in [_HEADER] + rows) for i in range(len(_HEADER))]
  fmt = " | ".join(f"{{:<{w}}}" for w in widths)
  out = [fmt.format(*_HEADER), "-+-".join("-" * w for w in widths)]
  return "\n".join(out + [fmt.format(*r) for r in rows])
