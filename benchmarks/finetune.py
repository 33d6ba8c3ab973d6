"""Fine-tuning speed and memory on the Qwen2.5-0.5B shape: 1x8 under tensor_parallel, fsdp and tp_fsdp, and
1x1, next to transformers + torch (the same batch, float32, an AdamW step) in the same run.

    .venv/bin/python benchmarks/finetune.py                          # all 24 layers (a big machine)
    .venv/bin/python benchmarks/finetune.py --layers 2 --steps 2     # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/finetune.py --layers 2 --lora 8      # adds LoRA rank 8 (1x8 tensor_parallel)

Every configuration runs in a process of its own (8 simulated CPU devices; 1x1 uses the first), so
its peak host memory is that process's own (`os.wait4`'s ru_maxrss: weights, Adam moments, gradients,
activations and the compiler). The model is the 0.5B shape (vocabulary 151936, hidden 896, 14 query /
2 KV heads, tied embeddings) with --layers decoder layers, random float32 weights; every token of the
[batch, length] batch is trained. An optimizer step is AdamW (weight decay 0.01) after global-norm
clipping at 1.0, on every parameter (or on LoRA adapters). Layer form as the job picks it (scanned
under a table that gathers weights, unrolled otherwise, on CPU). The first step (compilation
included) is reported apart; step times are medians of --steps more.

tokens/s = batch x length / step time. MFU = FLOPs per token x tokens/s / peak: 6 x parameters for full
fine-tuning, 4 x parameters + 2 x the adapted kernels' parameters for LoRA (no weight gradient for the
embedding; the adapted kernels' full gradients are formed, then projected on A and B). The peak is the
FLOP/s of a float32 matrix product on every device at once (8 simulated CPU devices: what the host's
cores give together; `--peak-tflops` for a data-sheet figure instead), the same peak for every row.
On an accelerator (one device) run `--configs '1x1 tensor_parallel,transformers + torch'`; torch then
runs on CUDA with TF32 products, as JAX's float32 products are by default on NVIDIA GPUs.

Each row also gives the CPU seconds (all threads of its process) per step and their ratio to torch's:
on a shared host they move less with the other work than the wall time does.

Prints a table and writes benchmarks/results/finetune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from results_file import write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
             num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768,
             rope_theta=1e6, rms_norm_eps=1e-6)
OURS = (("1x8", "tensor_parallel"), ("1x8", "fsdp"), ("1x8", "tp_fsdp"), ("1x1", "tensor_parallel"))


def batch_arrays(batch: int, length: int):
  import numpy as np
  tokens = np.random.RandomState(0).randint(0, SHAPE["vocab_size"], (batch, length)).astype(np.int32)
  return {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": np.ones(tokens.shape, np.float32)}


def timed(step, count: int) -> dict:
  first_start = time.perf_counter()
  step()
  first = time.perf_counter() - first_start
  times, cpu = [], []
  for _ in range(count):
    start, before = time.perf_counter(), os.times()
    loss = step()
    times.append(time.perf_counter() - start)
    after = os.times()
    cpu.append(after.user + after.system - before.user - before.system)
  # CPU seconds (all threads) per step: on a shared host less disturbed by other work than the wall time.
  return {"first_step_s": first, "step_s": statistics.median(times), "steps_s": times, "loss": loss,
          "step_cpu_s": statistics.median(cpu)}


def run_ours(spec: dict) -> dict:
  """One configuration of qwen_logical (in this worker process)."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  sys.path.insert(0, REPO)
  import jax
  from types import SimpleNamespace
  from qwen_logical.jobs.common.build import gathers_weights, scan_layers_for
  from qwen_logical.model.config import preset
  from qwen_logical.sharding.mesh import make_mesh
  from qwen_logical.sharding.partitioner import Partitioner
  from qwen_logical.sharding.rules import get_table
  from qwen_logical.training import lora
  from qwen_logical.training.loop import measure_peak_flops
  from qwen_logical.training.optimizer import OptimizerSettings, make_optimizer
  from qwen_logical.training.state import init_state
  from qwen_logical.training.step import make_train_step

  mesh = make_mesh(spec["mesh"], devices=jax.devices()[:1] if spec["mesh"] == "1x1" else None)
  table = get_table(spec["table"])
  scan = scan_layers_for(None, jax.default_backend(), gathers_weights(table, dict(mesh.shape)))
  config = preset("qwen2.5-0.5b").replace(num_layers=spec["layers"], scan_layers=scan)
  part = Partitioner(config, mesh, table)
  params = part.init(0, progress=False)
  optimizer = make_optimizer(OptimizerSettings(learning_rate=1e-5, warmup_steps=0, steps=1000,
                                               weight_decay=0.01, clip_norm=1.0))
  trainable, frozen, combine, axes, shapes = params, None, None, None, None
  if spec["lora"]:
    trainable, frozen, combine, axes, shapes = lora.setup(part, params, SimpleNamespace(
        lora_rank=spec["lora"], lora_alpha=2.0 * spec["lora"], lora_targets="q,k,v,o,gate,up,down", seed=0))
  fns = make_train_step(part, optimizer, combine=combine, clip_norm=1.0, trainable_axes=axes, trainable_shapes=shapes)
  state = [init_state(part, optimizer, trainable, axes)]
  del trainable
  batch = batch_arrays(spec["batch"], spec["length"])

  def step():
    state[0], metrics = fns.train_step(state[0], frozen, batch)
    return float(metrics["loss"])

  result = timed(step, spec["steps"])
  peak_mesh = make_mesh(f"1x{len(jax.devices())}")  # every device: what the host (or accelerator) gives
  size = 512 if jax.default_backend() == "cpu" else 8192
  adapted = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
                if spec["lora"] and str(p[-1].key) in lora.TARGETS.values())
  # Forward 2N and input gradients 2N per token; weight gradients 2N (full), or of the adapted kernels
  # only (LoRA's effective-kernel form still forms their full gradient before projecting it on A and B).
  flops = 2 * config.num_parameters * 2 + 2 * (adapted if spec["lora"] else config.num_parameters)
  result.update(backend=jax.default_backend(), scan_layers=scan, parameters=config.num_parameters,
                flops_per_token=flops,
                peak_flops=measure_peak_flops(peak_mesh, size=size),
                trainable=sum(x.size for x in jax.tree_util.tree_leaves(state[0].trainable)))
  return result


