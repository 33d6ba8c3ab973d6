"""Generation speed by weight storage: float32, bfloat16 and int8 on the Qwen2.5-0.5B shape, 1x1 and 1x8,
next to transformers in the same run.

    .venv/bin/python benchmarks/storage_dtypes.py                 # ~10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/storage_dtypes.py --layers 4      # a quick look

One process with 8 simulated CPU devices (1x1 uses the first). The model is transformers' random
init (seed 0) saved with save_pretrained (float32 safetensors) and loaded by qwen_logical with
--config.model.param_dtype / quantization as a user would; compute is float32. Batch 1, a 64-token
prompt, 32 new tokens, greedy; rounds interleave every setting and transformers; medians.
Bytes per decode step: every stored parameter once (int8 kernels plus their float32 scales) plus
both K and V of the whole cache.

Prints a table and writes benchmarks/results/storage_dtypes.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from results_file import write_results

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
             num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768,
             rope_theta=1e6, rms_norm_eps=1e-6)
STORAGES = {"float32": dict(param_dtype="float32"), "bfloat16": dict(param_dtype="bfloat16"),
            "int8": dict(param_dtype="float32", quantization="int8")}


def write_checkpoint(directory: str, layers: int):
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  torch.manual_seed(0)
  model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=layers, attn_implementation="sdpa", **SHAPE)).eval()
  model.save_pretrained(directory, safe_serialization=True)
  return model


def time_transformers(model, prompt: list[int], new: int) -> dict:
  import torch
  ids = torch.tensor([prompt])
  with torch.no_grad():
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    whole = time.perf_counter() - start
  return {"prefill_s": prefill, "decode_s_per_token": max(whole - prefill, 1e-9) / (new - 1)}


def setting(directory: str, storage: str, mesh: str):
  """(Generator, params, bytes per decode step) for one storage on one mesh."""
  import jax
  from qwen_logical.checkpoints.loader import load_checkpoint
  from qwen_logical.inference.generate import Generator
  from qwen_logical.sharding.mesh import make_mesh
  from qwen_logical.sharding.rules import get_table
  devices = jax.devices()[:1] if mesh == "1x1" else None
  params, _, part = load_checkpoint(directory, make_mesh(mesh, devices=devices), get_table("tensor_parallel"),
                                    scan_layers=False, progress=False, **STORAGES[storage])
  gen = Generator(part)
  param_bytes = sum(s.size * s.dtype.itemsize for s in jax.tree_util.tree_leaves(part.param_shapes))
  return gen, params, part, param_bytes


def time_ours(gen, params, prompt: list[int], new: int) -> dict:
  t = gen.generate(params, [prompt], max_new_tokens=new).timings
  return {"prefill_s": t.prefill_s, "decode_s_per_token": t.decode_s / t.decode_steps, "batch_shape": t.batch_shape}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=24)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--new", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "storage_dtypes.json"))
  args = parser.parse_args()
  import numpy as np
  from qwen_logical.inference import kv_cache
  prompt = np.random.RandomState(0).randint(0, 151000, args.prompt).tolist()
  runs: dict[str, list[dict]] = {}
  with tempfile.TemporaryDirectory(prefix="qwen_logical_storage_") as directory:
    model = write_checkpoint(directory, args.layers)
    settings = {}
    for storage in STORAGES:
      for mesh in ("1x1", "1x8"):
        gen, params, part, param_bytes = setting(directory, storage, mesh)
        warm = time_ours(gen, params, prompt, args.new)  # compiles
        batch, _, slots = warm["batch_shape"]
        step_bytes = param_bytes + kv_cache.cache_bytes(part.config, part.layout, batch, slots)
        settings[f"{storage} {mesh}"] = (gen, params, step_bytes)
        print(f"{storage} {mesh}: ready ({step_bytes / 2**20:.0f} MiB per decode step)", flush=True)
    time_transformers(model, prompt, 4)
    for r in range(args.rounds):
      runs.setdefault("transformers float32", []).append(time_transformers(model, prompt, args.new))
      for name, (gen, params, _) in settings.items():
        runs.setdefault(name, []).append(time_ours(gen, params, prompt, args.new))
      print(f"round {r + 1} done", flush=True)
  result = {"date": time.strftime("%Y-%m-%d"), "layers": args.layers, "prompt": args.prompt, "new": args.new,
            "settings": {}}
  hf = statistics.median(x["decode_s_per_token"] for x in runs["transformers float32"])
  print(f"\n{'setting':<22} {'prefill tok/s':>13} {'decode tok/s':>12} {'MiB/step':>9} {'GB/s read':>9} "
        f"{'decode vs HF':>12}")
  for name, rs in runs.items():
    prefill = statistics.median(x["prefill_s"] for x in rs)
    decode = statistics.median(x["decode_s_per_token"] for x in rs)
    step_bytes = settings[name][2] if name in settings else None
    entry = {"prefill_tokens_per_s": args.prompt / prefill, "decode_tokens_per_s": 1 / decode,
             "decode_vs_transformers": hf / decode, "bytes_per_step": step_bytes,
             "read_GBps": step_bytes / decode / 1e9 if step_bytes else None}
    result["settings"][name] = entry
    print(f"{name:<22} {entry['prefill_tokens_per_s']:>13.1f} {entry['decode_tokens_per_s']:>12.2f} "
          f"{(step_bytes or 0) / 2**20:>9.0f} {entry['read_GBps'] or 0:>9.2f} {entry['decode_vs_transformers']:>11.2f}x")
  write_results(args.out, result)


if __name__ == "__main__":
  main()
