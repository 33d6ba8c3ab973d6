"""Generation speed on one accelerator in bfloat16, and the share of memory bandwidth a decode step uses.

    python benchmarks/decode_bandwidth.py                         # 0.5B and 7B shapes, batches 1 8 32
    python benchmarks/decode_bandwidth.py --shapes qwen2.5-0.5b --batches 1 --transformers

Weights and compute in bfloat16 (random weights: the speed does not depend on their values), one
device (mesh 1x1), the library's own path: `Partitioner.init` then `Generator.generate`, greedy,
a prompt of --prompt tokens and --new new tokens per row, layers unrolled (ModelConfig's default) or
scanned (--layers). Rounds after the first (which compiles)
are timed; medians.

A decode step reads every parameter once and the whole preallocated KV cache once (attention reads
every slot; masked slots cost the same bytes), so

    bytes per step = parameter bytes + cache bytes,    bandwidth = bytes per step / step time,

reported against the device's copy bandwidth measured in the same run (a large device-to-device
copy, bytes read plus written) and against the card's nominal figure where --peak-gbs is given.
With --transformers, transformers' generate (bfloat16, sdpa, static token count) on the same
prompts runs in the same process for comparison.

Prints a table and writes benchmarks/results/decode_bandwidth.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from results_file import write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def copy_bandwidth_gbs(gib: float = 2.0, rounds: int = 10) -> float:
  """Device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
  import jax
  import jax.numpy as jnp
  n = int(gib * 2**30) // 4
  x = jnp.arange(n, dtype=jnp.float32)
  copy = jax.jit(lambda a: a * 1.0 + 1.0)  # one read, one write; not elided like a plain copy
  copy(x).block_until_ready()
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    copy(x).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n * 4 / statistics.median(times) / 1e9


def tree_bytes(tree) -> int:
  import jax
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def time_ours(shape: str, form: str, batches: list[int], prompt: int, new: int, rounds: int) -> list[dict]:
  import jax
  import numpy as np
  import qwen_logical as ql
  from qwen_logical.inference.generate import Generator

  cfg = ql.preset(shape).replace(param_dtype="bfloat16", dtype="bfloat16", scan_layers=form == "scanned")
  part = ql.Partitioner(cfg, ql.make_mesh("1x1", devices=jax.devices()[:1]), ql.get_table("tensor_parallel"))
  start = time.perf_counter()
  params = part.init(seed=0, progress=False)
  jax.block_until_ready(params)
  init_s = time.perf_counter() - start
  param_bytes = tree_bytes(params)
  gen = Generator(part, max_length=prompt + new)
  rng = np.random.default_rng(0)
  rows = []
  for batch in batches:
    prompts = rng.integers(0, cfg.vocab_size, size=(batch, prompt)).tolist()
    runs = []
    for _ in range(rounds + 1):
      out = gen.generate(params, prompts, max_new_tokens=new, stop_ids=())
      runs.append(out.timings)
    timed = runs[1:]
    t = timed[0]
    _, _, slots = t.batch_shape
    step_s = statistics.median(r.decode_s / r.decode_steps for r in timed)
    prefill_s = statistics.median(r.prefill_s for r in timed)
    cache_bytes = ql.kv_cache.cache_bytes(cfg, part.layout, t.batch_shape[0], slots)
    rows.append(dict(shape=shape, layers=form, batch=batch, prompt=prompt, new=new, cache_slots=slots, init_s=init_s,
                     compile_s=runs[0].compile_s, prefill_s=prefill_s, prefill_tokens_per_s=batch * prompt / prefill_s,
                     decode_ms_per_step=step_s * 1e3, decode_tokens_per_s=batch / step_s,
                     param_bytes=param_bytes, cache_bytes=cache_bytes,
                     read_gbs=(param_bytes + cache_bytes) / step_s / 1e9))
    print(f"  {shape} {form} batch {batch}: {step_s * 1e3:.2f} ms/step, {batch / step_s:.1f} tok/s", flush=True)
  del params
  return rows


