"""Per-process host memory when loading a sharded checkpoint across processes (issue 6).

Makes (once) the random Qwen2.5-0.5B-shaped checkpoint of load_checkpoint.py, then loads it
onto a 1x8 tensor-parallel mesh (a) in one process with 8 simulated CPU devices and (b) in
2 processes x 4 devices joined by jax.distributed on 127.0.0.1 (gloo), each process reading
only its own devices' slices. Reports each process's peak RSS (VmHWM) and its peak above the
RSS it had before loading (the JAX runtime), and writes JSON.

  python benchmarks/distributed_load.py [--processes=2] [--mesh=1x8]
Bar (issue 6): per-process peak RSS across 2 processes <= 0.65 x the single-process figure.
"""

import json
import os
import socket
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load_checkpoint  # noqa: E402  (its flags: --dir, --file_dtype, --target_dtype, --shard_mb)

flags.DEFINE_integer("processes", 2, "processes of the multi-process load")
flags.DEFINE_string("mesh", "1x8", "mesh spanning every process (tensor_parallel rules)")
flags.DEFINE_integer("rounds", 2, "repeats of each load; the median is reported")
flags.DEFINE_string("dist_out", "benchmarks/results/distributed_load.json", "JSON report")
F = flags.FLAGS

_LOAD = r"""
import json, sys, time
port, processes, pid, directory, mesh, dtype = sys.argv[1:7]
processes, pid = int(processes), int(pid)
import qwen_logical as ql
b, m = ql.parse_mesh_shape(mesh)
ql.simulate_cpu_devices(b * m // processes)
import jax
jax.config.update("jax_platforms", "cpu")
from qwen_logical.sharding import distributed
if processes > 1:
  distributed.initialize(f"127.0.0.1:{port}", processes, pid, cpu=True, initialization_timeout_s=120)
from qwen_logical.checkpoints.loader import load_checkpoint
def rss(field):
  for line in open("/proc/self/status"):
    if line.startswith(field):
      return int(line.split()[1]) * 1024
jax.devices()
baseline = rss("VmRSS:")
start = time.perf_counter()
params, _, part = load_checkpoint(directory, ql.make_mesh(mesh), ql.get_table("tensor_parallel"), param_dtype=dtype,
                                  progress=False)
jax.block_until_ready(params)
seconds = time.perf_counter() - start
local = sum(s.data.nbytes for x in jax.tree_util.tree_leaves(params) for s in x.addressable_shards)
print(json.dumps({"process": pid, "seconds": seconds, "peak_rss": rss("VmHWM:"), "baseline_rss": baseline,
                  "local_param_bytes": local}), flush=True)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _load(processes: int) -> list[dict]:
  """One load in `processes` processes; each one's measurements."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  procs = [subprocess.Popen([sys.executable, "-c", _LOAD, str(port), str(processes), str(pid), F.dir, F.mesh,
                             F.target_dtype], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for pid in range(processes)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=900)
    if p.returncode:
      raise RuntimeError(f"a loading process failed:\n{err[-3000:]}")
    results.append(json.loads(out.strip().splitlines()[-1]))
  return results


def _median(values):
  values = sorted(values)
  return values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2


def main(_):
  if not os.path.exists(os.path.join(F.dir, "config.json")):
    print(f"Making a random Qwen2.5-0.5B-shaped checkpoint in {F.dir} ({F.file_dtype}) ...", flush=True)
    subprocess.run([sys.executable, "-c", load_checkpoint._MAKE, F.dir, F.file_dtype, str(F.shard_mb * 10**6)],
                   check=True)
  runs = {1: [], F.processes: []}
  for _ in range(F.rounds):
    for n in runs:
      runs[n].append(_load(n))
  summary = {}
  for n, rounds in runs.items():
    peak = _median([max(r["peak_rss"] for r in rnd) for rnd in rounds])
    above = _median([max(r["peak_rss"] - r["baseline_rss"] for r in rnd) for rnd in rounds])
    summary[n] = {"processes": n, "peak_rss_per_process": peak, "peak_above_runtime_per_process": above,
                  "load_s": _median([max(r["seconds"] for r in rnd) for rnd in rounds]),
                  "local_param_bytes": rounds[0][0]["local_param_bytes"], "runs": rounds}
  one, many = summary[1], summary[F.processes]
  ratio = many["peak_rss_per_process"] / one["peak_rss_per_process"]
  ratio_above = many["peak_above_runtime_per_process"] / one["peak_above_runtime_per_process"]
  print(f"checkpoint {F.dir} ({F.file_dtype} -> {F.target_dtype}), mesh {F.mesh} tensor_parallel, "
        f"median of {F.rounds}")
  print(f"{'processes':>9} {'peak RSS GB/process':>20} {'above runtime GB':>17} {'params GB/process':>18} {'load s':>7}")
  for s in (one, many):
    print(f"{s['processes']:>9} {s['peak_rss_per_process'] / 1e9:>20.2f} {s['peak_above_runtime_per_process'] / 1e9:>17.2f} "
          f"{s['local_param_bytes'] / 1e9:>18.2f} {s['load_s']:>7.2f}")
  print(f"per-process peak RSS, {F.processes} processes / 1: {ratio:.2f} (bar 0.65); above the runtime: "
        f"{ratio_above:.2f}")
  os.makedirs(os.path.dirname(F.dist_out), exist_ok=True)
  with open(F.dist_out, "w") as f:
    json.dump({"checkpoint": F.dir, "file_dtype": F.file_dtype, "target_dtype": F.target_dtype, "mesh": F.mesh,
               "rounds": F.rounds, "statistic": "median", "ratio_peak_rss": ratio,
               "ratio_above_runtime": ratio_above, "single": one, "multi": many,
               "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)
  print(f"wrote {F.dist_out}")


if __name__ == "__main__":
  app.run(main)
