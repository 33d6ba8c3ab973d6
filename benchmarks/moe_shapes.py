"""Where Qwen3-MoE's experts live and what each device holds, from abstract shapes only (no weights).

    .venv/bin/python benchmarks/moe_shapes.py                         # 30B-A3B and 235B-A22B, ~75 s on 2 cores
    .venv/bin/python benchmarks/moe_shapes.py --presets qwen3-30b-a3b --context 32768

For each preset, mesh (8 simulated CPU devices) and expert layout it prints the shard of one expert kernel
and every device's bytes: parameters in bfloat16 (int8 too), the KV cache of `--batch` rows of `--context`
tokens, and the largest activation of a [batch, 16] forward, as `main.py`'s memory bars compute them
(`sharding.device_memory`). Writes benchmarks/results/moe_shapes.json.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qwen_logical as ql  # noqa: E402

ql.simulate_cpu_devices(8)

from results_file import write_results  # noqa: E402

from qwen_logical.inference.kv_cache import cache_shape  # noqa: E402
from qwen_logical.sharding.device_memory import device_memory  # noqa: E402
from qwen_logical.sharding.report import sharding_report  # noqa: E402

LAYOUTS = (("1x8", "expert_parallel", ""), ("2x4", "expert_parallel", ""), ("2x4", "expert_parallel", "expert=model"),
           ("2x4", "expert_parallel", "expert=batch,expert_mlp=model"), ("1x8", "tensor_parallel", ""))
GiB = 2**30


def measure(name: str, mesh: str, table: str, overrides: str, storage: str, batch: int, context: int) -> dict:
  cfg = ql.preset(name).replace(param_dtype="bfloat16", quantization="int8" if storage == "int8" else "")
  part = ql.Partitioner(cfg, ql.make_mesh(mesh), ql.get_table(table, overrides))
  row = next(r for r in sharding_report(part).rows if r.path.endswith("layers_0/mlp/gate_kernel"))
  memory, largest = device_memory(part, batch, 16, cache_shape(cfg, part.layout, batch, context))
  worst = max(memory, key=lambda m: m.total)
  return {"preset": name, "mesh": mesh, "rules": part.table.name, "storage": storage,
          "gate_kernel_shard": list(row.shard_shape), "gate_kernel_mesh_axes": [str(a) for a in row.mesh_axes],
          "params_gib_per_device": worst.params / GiB, "kv_cache_gib_per_device": worst.kv_cache / GiB,
          "activation_gib": worst.activation / GiB, "largest_activation": largest,
          "total_gib_per_device": worst.total / GiB, "even": len({m.total for m in memory}) == 1}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--presets", default="qwen3-30b-a3b,qwen3-235b-a22b")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--context", type=int, default=4096)
  parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "moe_shapes.json"))
  args = parser.parse_args()
  rows = []
  header = f"{'preset':16} {'mesh':4} {'rules':52} {'storage':8} {'expert kernel shard':20} " \
           f"{'params':>9} {'KV cache':>9} {'total':>9}"
  print(header + "\n" + "-" * len(header))
  for name in args.presets.split(","):
    for mesh, table, overrides in LAYOUTS:
      for storage in ("bfloat16", "int8"):
        r = measure(name, mesh, table, overrides, storage, args.batch, args.context)
        rows.append(r)
        shard = "x".join(map(str, r["gate_kernel_shard"]))
        print(f"{name:16} {mesh:4} {r['rules'] + (' ' + overrides if overrides else ''):52} {storage:8} {shard:20} "
              f"{r['params_gib_per_device']:7.2f} G {r['kv_cache_gib_per_device']:7.2f} G "
              f"{r['total_gib_per_device']:7.2f} G" + ("" if r["even"] else "  (uneven)"))
  print(f"(per device, the most loaded; KV cache: {args.batch} rows x {args.context} tokens in float32; "
        "bfloat16 = weights stored bf16, int8 = weight-only int8 with float32 scales)")
  write_results(args.output, {"batch": args.batch, "context": args.context, "rows": rows})


if __name__ == "__main__":
  main()