def run_transformers(spec: dict) -> dict:
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  # JAX's default precision for float32 products on NVIDIA GPUs is TF32; give torch the same.
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = device == "cuda"
  model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=spec["layers"], attn_implementation="sdpa", **SHAPE))
  model.to(device).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
  tokens = torch.tensor(batch_arrays(spec["batch"], spec["length"])["tokens"], dtype=torch.long, device=device)

  def step():
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())

  result = timed(step, spec["steps"])  # float(loss) waits for the step's queued work
  parameters = sum(p.numel() for p in model.parameters())
  result.update(parameters=parameters, flops_per_token=6 * parameters, backend=device)
  return result


def worker(spec: dict) -> None:
  result = run_transformers(spec) if spec["kind"] == "transformers" else run_ours(spec)
  with open(spec["out"], "w") as f:
    json.dump(result, f)


def measure(spec: dict, timeout_s: float) -> dict:
  """Runs one configuration in a process of its own: its result plus peak host memory, or why it failed."""
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    spec = {**spec, "out": f.name}
  process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  killer = threading.Timer(timeout_s, process.kill)
  killer.start()
  errors = process.stderr.read()  # read before waiting: a full pipe would block the worker
  _, status, usage = os.wait4(process.pid, 0)
  timed_out = killer.finished.is_set()
  killer.cancel()
  process.returncode = code = os.waitstatus_to_exitcode(status)
  result = {"peak_host_GiB": usage.ru_maxrss * 1024 / 2**30}
  if code != 0 or os.path.getsize(spec["out"]) == 0:
    reason = f"timed out after {timeout_s:.0f} s" if timed_out else f"exit {code}"
    result["error"] = f"{reason}: {errors.strip().splitlines()[-1] if errors.strip() else ''}"
  else:
    with open(spec["out"]) as f:
      result.update(json.load(f))
  os.unlink(spec["out"])
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=24, help="decoder layers (the 0.5B has 24)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
  parser.add_argument("--lora", type=int, default=0, help="also LoRA of this rank (all seven projections)")
  parser.add_argument("--lora-mesh", default="1x8", help="the mesh of the LoRA row (tensor_parallel)")
  parser.add_argument("--peak-tflops", type=float, default=0.0, help="the host's peak instead of measuring")
  parser.add_argument("--configs", default="", help="comma-separated subset of the configuration names "
                      "(e.g. '1x1 tensor_parallel,transformers + torch' on one accelerator)")
  parser.add_argument("--repeat", type=int, default=1, help="passes over every configuration; each row "
                      "keeps its fastest pass (on a shared host the least disturbed one)")
  parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "finetune.json"))
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(json.loads(args.worker))
  common = dict(layers=args.layers, batch=args.batch, length=args.length, steps=args.steps)
  specs = {f"{mesh} {table}": dict(kind="ours", mesh=mesh, table=table, lora=0, **common) for mesh, table in OURS}
  if args.lora:
    specs[f"{args.lora_mesh} tensor_parallel LoRA r={args.lora}"] = dict(
        kind="ours", mesh=args.lora_mesh, table="tensor_parallel", lora=args.lora, **common)
  specs["transformers + torch"] = dict(kind="transformers", **common)
  if args.configs:
    chosen = [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in chosen if c not in specs]
    if unknown:
      parser.error(f"unknown configuration(s) {unknown}; known: {list(specs)}")
    specs = {name: specs[name] for name in chosen}
  results, load = {}, [os.getloadavg()[0]]
  for round_ in range(args.repeat):
    for name, spec in specs.items():
      result = measure(spec, args.timeout)
      load.append(os.getloadavg()[0])
      said = result.get("error") or f"{result['step_s']:.2f} s per step"
      print(f"pass {round_ + 1}, {name}: {said}", flush=True)
      results[name] = best_of(results.get(name), result)
  report(args, results, load)


