"""How long a server takes to start: launch to the first 200 from /health, as a user starts it.

    .venv/bin/python benchmarks/serve_startup.py                 # ~2 minutes on 2 CPU cores
    .venv/bin/python benchmarks/serve_startup.py --mesh 1x8 --preset qwen2.5-0.5b

Runs `main.py --config=configs/serve.py --config.model.preset=PRESET --config.mesh=MESH
--config.serve.warmup=True` twice with one fresh compilation-cache directory: the first start
compiles every program, the second loads them from the cache. For each start: seconds from launch
to /health, the programs warmed up and how many XLA compiled and loaded (from the log's warm-up
line). Then one completion is served, so the programs are known to work. Prints a table and writes
benchmarks/results/serve_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

from results_file import write_results
from serve import free_port, wait_healthy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
WARMUP_LINE = re.compile(r"Warm-up: (\d+) programs ready in ([\d.]+) s \(XLA: (\d+) compiled, (\d+) loaded")
BARS = {"programs": 12, "first_start_s": 40.0, "second_start_s": 15.0}


def start(preset: str, mesh: str, cache_dir: str, log_path: str) -> dict:
  """One start: launch, wait for /health, serve one completion, stop. Its figures."""
  port = free_port()
  command = [PYTHON, "main.py", "--config=configs/serve.py", f"--config.model.preset={preset}",
             f"--config.mesh={mesh}", "--config.serve.warmup=True", f"--config.serve.port={port}",
             f"--config.compilation_cache_dir={cache_dir}"]
  launched = time.perf_counter()
  with open(log_path, "w") as log:
    server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
      ready = wait_healthy(f"http://127.0.0.1:{port}", server, limit_s=900, poll_s=0.1)
      completion = _complete(port)
    finally:
      server.terminate()
      server.wait(timeout=60)
  text = open(log_path).read()
  match = WARMUP_LINE.search(text)
  if match is None:
    raise RuntimeError(f"no warm-up line in {log_path}:\n{text[-3000:]}")
  return {"launch_to_health_s": ready - launched, "programs": int(match[1]), "warmup_s": float(match[2]),
          "xla_compiled": int(match[3]), "xla_loaded": int(match[4]), "completion_tokens": completion}


def _complete(port: int) -> int:
  with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as response:
    model = json.load(response)["data"][0]["id"]
  body = json.dumps({"model": model, "prompt": [1, 2, 3, 4], "max_tokens": 8}).encode()
  request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                   {"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=300) as response:
    return json.load(response)["usage"]["completion_tokens"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="qwen2.5-0.5b")
  parser.add_argument("--mesh", default="1x1")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "serve_startup.json"))
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    cache_dir = os.path.join(tmp, "xla")
    runs = {name: start(args.preset, args.mesh, cache_dir, os.path.join(tmp, f"{name}.log"))
            for name in ("first", "second")}
  print(f"\nServer start, {args.preset} on {args.mesh} (launch to /health; warm-up on):")
  print(f"{'start':<8} {'to /health':>11} {'programs':>9} {'warm-up':>8} {'XLA compiled':>13} {'XLA loaded':>11}")
  for name, r in runs.items():
    print(f"{name:<8} {r['launch_to_health_s']:>10.1f}s {r['programs']:>9} {r['warmup_s']:>7.1f}s "
          f"{r['xla_compiled']:>13} {r['xla_loaded']:>11}")
  bars = {"programs": runs["first"]["programs"] <= BARS["programs"],
          "first_start_s": runs["first"]["launch_to_health_s"] <= BARS["first_start_s"],
          "second_start_s": runs["second"]["launch_to_health_s"] <= BARS["second_start_s"]}
  print("bars:", ", ".join(f"{k} <= {BARS[k]}: {'met' if ok else 'NOT met'}" for k, ok in bars.items()))
  write_results(args.out, {"preset": args.preset, "mesh": args.mesh, "runs": runs, "bars": BARS, "met": bars})


if __name__ == "__main__":
  main()
