"""Checkpoint loading: time (open + model/partitioner construction + reading into shards, and the
reading alone) and peak host RSS vs the raw time to read the same safetensors with numpy.

Makes a random checkpoint of the Qwen2.5-0.5B shape (about 1 GB in bfloat16, 2 GB in float32),
then, each in a fresh process: reads every file with numpy (raw), and loads it onto a mesh with
qwen_logical (the target dtype float32 by default). Prints a table and writes JSON.

  python benchmarks/load_checkpoint.py --file_dtype=bfloat16 --meshes=1x1,1x8
Bars (issue 3): peak RSS <= 1.3 x the checkpoint's size in the target dtype; load <= 2 x raw read.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string("dir", "/tmp/qwen_logical_bench_ckpt", "where to make the checkpoint")
flags.DEFINE_string("file_dtype", "bfloat16", "dtype of the tensors in the files")
flags.DEFINE_string("target_dtype", "float32", "param dtype to load into")
flags.DEFINE_string("meshes", "1x1,1x8", "meshes to load onto (tensor_parallel rules)")
flags.DEFINE_string("out", "benchmarks/results/load_checkpoint.json", "JSON report")
flags.DEFINE_integer("shard_mb", 500, "max shard size of the made checkpoint, MB")
flags.DEFINE_float("warm_memory_gb", 6.0, "touch and free this much memory first (0: skip); on a VM the "
                   "first touch of never-used guest memory is slow, which would time the VM, not the loader")
F = flags.FLAGS

_MAKE = r"""
import json, os, sys, numpy as np, ml_dtypes
from qwen_logical import safetensors_io
from qwen_logical.config import preset, to_hf_config
from qwen_logical.hf_params import tensor_specs
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

_WARM = r"""
import sys, numpy as np
chunks = [np.ones(2**28, np.uint8) for _ in range(int(float(sys.argv[1]) * 4))]
print("{}")
"""

_RAW = r"""
import glob, json, sys, time, numpy as np
start = time.perf_counter(); total = 0
for path in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
  total += np.fromfile(path, dtype=np.uint8).nbytes
print(json.dumps({"seconds": time.perf_counter() - start, "bytes": int(total)}))
"""

_LOAD = r"""
import json, os, sys, time
mesh_shape, directory, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
import qwen_logical as ql
b, m = ql.parse_mesh_shape(mesh_shape)
ql.simulate_cpu_devices(b * m)
import jax
from qwen_logical.checkpoint import load_checkpoint
jax.devices()
def rss(field):
  for line in open("/proc/self/status"):
    if line.startswith(field):
      return int(line.split()[1]) * 1024
baseline = rss("VmRSS:")
from qwen_logical.checkpoint import load_params, open_checkpoint
start = time.perf_counter()
checkpoint = open_checkpoint(directory, param_dtype=dtype)
part = ql.Partitioner(checkpoint.config, ql.make_mesh(mesh_shape), ql.get_table("tensor_parallel"))
built = time.perf_counter()
params = jax.block_until_ready(load_params(checkpoint, part, progress=False))
seconds = time.perf_counter() - start
read_seconds = time.perf_counter() - built
param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
device_bytes = sum(s.data.nbytes for x in jax.tree_util.tree_leaves(params) for s in x.addressable_shards)
print(json.dumps({"seconds": seconds, "read_seconds": read_seconds, "peak_rss": rss("VmHWM:"), "baseline_rss": baseline,
                  "param_bytes": param_bytes, "bytes_on_devices": device_bytes}))
"""


def _run(code, *args):
  out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(_):
  if not os.path.exists(os.path.join(F.dir, "config.json")):
    print(f"Making a random Qwen2.5-0.5B-shaped checkpoint in {F.dir} ({F.file_dtype}) ...", flush=True)
    subprocess.run([sys.executable, "-c", _MAKE, F.dir, F.file_dtype, str(F.shard_mb * 10**6)], check=True)
  if F.warm_memory_gb > 0:
    _run(_WARM, F.warm_memory_gb)
  _run(_RAW, F.dir)  # warm the page cache so raw read and load see the same cache state
  raw = min((_run(_RAW, F.dir) for _ in range(2)), key=lambda r: r["seconds"])
  itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}
  results = {"checkpoint": F.dir, "file_dtype": F.file_dtype, "target_dtype": F.target_dtype,
             "file_bytes": raw["bytes"], "raw_read_s": raw["seconds"], "loads": []}
  print(f"checkpoint: {raw['bytes'] / 1e9:.2f} GB in {F.file_dtype}; raw numpy read {raw['seconds']:.2f} s")
  print(f"{'mesh':6} {'load s':>8} {'x raw':>6} {'load_params s':>14} {'x raw':>6} {'peak RSS GB':>12} {'target GB':>10} {'RSS/target':>10} "
        f"{'(RSS-baseline)/target':>22}")
  for mesh in F.meshes.split(","):
    load = _run(_LOAD, mesh, F.dir, F.target_dtype)
    target = load["param_bytes"]
    row = dict(mesh=mesh, load_s=load["seconds"], load_vs_raw=load["seconds"] / raw["seconds"],
               load_params_s=load["read_seconds"], load_params_vs_raw=load["read_seconds"] / raw["seconds"],
               peak_rss=load["peak_rss"], baseline_rss=load["baseline_rss"], target_bytes=target,
               rss_vs_target=load["peak_rss"] / target,
               rss_above_baseline_vs_target=(load["peak_rss"] - load["baseline_rss"]) / target,
               bytes_on_devices=load["bytes_on_devices"])
    row["bars_met"] = {"rss<=1.3x": row["rss_vs_target"] <= 1.3, "load<=2x_raw": row["load_vs_raw"] <= 2.0}
    results["loads"].append(row)
    print(f"{mesh:6} {row['load_s']:8.2f} {row['load_vs_raw']:6.2f} {row['load_params_s']:14.2f} "
          f"{row['load_params_vs_raw']:6.2f} {row['peak_rss'] / 1e9:12.2f} "
          f"{target / 1e9:10.2f} {row['rss_vs_target']:10.2f} {row['rss_above_baseline_vs_target']:22.2f}")
  os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
  with open(F.out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {F.out}")


if __name__ == "__main__":
  app.run(main)
