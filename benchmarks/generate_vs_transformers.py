"""Generation speed: qwen_logical vs transformers, same machine, same weights, same run.

    .venv/bin/python benchmarks/generate_vs_transformers.py            # ~5 minutes on 2 CPU cores

Qwen2.5-0.5B shape (random weights, seed 0, built once by torch and converted), float32,
batch 1, a 128-token prompt, 64 new tokens, greedy. Measures, interleaved round by round
so machine noise hits both alike (medians reported):

* transformers `generate` (torch CPU, eager, its KV cache): prefill = start to the first
  new token, decode = first to last new token (timestamps from a streamer);
* qwen_logical `Generator` on the 1x1 mesh: the same two phases from its timings;
* the memory-bandwidth roofline of decode: bytes read per step (every parameter once,
  plus the whole KV cache) / this machine's copy bandwidth (numpy, 1 and 2 threads, best);
* in a second process with 8 simulated CPU devices: decode on the 1x8 tensor-parallel mesh
  against the 1x1 mesh in that same process.

Prints a table and writes benchmarks/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from results_file import write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
             num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768,
             rope_theta=1e6, rms_norm_eps=1e-6)
BARS = {"decode_vs_transformers": 3.0, "decode_roofline_fraction": 0.6, "prefill_vs_transformers": 1.5,
        "mesh8_decode_time_ratio": 2.0}


def hf_model(layers: int):
  """The Qwen2.5-0.5B-shaped HF model with transformers' own random init (seeded: identical in
  every process), and its tensors as numpy (tied lm_head left out, as checkpoints ship it)."""
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  torch.manual_seed(0)
  config = Qwen2Config(num_hidden_layers=layers, attn_implementation="sdpa", **SHAPE)
  model = Qwen2ForCausalLM(config).eval()
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
  return model, tensors


def prompt_ids(length: int) -> list[int]:
  import numpy as np
  return np.random.RandomState(0).randint(0, 151000, length).tolist()


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
  """Bytes moved (read + write) per second by large numpy copies, 1 and 2 threads, and bytes read
  per second by read-only streams (numpy sums on 2 threads; one jitted XLA sum); best of repeats."""
  import numpy as np
  n = int(gib * 2**30) // 4
  src, dst = np.ones(n, np.float32), np.zeros(n, np.float32)

  def fastest(make_jobs) -> float:
    """Best wall time over `repeats` of running make_jobs()'s (target, args) pairs in threads."""
    best = float("inf")
    for _ in range(repeats):
      workers = [threading.Thread(target=t, args=a) for t, a in make_jobs()]
      start = time.perf_counter()
      for w in workers:
        w.start()
      for w in workers:
        w.join()
      best = min(best, time.perf_counter() - start)
    return best

  def copy(threads: int) -> float:
    bounds = [(c[0], c[-1] + 1) for c in np.array_split(np.arange(n), threads)]
    return 2 * src.nbytes / fastest(lambda: [(np.copyto, (dst[a:b], src[a:b])) for a, b in bounds])

  def read(threads: int) -> float:  # a read-only stream (sums), the access pattern of decode
    return src.nbytes / fastest(lambda: [(np.add.reduce, (p,)) for p in np.array_split(src, threads)])

  def read_xla() -> float:  # the same read-only stream as one jitted XLA reduction (all cores)
    import jax
    import jax.numpy as jnp
    array = jnp.asarray(src)
    total = jax.jit(jnp.sum).lower(array).compile()
    return src.nbytes / fastest(lambda: [(lambda: total(array).block_until_ready(), ())])

  def read_matvec() -> float:
    """Weights read per second by matrix-vector products, decode's own access pattern: one jitted
    program over 24 distinct [4864, 896] kernels (418 MB, far beyond the caches), as the MLP's."""
    import jax
    import jax.numpy as jnp
    kernels = [jnp.full((4864, 896), 1.0 + i, jnp.float32) for i in range(24)]
    x = jnp.ones((1, 1, 896), jnp.float32)
    chain = jax.jit(lambda ks, x: sum(jnp.einsum("bli,oi->blo", x, k) for k in ks))
    nbytes = sum(k.nbytes for k in kernels)
    return nbytes / fastest(lambda: [(lambda: chain(kernels, x).block_until_ready(), ())])

  result = {"1_thread_GBps": copy(1) / 1e9, "2_threads_GBps": copy(2) / 1e9}
  result["bandwidth_GBps"] = max(result.values())  # the roofline's bandwidth (copy, read + write)
  result["read_only_numpy_2_threads_GBps"] = read(2) / 1e9
  result["read_only_xla_GBps"] = read_xla() / 1e9
  result["read_only_matvec_GBps"] = read_matvec() / 1e9
  # Decode only reads: the best read-only stream is the bandwidth it could reach at most.
  result["read_only_2_threads_GBps"] = max(result["read_only_numpy_2_threads_GBps"], result["read_only_xla_GBps"],
                                           result["read_only_matvec_GBps"])
  return result