def best_of(kept: dict | None, new: dict) -> dict:
  """The faster pass of a configuration, with every pass's step time and the largest peak memory."""
  if kept is None:
    return {**new, "passes_step_s": [new.get("step_s")]}
  passes = kept["passes_step_s"] + [new.get("step_s")]
  faster = new if "error" not in new and ("error" in kept or new["step_s"] < kept["step_s"]) else kept
  return {**faster, "passes_step_s": passes, "peak_host_GiB": max(kept["peak_host_GiB"], new["peak_host_GiB"])}


def report(args, results: dict, load: list[float]) -> None:
  peaks = [r["peak_flops"] for r in results.values() if "peak_flops" in r]
  peak = args.peak_tflops * 1e12 if args.peak_tflops else (max(peaks) if peaks else float("nan"))
  tokens = args.batch * args.length
  hf = results.get("transformers + torch", {}).get("step_s")
  hf_cpu = results.get("transformers + torch", {}).get("step_cpu_s")
  print(f"\n0.5B shape, {args.layers} layers, batch {args.batch} x {args.length} tokens, float32, AdamW; "
        f"peak {peak / 1e9:.0f} GFLOP/s; host load average (1 min) {min(load):.1f} to {max(load):.1f} "
        f"on {os.cpu_count()} cores\n")
  print(f"{'configuration':<32} {'first step s':>12} {'step s':>8} {'tokens/s':>9} {'MFU':>7} "
        f"{'peak host GiB':>13} {'vs torch':>8} {'step CPU s':>10} {'vs torch':>8}")
  for name, r in results.items():
    if "error" in r:
      print(f"{name:<32} {r['error']}")
      continue
    r["tokens_per_s"] = tokens / r["step_s"]
    r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak
    r["speed_vs_transformers"] = hf / r["step_s"] if hf else None
    on_cpu = r.get("backend") == "cpu"  # on an accelerator the host's CPU time says nothing
    r["cpu_vs_transformers"] = hf_cpu / r["step_cpu_s"] if hf_cpu and on_cpu else None
    ratio = lambda x: f"{x:>7.2f}x" if x else f"{'-':>8}"
    print(f"{name:<32} {r['first_step_s']:>12.1f} {r['step_s']:>8.2f} {r['tokens_per_s']:>9.0f} "
          f"{100 * r['mfu']:>6.1f}% {r['peak_host_GiB']:>13.2f} {ratio(r['speed_vs_transformers'])} "
          f"{r['step_cpu_s']:>10.2f} {ratio(r['cpu_vs_transformers'])}")
  write_results(args.out, {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                           "layers": args.layers, "batch": args.batch, "length": args.length,
                           "peak_flops": peak, "load_average": load, "cpu_count": os.cpu_count(),
                           "configurations": results})


if __name__ == "__main__":
  main()
