"""Checkpoint loading: time (open + model/partitioner construction + reading into shards, and the
reading alone) and peak host RSS vs the raw time to read the same safetensors with numpy.

Makes a random checkpoint of the Qwen2.5-0.5B shape (about 1 GB in bfloat16, 2 GB in float32),
then, each in a fresh process and `--repeats` times over: reads every file with numpy (raw), and
loads it onto each mesh with qwen_logical (the target dtype float32 by default). Every timed process
first reads the files once (page cache warm) and warms guest memory, right before its timer starts,
the same for raw and load; figures are medians over the repeats, the same statistic for both.
Prints a table and writes JSON.

  python benchmarks/load_checkpoint.py --file_dtype=bfloat16 --meshes=1x1,1x8
  python benchmarks/load_checkpoint.py --file_dtype=float32 --out=benchmarks/results/load_checkpoint_f32.json
Bars (issue 3): peak RSS <= 1.3 x the checkpoint's size in the target dtype; load <= 2 x raw read.
Peak RSS is the maximum over the repeats.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string("dir", None, "where to make the checkpoint (default /tmp/qwen_logical_bench_ckpt for "
                    "bfloat16 files, with _f32 / _f16 appended for the others)")
flags.DEFINE_string("file_dtype", "bfloat16", "dtype of the tensors in the files")
flags.DEFINE_string("target_dtype", "float32", "param dtype to load into")
flags.DEFINE_string("meshes", "1x1,1x8", "meshes to load onto (tensor_parallel rules)")
flags.DEFINE_string("out", "benchmarks/results/load_checkpoint.json", "JSON report")
flags.DEFINE_integer("shard_mb", 500, "max shard size of the made checkpoint, MB")
flags.DEFINE_float("warm_memory_gb", 6.0, "each timed process touches and frees this much memory right "
                   "before its timer (0: skip); on a VM the first touch of guest memory the host has taken "
                   "back is slow, which would time the VM, not the reader")
flags.DEFINE_integer("repeats", 3, "fresh processes per configuration; figures are medians")
F = flags.FLAGS

_MAKE = r"""
import json, os, sys, numpy as np, ml_dtypes
from qwen_logical.checkpoints import safetensors_io
from qwen_logical.model.config import preset
from qwen_logical.model.hf_config import to_hf_config
from qwen_logical.checkpoints.hf_names import tensor_specs
directory, dtype, shard_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = preset("qwen2.5-0.5b")
np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
os.makedirs(directory, exist_ok=True)
rng = np.random.default_rng(0)
groups, used = [[]], 0
for spec in tensor_specs(cfg):
  size = int(np.prod(spec.hf_shape)) * np.dtype(np_dtype).itemsize
  if groups[-1] and used + size > shard_bytes:
    groups.append([]); used = 0
  groups[-1].append(spec); used += size
weight_map = {}
for n, group in enumerate(groups):
  name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
  tensors = [(s.hf_name, (rng.standard_normal(s.hf_shape, np.float32) * 0.02).astype(np_dtype)) for s in group]
  safetensors_io.write_file(os.path.join(directory, name), tensors)
  weight_map.update({s.hf_name: name for s in group})
  del tensors
with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
  json.dump({"metadata": {}, "weight_map": weight_map}, f)
with open(os.path.join(directory, "config.json"), "w") as f:
  json.dump(to_hf_config(cfg.replace(param_dtype=dtype)), f)
"""

# Run by each timed process right before its timer: read the checkpoint's files through a small
# buffer (this VM pages out memory idle for a minute, page cache included, so "warm" has to be
# made sure of), touch and free `gb` of memory (numpy's large arrays use transparent huge pages, as
# the raw read's and the loader's buffers do), then reset the peak-RSS counter so that the warm-up
# does not count.
_WARM = r"""
def warm_memory(gb, directory):
  import glob, numpy as np
  buffer = bytearray(2**24)
  for path in glob.glob(directory + "/*.safetensors"):
    with open(path, "rb", buffering=0) as f:
      while f.readinto(buffer):
        pass
  chunks = [np.ones(2**28, np.uint8) for _ in range(int(gb * 4))]
  del chunks, buffer
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
"""

_RAW = _WARM + r"""
import glob, json, sys, time, numpy as np
warm_memory(float(sys.argv[2]), sys.argv[1])
start, cpu = time.perf_counter(), time.process_time()
total = 0
for path in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
  total += np.fromfile(path, dtype=np.uint8).nbytes
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                  "bytes": int(total)}))
"""

_LOAD = _WARM + r"""
import json, os, sys, time
mesh_shape, directory, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
import qwen_logical as ql
b, m = ql.parse_mesh_shape(mesh_shape)
ql.simulate_cpu_devices(b * m)
import jax
from qwen_logical.checkpoints.loader import load_checkpoint
jax.devices()
def rss(field):
  for line in open("/proc/self/status"):
    if line.startswith(field):
      return int(line.split()[1]) * 1024