def matmul_rate(repeats: int = 10) -> dict:
  """The machine's float32 matrix-multiply speed, GFLOP/s, best of repeats: XLA (what prefill runs)
  on a 2048 cube and on the prefill's own shapes ([128, 896] x [896, 4864] and back), and numpy's BLAS
  on a 2048 cube. Prefill is compute-bound: its time is at least its FLOPs at the best of these."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  def best(run) -> float:
    run()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    return min(times)

  rng = np.random.default_rng(0)
  result = {}
  for m, k, n in ((2048, 2048, 2048), (128, 896, 4864), (128, 4864, 896)):
    a, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32)
    product = jax.jit(lambda a, w: a @ w.T)
    ja, jw = jnp.asarray(a), jnp.asarray(w)
    result[f"xla_{m}x{k}x{n}_GFLOPs"] = 2 * m * k * n / best(lambda: product(ja, jw).block_until_ready()) / 1e9
    if m == 2048:
      result[f"numpy_{m}x{k}x{n}_GFLOPs"] = 2 * m * k * n / best(lambda: a @ w.T) / 1e9
  result["best_GFLOPs"] = max(result.values())
  return result


def prefill_work(cfg, prompt: int) -> dict:
  """FLOPs of qwen_logical's prefill of `prompt` tokens (multiply-adds x 2) and the bytes of its one
  memory-bound product, the lm_head for the last token. The last layer computes queries, the o
  projection and the MLP for the last token only (its keys and values for all)."""
  import numpy as np
  e, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  q_o = 2 * e * cfg.num_heads * d
  k_v = 2 * e * cfg.num_kv_heads * d
  mlp = 3 * e * i
  layers = cfg.num_layers
  matmul = 2 * prompt * (layers * k_v + (layers - 1) * (q_o + mlp)) + 2 * (q_o + mlp)
  # causal attention, scores and weighted values: about half of prompt^2 per head per layer, x 2 products
  attention = 2 * 2 * cfg.num_heads * d * (prompt * (prompt + 1) // 2) * layers
  itemsize = np.dtype(cfg.param_dtype).itemsize
  return {"matmul_flops": matmul + attention, "lm_head_bytes": cfg.vocab_size * e * itemsize}


def time_transformers(model, prompt: list[int], new: int) -> dict:
  import torch
  from transformers.generation.streamers import BaseStreamer

  class Clock(BaseStreamer):
    def __init__(self):
      self.times, self.tokens = [], []

    def put(self, value):
      self.times.append(time.perf_counter())
      self.tokens.append(value.reshape(-1).tolist())

    def end(self):
      pass

  ids = torch.tensor([prompt])
  clock = Clock()
  with torch.no_grad():
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, eos_token_id=None, pad_token_id=0, streamer=clock)
  times = clock.times[1:]  # the first put is the prompt
  tokens = [t[0] for t in clock.tokens[1:]]
  return {"prefill_s": times[0] - start, "decode_s": times[-1] - times[0], "decode_steps": len(times) - 1,
          "tokens": tokens}


def jax_partitioner(tensors, layers: int, mesh_shape: str, scan: bool):
  import jax
  from qwen_logical.model.hf_config import from_hf_config
  from qwen_logical.checkpoints.hf_names import flax_from_hf
  from qwen_logical.sharding.mesh import make_mesh
  from qwen_logical.sharding.partitioner import Partitioner
  from qwen_logical.sharding.rules import get_table
  cfg = from_hf_config(dict(SHAPE, model_type="qwen2", num_hidden_layers=layers), scan_layers=scan)
  devices = jax.devices()[:1] if mesh_shape == "1x1" else None
  part = Partitioner(cfg, make_mesh(mesh_shape, devices=devices), get_table("tensor_parallel"))
  params = jax.block_until_ready(part.place(flax_from_hf(tensors, cfg, part.layout)))
  return part, params


def time_jax(generator, params, prompt: list[int], new: int) -> dict:
  result = generator.generate(params, [prompt], max_new_tokens=new)
  t = result.timings
  return {"prefill_s": t.prefill_s, "decode_s": t.decode_s, "decode_steps": t.decode_steps,
          "compile_s": t.compile_s, "tokens": result.tokens[0], "batch_shape": t.batch_shape}


def summarise(runs: list[dict], prompt_len: int) -> dict:
  prefill = statistics.median(r["prefill_s"] for r in runs)
  per_step = statistics.median(r["decode_s"] / r["decode_steps"] for r in runs)
  return {"prefill_s": prefill, "prefill_tokens_per_s": prompt_len / prefill,
          "decode_ms_per_token": 1e3 * per_step, "decode_tokens_per_s": 1 / per_step,
          "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs]}


def decode_bytes(part, batch: int, slots: int) -> dict:
  """Bytes one decode step reads: every parameter once (the tied embedding as the lm_head;
  the lookup reads one row) and both K and V of the whole cache (attention spans all slots)."""
  import jax
  from qwen_logical.inference import kv_cache
  params = sum(s.size * s.dtype.itemsize for s in jax.tree_util.tree_leaves(part.param_shapes))
  cache = kv_cache.cache_bytes(part.config, part.layout, batch, slots)
  return {"parameter_bytes": params, "cache_bytes": cache, "total_bytes": params + cache}


def main_process(args) -> dict:
  import jax
  from qwen_logical.inference.generate import Generator
  print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPU cores)", flush=True)
  bandwidth = copy_bandwidth()
  print(f"Copy bandwidth (read + write): {bandwidth['bandwidth_GBps']:.1f} GB/s (1 thread "
        f"{bandwidth['1_thread_GBps']:.1f}, 2 threads {bandwidth['2_threads_GBps']:.1f}); read-only stream "
        f"{bandwidth['read_only_2_threads_GBps']:.1f} GB/s (numpy {bandwidth['read_only_numpy_2_threads_GBps']:.1f}, "
        f"XLA {bandwidth['read_only_xla_GBps']:.1f}, matrix-vector {bandwidth['read_only_matvec_GBps']:.1f})", flush=True)
  gemm = matmul_rate()
  print(f"float32 matmul: best {gemm['best_GFLOPs']:.0f} GFLOP/s (" + ", ".join(
      f"{k[:-7]} {v:.0f}" for k, v in gemm.items() if k != "best_GFLOPs") + ")", flush=True)
  model, tensors = hf_model(args.layers)
  prompt = prompt_ids(args.prompt)
  part, params = jax_partitioner(tensors, args.layers, "1x1", scan=args.scan_layers)
  gen = Generator(part)
  warm = time_jax(gen, params, prompt, args.new)  # compiles prefill and decode once
  print(f"qwen_logical compile (prefill + decode): {warm['compile_s']:.1f} s", flush=True)
  time_transformers(model, prompt, 4)  # torch warm-up
  ours, theirs = [], []
  for round_ in range(args.rounds):
    theirs.append(time_transformers(model, prompt, args.new))
    ours.append(time_jax(gen, params, prompt, args.new))
    print(f"round {round_ + 1}: transformers prefill {theirs[-1]['prefill_s']:.3f} s, decode "
          f"{1e3 * theirs[-1]['decode_s'] / theirs[-1]['decode_steps']:.1f} ms/token | qwen_logical prefill "
          f"{ours[-1]['prefill_s']:.3f} s, decode {1e3 * ours[-1]['decode_s'] / ours[-1]['decode_steps']:.1f} "
          "ms/token", flush=True)
  matching = next((i for i, (a, b) in enumerate(zip(ours[0]["tokens"], theirs[0]["tokens"])) if a != b),
                  args.new)
  bytes_ = decode_bytes(part, *ours[0]["batch_shape"][::2])
  roofline_s = bytes_["total_bytes"] / (bandwidth["bandwidth_GBps"] * 1e9)
  result = {
      "transformers": summarise(theirs, args.prompt), "qwen_logical_1x1": summarise(ours, args.prompt),
      "bandwidth": bandwidth, "decode_bytes_per_step": bytes_,
      "roofline": {"decode_ms_per_token": 1e3 * roofline_s, "decode_tokens_per_s": 1 / roofline_s},
      "roofline_read_only_stream": {
          "decode_ms_per_token": 1e3 * bytes_["total_bytes"] / (bandwidth["read_only_2_threads_GBps"] * 1e9)},
      "matmul": gemm, "prefill_work": prefill_work(part.config, args.prompt),
      "greedy_tokens_equal_to_transformers": f"{matching} of {args.new}",
      "compile_s": warm["compile_s"], "batch_shape": list(ours[0]["batch_shape"]),
  }
  if args.compare_scan:
    del params
    part_s, params_s = jax_partitioner(tensors, args.layers, "1x1", scan=not args.scan_layers)
    gen_s = Generator(part_s)
    time_jax(gen_s, params_s, prompt, args.new)
    scanned = [time_jax(gen_s, params_s, prompt, args.new) for _ in range(max(1, args.rounds // 2))]
    result[f"qwen_logical_1x1_scan_layers_{not args.scan_layers}"] = summarise(scanned, args.prompt)
  return result


def mesh8_process(args) -> dict:
  """In a process with 8 simulated devices: decode on 1x8 vs 1x1, interleaved."""
  import jax
  from qwen_logical.inference.generate import Generator
  _, tensors = hf_model(args.layers)
  prompt = prompt_ids(args.prompt)
  runs = {}
  gens = {}
  for mesh in ("1x1", "1x8"):
    part, params = jax_partitioner(tensors, args.layers, mesh, scan=args.scan_layers)
    gens[mesh] = (Generator(part), params)
    time_jax(*gens[mesh], prompt, args.new)
    runs[mesh] = []
  del tensors
  for _ in range(args.rounds):
    for mesh, (gen, params) in gens.items():
      runs[mesh].append(time_jax(gen, params, prompt, args.new))
  same = runs["1x1"][0]["tokens"] == runs["1x8"][0]["tokens"]
  return {"devices": len(jax.devices()), "tokens_identical_1x1_1x8": same,
          **{f"qwen_logical_{m}": summarise(r, args.prompt) for m, r in runs.items()}}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=24, help="decoder layers (24 = Qwen2.5-0.5B)")
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--scan-layers", action="store_true",
                      help="run qwen_logical with scanned layers (default unrolled: on XLA:CPU a scanned "
                           "layer copies its parameter slices every step)")
  parser.add_argument("--compare-scan", action="store_true", help="also time the other layer layout on 1x1")
  parser.add_argument("--skip-mesh8", action="store_true")
  parser.add_argument("--mode", default="main", choices=("main", "mesh8"), help=argparse.SUPPRESS)
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "generate.json"))
  args = parser.parse_args()

  if args.mode == "mesh8":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    print("MESH8 " + json.dumps(mesh8_process(args)), flush=True)
    return

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  result = {"setup": {"model": "Qwen2.5-0.5B shape, random weights (torch seed 0)", "layers": args.layers,
                      "dtype": "float32", "batch": 1, "prompt_tokens": args.prompt, "new_tokens": args.new,
                      "greedy": True, "rounds": args.rounds, "scan_layers": args.scan_layers,
                      "cpu_cores": os.cpu_count()}}
  result.update(main_process(args))
  if not args.skip_mesh8:
    flags = [f"--layers={args.layers}", f"--prompt={args.prompt}", f"--new={args.new}",
             f"--rounds={args.rounds}", "--mode=mesh8"] + (["--scan-layers"] if args.scan_layers else [])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *flags], capture_output=True, text=True,
                          env=env)
    line = [l for l in proc.stdout.splitlines() if l.startswith("MESH8 ")]
    if proc.returncode or not line:
      raise SystemExit(f"the 1x8 process failed:\n{proc.stderr[-3000:]}")
    result["mesh8_process"] = json.loads(line[0][6:])

  ours, theirs, roof = result["qwen_logical_1x1"], result["transformers"], result["roofline"]
  ratios = {
      "decode_vs_transformers": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
      "decode_roofline_fraction": ours["decode_tokens_per_s"] / roof["decode_tokens_per_s"],
      "prefill_vs_transformers": ours["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"],
  }
  if "mesh8_process" in result:
    m8 = result["mesh8_process"]
    ratios["mesh8_decode_time_ratio"] = (m8["qwen_logical_1x8"]["decode_ms_per_token"]
                                         / m8["qwen_logical_1x1"]["decode_ms_per_token"])
  result["ratios"] = ratios
  result["bars"] = {k: {"bar": BARS[k], "value": v,
                        "met": v <= BARS[k] if k == "mesh8_decode_time_ratio" else v >= BARS[k]}
                    for k, v in ratios.items()}
  # Decode cannot beat the roofline: the fastest transformers-relative speed-up physically possible here.
  result["max_possible_decode_vs_transformers"] = roof["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
  read_roof = result["roofline_read_only_stream"]["decode_ms_per_token"]
  result["max_possible_decode_vs_transformers_read_only"] = 1e3 / read_roof / theirs["decode_tokens_per_s"]
  result["decode_fraction_of_read_only_roofline"] = read_roof / ours["decode_ms_per_token"]
  work = result["prefill_work"]
  prefill_floor_s = (work["matmul_flops"] / (result["matmul"]["best_GFLOPs"] * 1e9)
                     + work["lm_head_bytes"] / (result["bandwidth"]["read_only_2_threads_GBps"] * 1e9))
  result["prefill_floor"] = {"seconds": prefill_floor_s, "tokens_per_s": args.prompt / prefill_floor_s,
                             "GFLOP": work["matmul_flops"] / 1e9}
  result["max_possible_prefill_vs_transformers"] = args.prompt / prefill_floor_s / theirs["prefill_tokens_per_s"]
  result["prefill_fraction_of_floor"] = prefill_floor_s / ours["prefill_s"]
  result["decode_effective_GBps"] = result["decode_bytes_per_step"]["total_bytes"] / (
      ours["decode_ms_per_token"] / 1e3) / 1e9

  print(f"\n{'':30s}{'prefill tok/s':>15s}{'decode tok/s':>15s}{'decode ms/token':>17s}")
  rows = [("transformers (torch, 1 proc)", theirs), ("qwen_logical 1x1", ours)]
  rows += [(f"qwen_logical {k[13:]}", v) for k, v in result.items() if k.startswith("qwen_logical_1x1_scan")]
  if "mesh8_process" in result:
    rows += [(f"qwen_logical {m} (8-device proc)", result["mesh8_process"][f"qwen_logical_{m}"])
             for m in ("1x1", "1x8")]
  for name, r in rows:
    print(f"{name:30s}{r['prefill_tokens_per_s']:15.1f}{r['decode_tokens_per_s']:15.2f}"
          f"{r['decode_ms_per_token']:17.1f}")
  b = result["decode_bytes_per_step"]
  print(f"{'roofline (decode)':30s}{'':15s}{roof['decode_tokens_per_s']:15.2f}{roof['decode_ms_per_token']:17.1f}"
        f"   = {b['total_bytes'] / 1e9:.3f} GB/step ({b['cache_bytes'] / 1e6:.1f} MB cache) / "
        f"{result['bandwidth']['bandwidth_GBps']:.1f} GB/s")
  print(f"decode reads {result['decode_effective_GBps']:.1f} GB/s; against a read-only stream "
        f"({result['bandwidth']['read_only_2_threads_GBps']:.1f} GB/s, roofline {read_roof:.1f} ms/token) that is "
        f"{result['decode_fraction_of_read_only_roofline']:.0%} of the roofline")
  floor = result["prefill_floor"]
  print(f"prefill floor: {floor['GFLOP']:.1f} GFLOP at {result['matmul']['best_GFLOPs']:.0f} GFLOP/s + the lm_head "
        f"read = {floor['seconds']:.3f} s ({floor['tokens_per_s']:.0f} tok/s); qwen_logical's prefill is "
        f"{result['prefill_fraction_of_floor']:.0%} of it")
  print(f"greedy tokens equal to transformers: {result['greedy_tokens_equal_to_transformers']}")
  for k, v in result["bars"].items():
    print(f"bar {k}: {v['value']:.2f} (bar {v['bar']}) {'MET' if v['met'] else 'NOT MET'}")
  print(f"(the roofline allows at most {result['max_possible_decode_vs_transformers']:.2f}x transformers' decode "
        f"here; the read-only stream {result['max_possible_decode_vs_transformers_read_only']:.2f}x; the prefill "
        f"floor {result['max_possible_prefill_vs_transformers']:.2f}x transformers' prefill)")
  write_results(args.out, result)


if __name__ == "__main__":
  main()
