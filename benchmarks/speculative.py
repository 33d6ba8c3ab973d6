"""Speculative decoding against plain decoding on real-size models, side by side in one run.

    .venv/bin/python benchmarks/speculative.py                    # prompt lookup on the 0.5B shape, ~4 min
    .venv/bin/python benchmarks/speculative.py --draft            # + a 1.5B-shape target, 0.5B-shape draft, ~8 min
    .venv/bin/python benchmarks/speculative.py --kv-cache          # + int8 / bfloat16 KV cache bytes and decode

The models are Qwen2.5 shapes in float32 (every weight read on every pass, as a real checkpoint's),
untied heads, whose weights make greedy decoding follow a fixed walk through the vocabulary: token t
is followed by walk[t] (the layers' output projections are zero, so the residual stream is the
token's embedding, and the head row of walk[t] is t's embedding). No checkpoint can be downloaded
here, and a random model only repeats one token, where drafting is trivially right; this one's text
is a long non-repeating sequence, so what is drafted and what is accepted is decided as for real text:

* "copy": the prompt holds a 60-line "file" (480 tokens of the walk) with one token changed in
  line 20, and ends where the file starts, so the model writes the file out (unchanged): prompt
  lookup drafts from the prompt, misses at the changed token and picks the copy up again;
* "free": the prompt holds no stretch of the walk, so lookup finds nothing to draft (its cost alone).

Each case runs plain and speculative `generate` alternately (`--rounds`), after one warm-up call
each (compilation), and compares the tokens (they must be identical) and decode tokens/s (medians).
Prints a table and writes benchmarks/results/speculative.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_file import write_results  # noqa: E402

from qwen_logical.checkpoints.hf_names import flax_from_hf  # noqa: E402
from qwen_logical.inference import kv_cache  # noqa: E402
from qwen_logical.inference.generate import Generator  # noqa: E402
from qwen_logical.inference.speculative import DraftModel, Speculation  # noqa: E402
from qwen_logical.model.config import preset  # noqa: E402
from qwen_logical.sharding.mesh import make_mesh  # noqa: E402
from qwen_logical.sharding.partitioner import Partitioner  # noqa: E402
from qwen_logical.sharding.rules import get_table  # noqa: E402


def walk_of(vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).permutation(vocab).astype(np.int64)


def walk_tensors(cfg, walk: np.ndarray, seed: int = 1) -> dict[str, np.ndarray]:
  """HF-named float32 tensors of a model whose greedy text follows `walk`."""
  rng = np.random.default_rng(seed)
  e, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
  embedding = rng.standard_normal((cfg.vocab_size, e), dtype=np.float32)
  head = np.empty_like(embedding)
  head[walk] = embedding  # the head row of walk[t] is t's embedding
  tensors = {"model.embed_tokens.weight": embedding, "lm_head.weight": head,
             "model.norm.weight": np.ones(e, np.float32)}
  for n in range(cfg.num_layers):
    p = f"model.layers.{n}."
    tensors.update({
        p + "input_layernorm.weight": np.ones(e, np.float32),
        p + "post_attention_layernorm.weight": np.ones(e, np.float32),
        p + "self_attn.q_proj.weight": normal(q, e), p + "self_attn.q_proj.bias": np.zeros(q, np.float32),
        p + "self_attn.k_proj.weight": normal(kv, e), p + "self_attn.k_proj.bias": np.zeros(kv, np.float32),
        p + "self_attn.v_proj.weight": normal(kv, e), p + "self_attn.v_proj.bias": np.zeros(kv, np.float32),
        p + "self_attn.o_proj.weight": np.zeros((e, q), np.float32),
        p + "mlp.gate_proj.weight": normal(i, e), p + "mlp.up_proj.weight": normal(i, e),
        p + "mlp.down_proj.weight": np.zeros((e, i), np.float32)})
  return tensors


def walk_model(name: str, walk: np.ndarray, kv_dtype: str = ""):
  cfg = preset(name).replace(param_dtype="float32", dtype="float32", tie_word_embeddings=False,
                             kv_cache_dtype=kv_dtype)
  part = Partitioner(cfg, make_mesh("1x1"), get_table("tensor_parallel"))
  start = time.perf_counter()
  params = part.place(flax_from_hf(walk_tensors(cfg, walk), cfg, part.layout))
  seconds = time.perf_counter() - start
  print(f"{name}: {cfg.num_parameters / 1e9:.2f}B parameters (untied head) built in {seconds:.0f} s", flush=True)
  return part, params


def prompts(walk: np.ndarray, seed: int = 2) -> dict[str, list[int]]:
  rng = np.random.RandomState(seed)
  start = int(rng.randint(len(walk)))
  file = [int(walk[start])]
  while len(file) < 480:  # 60 lines of 8 tokens
    file.append(int(walk[file[-1]]))
  edited = list(file)
  edited[19 * 8 + 3] = int(rng.randint(len(walk)))  # one token of line 20 changed
  instruction = rng.randint(len(walk), size=12).tolist()
  copy = instruction + edited + instruction[:5] + [start]  # ends where the file starts
  free = rng.randint(len(walk), size=len(copy)).tolist()
  return {"copy": copy, "free": free}


def compare(part, params, prompt, spec: Speculation, new_tokens: int, rounds: int) -> dict:
  plain, fast = Generator(part), Generator(part, speculation=spec)
  for gen in (plain, fast):  # compile
    gen.generate(params, [prompt], max_new_tokens=8)
  rates, tokens, last = {"plain": [], "speculative": []}, {}, None
  for _ in range(rounds):
    for label, gen in (("plain", plain), ("speculative", fast)):
      result = gen.generate(params, [prompt], max_new_tokens=new_tokens)
      rates[label].append(result.timings.decode_tokens_per_s)
      tokens[label] = result.tokens[0]
      last = result.timings if label == "speculative" else last
  plain_rate, spec_rate = statistics.median(rates["plain"]), statistics.median(rates["speculative"])
  return {"identical": tokens["plain"] == tokens["speculative"], "plain_tokens_per_s": plain_rate,
          "speculative_tokens_per_s": spec_rate, "speedup": spec_rate / plain_rate,
          "acceptance": last.acceptance_rate, "tokens_per_round": last.tokens_per_round, "rates": rates,
          "new_tokens": new_tokens}


def show(rows: dict) -> None:
  print(f"\n{'case':34} {'identical':>9} {'plain tok/s':>11} {'spec tok/s':>10} {'speed-up':>8} "
        f"{'accepted':>8} {'tok/round':>9}")
  for case, r in rows.items():
    print(f"{case:34} {str(r['identical']):>9} {r['plain_tokens_per_s']:11.1f} {r['speculative_tokens_per_s']:10.1f} "
          f"{r['speedup']:7.2f}x {r['acceptance']:8.1%} {r['tokens_per_round']:9.2f}")


def kv_cache_rows(walk, prompt, new_tokens: int) -> dict:
  out = {}
  base = None
  for kv_dtype in ("", "bfloat16", "int8"):
    part, params = walk_model("qwen2.5-0.5b", walk, kv_dtype)
    gen = Generator(part)
    gen.generate(params, [prompt], max_new_tokens=8)
    result = gen.generate(params, [prompt], max_new_tokens=new_tokens)
    base = base or result.tokens[0]
    agree = float(np.mean([a == b for a, b in zip(base, result.tokens[0])]))
    out[kv_dtype or "float32"] = {"bytes_per_slot": kv_cache.bytes_per_slot(part.config, part.layout),
                                  "decode_tokens_per_s": result.timings.decode_tokens_per_s,
                                  "greedy_agreement": agree}
    del params
  f32 = out["float32"]["bytes_per_slot"]
  print(f"\n{'KV cache':10} {'bytes/slot':>10} {'vs float32':>10} {'decode tok/s':>12} {'agreement':>9}")
  for name, r in out.items():
    print(f"{name:10} {r['bytes_per_slot']:10d} {f32 / r['bytes_per_slot']:9.2f}x {r['decode_tokens_per_s']:12.1f} "
          f"{r['greedy_agreement']:9.1%}")
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--draft", action="store_true", help="also a 1.5B-shape target with a 0.5B-shape draft")
  parser.add_argument("--kv-cache", action="store_true", help="also the KV cache storage dtypes")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "speculative.json"))
  args = parser.parse_args()
  walk = walk_of(preset("qwen2.5-0.5b").vocab_size)
  cases = prompts(walk)
  rows: dict = {}
  part, params = walk_model("qwen2.5-0.5b", walk)
  lookup = Speculation("prompt_lookup")
  for case, prompt in cases.items():
    rows[f"0.5B prompt lookup, {case}"] = compare(part, params, prompt, lookup, args.new_tokens, args.rounds)
    show({k: rows[k] for k in list(rows)[-1:]})
  result = {"cases": rows, "speculation": {"num_tokens": lookup.num_tokens, "ngram": lookup.ngram}}
  if args.draft:
    target, target_params = walk_model("qwen2.5-1.5b", walk)
    draft = Speculation("draft", num_tokens=lookup.num_tokens, draft=DraftModel(part, params))
    for case in ("copy", "free"):
      rows[f"1.5B target, 0.5B draft, {case}"] = compare(target, target_params, cases[case], draft,
                                                         args.new_tokens // 2, args.rounds)
      show({k: rows[k] for k in list(rows)[-1:]})
    del target_params
  if args.kv_cache:
    del params
    result["kv_cache"] = kv_cache_rows(walk, cases["free"], args.new_tokens)
  show(rows)
  write_results(args.out, result)


if __name__ == "__main__":
  main()