from qwen_logical.checkpoints.directory import open_checkpoint
from qwen_logical.checkpoints.loader import load_params
warm_memory(float(sys.argv[4]), directory)
baseline = rss("VmRSS:")
start = time.perf_counter()
checkpoint = open_checkpoint(directory, param_dtype=dtype)
part = ql.Partitioner(checkpoint.config, ql.make_mesh(mesh_shape), ql.get_table("tensor_parallel"))
built, cpu = time.perf_counter(), time.process_time()
params = jax.block_until_ready(load_params(checkpoint, part, progress=False))
seconds = time.perf_counter() - start
read_seconds, read_cpu_seconds = time.perf_counter() - built, time.process_time() - cpu
param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
device_bytes = sum(s.data.nbytes for x in jax.tree_util.tree_leaves(params) for s in x.addressable_shards)
print(json.dumps({"seconds": seconds, "read_seconds": read_seconds, "read_cpu_seconds": read_cpu_seconds,
                  "peak_rss": rss("VmHWM:"), "baseline_rss": baseline,
                  "param_bytes": param_bytes, "bytes_on_devices": device_bytes}))
"""


def _run(code, *args):
  out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _median(values):
  return float(statistics.median(values))


def main(_):
  if F.dir is None:
    F.dir = "/tmp/qwen_logical_bench_ckpt" + {"bfloat16": "", "float32": "_f32", "float16": "_f16"}[F.file_dtype]
  config_path = os.path.join(F.dir, "config.json")
  if not os.path.exists(config_path):
    print(f"Making a random Qwen2.5-0.5B-shaped checkpoint in {F.dir} ({F.file_dtype}) ...", flush=True)
    subprocess.run([sys.executable, "-c", _MAKE, F.dir, F.file_dtype, str(F.shard_mb * 10**6)], check=True)
  with open(config_path) as f:
    made_as = json.load(f).get("torch_dtype")
  if made_as != F.file_dtype:
    raise SystemExit(f"{F.dir} holds {made_as} files, not {F.file_dtype}: pass another --dir")
  meshes = F.meshes.split(",")
  raws, loads = [], {mesh: [] for mesh in meshes}
  for _ in range(F.repeats):  # interleaved, so that a slow spell of the machine hits all alike
    raws.append(_run(_RAW, F.dir, F.warm_memory_gb))
    for mesh in meshes:
      loads[mesh].append(_run(_LOAD, mesh, F.dir, F.target_dtype, F.warm_memory_gb))
  raw_s = _median([r["seconds"] for r in raws])
  results = {"checkpoint": F.dir, "file_dtype": F.file_dtype, "target_dtype": F.target_dtype,
             "file_bytes": raws[0]["bytes"], "repeats": F.repeats, "statistic": "median",
             "raw_read_s": raw_s, "raw_read_s_all": [r["seconds"] for r in raws],
             "raw_read_cpu_s": _median([r["cpu_seconds"] for r in raws]), "loads": []}
  print(f"checkpoint: {raws[0]['bytes'] / 1e9:.2f} GB in {F.file_dtype}; raw numpy read {raw_s:.2f} s "
        f"(median of {F.repeats}: {', '.join('%.2f' % r['seconds'] for r in raws)})")
  print(f"raw read CPU {results['raw_read_cpu_s']:.2f} s; the loader's CPU s are summed over its reader threads "
        f"({os.cpu_count()} cores here)")
  print(f"{'mesh':6} {'load s':>8} {'x raw':>6} {'load_params s':>14} {'x raw':>6} {'CPU s':>6} {'per-repeat x raw':>17} {'peak RSS GB':>12} {'target GB':>10} {'RSS/target':>10} "
        f"{'(RSS-baseline)/target':>22}")
  for mesh in meshes:
    runs = loads[mesh]
    load_s, read_s = _median([r["seconds"] for r in runs]), _median([r["read_seconds"] for r in runs])
    peak, baseline = max(r["peak_rss"] for r in runs), _median([r["baseline_rss"] for r in runs])
    target = runs[0]["param_bytes"]
    row = dict(mesh=mesh, load_s=load_s, load_vs_raw=load_s / raw_s, load_params_s=read_s,
               load_params_vs_raw=read_s / raw_s, load_s_all=[r["seconds"] for r in runs],
               load_params_s_all=[r["read_seconds"] for r in runs],
               load_params_cpu_s=_median([r["read_cpu_seconds"] for r in runs]),
               # the machine's speed drifts; a ratio within one repeat compares like with like
               load_vs_raw_per_repeat=_median([r["seconds"] / w["seconds"] for r, w in zip(runs, raws)]),
               load_params_vs_raw_per_repeat=_median([r["read_seconds"] / w["seconds"] for r, w in zip(runs, raws)]),
               peak_rss=peak, baseline_rss=baseline, target_bytes=target, rss_vs_target=peak / target,
               rss_above_baseline_vs_target=(peak - baseline) / target,
               bytes_on_devices=runs[0]["bytes_on_devices"])
    row["bars_met"] = {"rss<=1.3x": row["rss_vs_target"] <= 1.3, "load<=2x_raw": row["load_vs_raw"] <= 2.0,
                       "load_params<=2x_raw": row["load_params_vs_raw"] <= 2.0}
    results["loads"].append(row)
    print(f"{mesh:6} {row['load_s']:8.2f} {row['load_vs_raw']:6.2f} {row['load_params_s']:14.2f} "
          f"{row['load_params_vs_raw']:6.2f} {row['load_params_cpu_s']:6.2f} "
          f"{row['load_vs_raw_per_repeat']:8.2f} {row['load_params_vs_raw_per_repeat']:8.2f} {row['peak_rss'] / 1e9:12.2f} "
          f"{target / 1e9:10.2f} {row['rss_vs_target']:10.2f} {row['rss_above_baseline_vs_target']:22.2f}")
  os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
  with open(F.out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {F.out}")


if __name__ == "__main__":
  app.run(main)