def time_transformers(shape: str, batches: list[int], prompt: int, new: int, rounds: int) -> list[dict]:
  import numpy as np
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  import qwen_logical as ql

  hf = ql.to_hf_config(ql.preset(shape))
  hf.pop("torch_dtype", None)
  config = Qwen2Config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")},
                       attn_implementation="sdpa")
  torch.manual_seed(0)
  with torch.device("cuda"):
    model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
  rng = np.random.default_rng(0)
  rows = []
  for batch in batches:
    ids = torch.tensor(rng.integers(0, config.vocab_size, size=(batch, prompt)), device="cuda")
    whole, first = [], []
    with torch.no_grad():
      for r in range(rounds + 1):
        for count, out in ((1, first), (new, whole)):
          torch.cuda.synchronize()
          start = time.perf_counter()
          model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
          torch.cuda.synchronize()
          if r:
            out.append(time.perf_counter() - start)
    step_s = (statistics.median(whole) - statistics.median(first)) / (new - 1)
    rows.append(dict(shape=shape, batch=batch, prefill_s=statistics.median(first),
                     decode_ms_per_step=step_s * 1e3, decode_tokens_per_s=batch / step_s))
    print(f"  transformers {shape} batch {batch}: {step_s * 1e3:.2f} ms/step", flush=True)
  del model
  import gc
  gc.collect()
  torch.cuda.empty_cache()
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-7b"])
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
  parser.add_argument("--layers", nargs="+", default=["unrolled"], choices=["unrolled", "scanned"])
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--peak-gbs", type=float, default=0.0, help="the card's nominal bandwidth, GB/s")
  parser.add_argument("--transformers", action="store_true", help="also time transformers' generate (torch, CUDA)")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "decode_bandwidth.json"))
  args = parser.parse_args()

  ours, theirs = [], []
  if args.transformers:  # first: JAX takes most of the device's memory once it starts
    for shape in args.shapes:
      theirs += time_transformers(shape, args.batches, args.prompt, args.new, args.rounds)
  import jax
  device = jax.devices()[0]
  copy_gbs = copy_bandwidth_gbs()
  print(f"device: {device.device_kind} ({device.platform}); copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
  for shape in args.shapes:
    for form in args.layers:
      ours += time_ours(shape, form, args.batches, args.prompt, args.new, args.rounds)
  by_key = {(r["shape"], r["batch"]): r for r in theirs}

  print(f"\n{'shape':14} {'layers':9} {'batch':>5} {'ms/step':>8} {'tok/s':>9} {'GB/step':>8} {'GB/s':>7} {'% copy':>7}"
        f"{' % peak' if args.peak_gbs else ''} {'prefill tok/s':>13} {'transformers tok/s':>19}")
  for r in ours:
    r["percent_of_copy"] = 100 * r["read_gbs"] / copy_gbs
    peak = ""
    if args.peak_gbs:
      r["percent_of_peak"] = 100 * r["read_gbs"] / args.peak_gbs
      peak = f" {r['percent_of_peak']:6.1f}%"
    hf = by_key.get((r["shape"], r["batch"]))
    hf_text = f"{hf['decode_tokens_per_s']:19.1f}" if hf else f"{'-':>19}"
    print(f"{r['shape']:14} {r['layers']:9} {r['batch']:5d} {r['decode_ms_per_step']:8.2f} {r['decode_tokens_per_s']:9.1f} "
          f"{(r['param_bytes'] + r['cache_bytes']) / 1e9:8.3f} {r['read_gbs']:7.0f} {r['percent_of_copy']:6.1f}%{peak} "
          f"{r['prefill_tokens_per_s']:13.0f} {hf_text}")
  write_results(args.out, dict(device=device.device_kind, platform=device.platform, copy_gbs=copy_gbs,
                               peak_gbs=args.peak_gbs, jax=jax.__version__, args=vars(args), ours=ours,
                               transformers=theirs, date=time.strftime("%Y-%m-%d")))


if __name__ == "__main__":
  main()
