"""The large verification's text: its header, one block per run as it finishes, the summary table."""

from __future__ import annotations

from typing import Any

import numpy as np

from qwen_logical.jobs.common.host_memory import size_text
from qwen_logical.jobs.verify.report import collectives_text
from qwen_logical.jobs.verify.verdict import Tolerances
from qwen_logical.jobs.verify_large.plan import Plan
from qwen_logical.model.config import ModelConfig

GiB = 2**30


def header(cfg: ModelConfig, plan: Plan) -> str:
  return (f"Verifying {cfg.name} ({cfg.num_layers} layers, {cfg.num_heads}/{cfg.num_kv_heads} heads, "
          f"{cfg.num_parameters / 1e9:.2f}B parameters, {np.dtype(cfg.param_dtype).name} weights, "
          f"{np.dtype(cfg.dtype).name} compute) on a [{plan.batch_size}, {plan.seq_len}] batch: "
          f"{len(plan.references)} reference(s) and {len(plan.combinations)} combination(s), each in its own "
          f"process, each estimated against {plan.host_memory_fraction:.0%} of the available host memory first")


def tolerances_text(tol: Tolerances) -> str:
  return (f"per position max|dlogit| <= {tol.atol:.3g} + {tol.rtol:.3g} * max|logit|, PCC >= {tol.min_pcc}, "
          f"mean KL <= {tol.max_kl:.3g}, top-{tol.top_k} overlap >= {tol.min_top_k_overlap}")


def memory_text(entry: dict[str, Any]) -> str:
  """'peak RSS 17.5 GiB <= estimate 17.9 GiB (allowed 18.8 GiB)'."""
  estimate, peak = entry["estimate"]["total"], entry.get("peak_rss_bytes", 0)
  relation = "<=" if peak <= estimate else "> (ESTIMATE TOO LOW)"
  return (f"peak RSS {size_text(peak)} {relation} estimate {size_text(estimate)} "
          f"(allowed {size_text(entry['allowance_bytes'])})")


def format_run(entry: dict[str, Any], tol: Tolerances, kind: str = "") -> str:
  """One run as it finishes: status, memory, times and, for a combination, the agreement."""
  title = f"== {kind + ' ' if kind else ''}{entry['mesh']} {entry['rules']} ({entry['weights']})"
  lines = [f"{title}: {entry['status'].upper()}"]
  if entry.get("reason"):
    lines.append(f"   {entry['reason']}")
  if "peak_after_init_bytes" in entry:
    t = entry["timings"]
    layers = "scanned" if entry["scan_layers"] else "unrolled"
    lines += [f"   {memory_text(entry)}; {layers} layers; head plan {entry['head_plan']}",
              f"   times: compile {t['compile_s']:.2f} s, estimate {t['estimate_s']:.2f} s, weights "
              f"{t['weights_s']:.2f} s, forward {t['run_s']:.2f} s, process {entry['process_s']:.1f} s; "
              f"collectives per forward: {collectives_text(entry['collectives'])}"]
  if "pcc_min" in entry:
    lines.append(f"   vs 1x1: max |dlogit| {entry['max_abs_logit_diff']:.3g} (relative "
                 f"{entry['max_rel_logit_diff']:.3g}; {entry['tolerance_used']:.3g} of the tolerance), 1-PCC "
                 f"{1 - entry['pcc_min']:.3g}, mean KL {entry['kl_mean']:.3g}, top-{tol.top_k} overlap min "
                 f"{entry['top_k_overlap_min']:.3f}")
  elif "logits_std" in entry:
    lines.append(f"   logits std {entry['logits_std']:.3f}, max |logit| {entry['logits_max']:.2f}")
  lines += [f"   FAILED: {f}" for f in entry.get("failures", [])]
  return "\n".join(lines)


_HEADER = ("mesh", "rules", "weights", "status", "max|dlogit|", "max rel", "tol used", "1-PCC", "mean KL",
           "top-k min", "peak GiB", "estimate GiB", "weights s", "compile s", "forward s", "process s")


def _row(e: dict[str, Any]) -> tuple:
  first = (e["mesh"], e["rules"], e["weights"], e["status"] if "pcc_min" in e or e["status"] != "ok" else "reference")
  compared = (f"{e['max_abs_logit_diff']:.2e}", f"{e['max_rel_logit_diff']:.2e}", f"{e['tolerance_used']:.3f}",
              f"{1 - e['pcc_min']:.1e}", f"{e['kl_mean']:.1e}", f"{e['top_k_overlap_min']:.3f}"
              ) if "pcc_min" in e else ("-",) * 6
  estimate = e.get("estimate", {}).get("total")
  memory = (f"{e['peak_rss_bytes'] / GiB:.2f}" if "peak_after_init_bytes" in e else "-",
            f"{estimate / GiB:.2f}" if estimate else "-")
  t = e.get("timings", {})
  times = tuple(f"{t[k]:.2f}" if k in t else "-" for k in ("weights_s", "compile_s", "run_s"))
  return first + compared + memory + times + (f"{e['process_s']:.1f}" if "process_s" in e else "-",)


def summary_table(references: list[dict[str, Any]], entries: list[dict[str, Any]]) -> str:
  """References first, then the combinations; '-' where a run did not get that far."""
  rows = [_row(e) for e in references + entries]
  widths = [max(len(str(r[i])) for r in [_HEADER] + rows) for i in range(len(_HEADER))]
  fmt = " | ".join(f"{{:<{w}}}" for w in widths)
  out = [fmt.format(*_HEADER), "-+-".join("-" * w for w in widths)]
  return "\n".join(out + [fmt.format(*r) for r in rows])
