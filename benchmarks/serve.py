"""Serving under load: aggregate decode tokens/s and time to first token at 1, 4, 8 and 16 streams.

    .venv/bin/python benchmarks/serve.py                          # 0.5B shape, float32, 1x1 and 1x8
    .venv/bin/python benchmarks/serve.py --layers 4 --meshes 1x1  # a quick look

For each mesh the server is started as a user starts it (`main.py --config=configs/serve.py` on
127.0.0.1, a free port, random weights of the Qwen2.5-0.5B shape, float32, tensor_parallel,
--config.serve.warmup so every program compiles before it listens) and driven over HTTP with
streamed /v1/completions of token-id prompts (greedy, a fixed token count: no stop ids end
them early). Per concurrency level C, C client threads each send --rounds requests back to back;
aggregate tokens/s = completion tokens of the level / its wall time; time to first token (TTFT)
= request sent to first token received, p50 / p95 over the level's requests.

Then the interference figure: a 128-token prompt alone (p50 TTFT over --probes requests), and
again while 7 other streams decode (long requests started first).

transformers' generate (float32, sdpa; on the GPU where there is one) on batches of the same
prompts runs in this process after the servers have stopped: tokens/s = batch x new tokens / wall time, prefill included as for the server.
Everything is bounded: requests per level, and --time-limit seconds per server.

Prints a table and writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import http.client
import urllib.error
import urllib.request

from results_file import write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = "qwen2.5-0.5b"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(mesh: str, port: int, args) -> subprocess.Popen:
  command = [sys.executable, "main.py", "--config=configs/serve.py", f"--config.model.preset={SHAPE}",
             "--config.model.param_dtype=float32", f"--config.mesh={mesh}", "--config.rules=tensor_parallel",
             f"--config.serve.port={port}", f"--config.serve.slots={args.slots}", "--config.serve.warmup=True",
             f"--config.serve.context={args.prompt + 4 * args.new + 16}", f"--config.serve.queue_size={4 * args.slots}"]
  if args.layers:
    command.append(f"--config.model.num_layers={args.layers}")
  log = open(os.path.join(args.log_dir, f"serve_{mesh}.log"), "w")
  return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(base: str, server: subprocess.Popen, limit_s: float, poll_s: float = 1.0) -> float:
  """Waits for the first 200 from /health; its time.perf_counter()."""
  deadline = time.monotonic() + limit_s
  while time.monotonic() < deadline:
    if server.poll() is not None:
      raise SystemExit(f"the server exited with {server.returncode} before it listened (see its log)")
    try:
      with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
        if response.status == 200:
          return time.perf_counter()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
      pass
    time.sleep(poll_s)
  raise SystemExit(f"the server did not answer /health within {limit_s:.0f} s")


def stream_one(port: int, prompt: list[int], new: int) -> dict:
  """One streamed completion (server-sent events read line by line): {'ttft_s', 'total_s', 'tokens'}."""
  body = json.dumps({"model": SHAPE, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
                     "return_token_ids": True})
  start = time.perf_counter()
  first, tokens = None, 0
  connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
  try:
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
      raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    for raw in response:
      line = raw.decode().strip()
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
      if ids and first is None:
        first = time.perf_counter() - start
      tokens += len(ids)
  finally:
    connection.close()
  return {"ttft_s": first, "total_s": time.perf_counter() - start, "tokens": tokens}


def prompts_for(count: int, length: int, seed: int, vocab: int = 151936) -> list[list[int]]:
  import numpy as np
  rng = np.random.default_rng(seed)
  return rng.integers(0, vocab, size=(count, length)).tolist()


def load_level(port: int, streams: int, rounds: int, prompt: int, new: int) -> dict:
  prompts = prompts_for(streams * rounds, prompt, seed=streams)
  results: list[dict] = []
  lock = threading.Lock()

  def client_thread(index: int) -> None:
    for r in range(rounds):
      out = stream_one(port, prompts[index * rounds + r], new)
      with lock:
        results.append(out)

  start = time.perf_counter()
  threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(streams)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - start
  ttfts = sorted(r["ttft_s"] for r in results)
  tokens = sum(r["tokens"] for r in results)
  return {"streams": streams, "requests": len(results), "tokens": tokens, "wall_s": wall,
          "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttfts),
          "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]}


def interference(port: int, prompt: int, new: int, probes: int) -> dict:
  """p50 TTFT of a `prompt`-token request alone, and while 7 long streams decode."""
  probe_prompts = prompts_for(2 * probes, prompt, seed=99)
  alone = [stream_one(port, p, 2)["ttft_s"] for p in probe_prompts[:probes]]
  stop = threading.Event()
  busy = prompts_for(7, prompt, seed=7)
  failures: list[BaseException] = []

  def background(p):
    try:
      while not stop.is_set():
        stream_one(port, p, new)
    except BaseException as error:  # noqa: BLE001 - re-raised below, in the main thread
      failures.append(error)

  threads = [threading.Thread(target=background, args=(p,), daemon=True) for p in busy]
  for t in threads:
    t.start()
  time.sleep(3.0)  # the 7 are prefilled and decoding
  loaded = [stream_one(port, p, 2)["ttft_s"] for p in probe_prompts[probes:]]
  stop.set()
  for t in threads:
    t.join()
  if failures:
    raise RuntimeError(f"a background stream failed: {failures[0]}")
  return {"alone_p50_s": statistics.median(alone), "with_7_decoding_p50_s": statistics.median(loaded),
          "ratio": statistics.median(loaded) / statistics.median(alone)}


def time_transformers(batches: list[int], prompt: int, new: int, layers: int) -> dict:
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  sys.path.insert(0, REPO)
  import qwen_logical as ql
  hf = ql.to_hf_config(ql.preset(SHAPE))
  hf.pop("torch_dtype", None)
  if layers:
    hf["num_hidden_layers"] = layers
  config = Qwen2Config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")},
                       attn_implementation="sdpa")
  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"  # the server's JAX uses the GPU where there is one
  model = Qwen2ForCausalLM(config).to(device).eval()
  out = {}
  with torch.no_grad():
    for batch in batches:
      ids = torch.tensor(prompts_for(batch, prompt, seed=batch), device=device)
      model.generate(ids[:, :8], max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm up
      start = time.perf_counter()
      model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
      if device == "cuda":
        torch.cuda.synchronize()
      out[batch] = batch * new / (time.perf_counter() - start)
      print(f"  transformers batch {batch}: {out[batch]:.1f} tok/s", flush=True)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--meshes", nargs="+", default=["1x1", "1x8"])
  parser.add_argument("--streams", nargs="+", type=int, default=[1, 4, 8, 16])
  parser.add_argument("--slots", type=int, default=16)
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--new", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=2, help="requests per client thread per level")
  parser.add_argument("--probes", type=int, default=5)
  parser.add_argument("--layers", type=int, default=0, help="fewer layers than the 0.5B's 24 (0: all)")
  parser.add_argument("--time-limit", type=float, default=1200, help="seconds per server, start included")
  parser.add_argument("--skip-transformers", action="store_true")
  parser.add_argument("--log-dir", default="/tmp")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "serve.json"))
  args = parser.parse_args()

  report = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "servers": {}}
  for mesh in args.meshes:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(mesh, port, args)
    timer = threading.Timer(args.time_limit, server.kill)
    timer.start()
    try:
      started = time.perf_counter()
      wait_healthy(base, server, args.time_limit)
      entry = {"start_s": time.perf_counter() - started, "levels": []}
      print(f"{mesh}: listening after {entry['start_s']:.0f} s", flush=True)
      for streams in args.streams:
        level = load_level(port, streams, args.rounds, args.prompt, args.new)
        entry["levels"].append(level)
        print(f"  {streams:2d} streams: {level['tokens_per_s']:7.1f} tok/s, TTFT p50 {level['ttft_p50_s']:.2f} s "
              f"p95 {level['ttft_p95_s']:.2f} s", flush=True)
      entry["interference"] = interference(port, args.prompt, 4 * args.new, args.probes)
      print(f"  TTFT of a {args.prompt}-token prompt: alone {entry['interference']['alone_p50_s']:.2f} s, with 7 "
            f"decoding {entry['interference']['with_7_decoding_p50_s']:.2f} s", flush=True)
      with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        entry["metrics_tail"] = response.read().decode()[-2000:]
      report["servers"][mesh] = entry
    finally:
      timer.cancel()
      server.terminate()
      server.wait(timeout=120)
  if not args.skip_transformers:
    report["transformers_tokens_per_s"] = time_transformers(args.streams, args.prompt, args.new, args.layers)

  hf = report.get("transformers_tokens_per_s", {})
  print(f"\n{'mesh':5} {'streams':>7} {'tok/s':>8} {'x 1 stream':>10} {'TTFT p50':>9} {'TTFT p95':>9} "
        f"{'transformers tok/s':>19} {'x transformers':>14}")
  for mesh, entry in report["servers"].items():
    single = entry["levels"][0]["tokens_per_s"]
    for level in entry["levels"]:
      theirs = hf.get(level["streams"])
      ratio = f"{level['tokens_per_s'] / theirs:14.2f}" if theirs else f"{'-':>14}"
      print(f"{mesh:5} {level['streams']:7d} {level['tokens_per_s']:8.1f} {level['tokens_per_s'] / single:10.2f} "
            f"{level['ttft_p50_s']:9.2f} {level['ttft_p95_s']:9.2f} {theirs or 0:19.1f} {ratio}")
    i = entry["interference"]
    print(f"{mesh:5} TTFT {args.prompt}-token prompt: alone {i['alone_p50_s']:.2f} s, with 7 streams decoding "
          f"{i['with_7_decoding_p50_s']:.2f} s ({i['ratio']:.2f}x)")
  write_results(args.out, report)


if __name__ == "__main__":
  main()
