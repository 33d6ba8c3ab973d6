"""The commands as README.md writes them, timed as whole processes (what a user waits for).

    .venv/bin/python benchmarks/default_commands.py              # ~10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/default_commands.py --skip-7b    # the 0.5B part only

1. `python main.py` (the README's first command: the whole Qwen2.5-7B shape, bf16 storage, 1x8
   tensor parallel on 8 simulated CPU devices): wall time and peak RSS.
2. Decode speed of the default path on a Qwen2.5-0.5B-shaped checkpoint (transformers' random
   init, float32, saved with save_pretrained, plus a small real tokenizer): per-token decode =
   (wall of a run with --config.max_new_tokens=72 - wall with 8) / 64, for
   `main.py --config=configs/single.py --config.checkpoint=DIR --config.prompt=...` (1x1),
   the same with configs/tp8.py (1x8), and transformers `generate` in a process of its own
   (load, tokenize, generate: the same work). No flag beyond the checkpoint and prompt: the
   defaults decide the path.

Rounds are interleaved so machine noise hits every command alike; medians are reported.
Prints a table and writes benchmarks/results/default_commands.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from results_file import write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
             num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768,
             rope_theta=1e6, rms_norm_eps=1e-6)
PROMPT = "The capital of France is a city where many people live and work every day"
SHORT, LONG = 8, 72
BARS = {"decode_vs_transformers": 2.5, "mesh8_decode_ratio": 2.0, "main_7b_wall_s": 240.0,
        "main_7b_peak_rss_gb": 20.0}

_TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, new = sys.argv[1], int(sys.argv[2])
tok = AutoTokenizer.from_pretrained(directory)
model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
ids = tok(sys.argv[3], return_tensors="pt")
with torch.no_grad():
  out = model.generate(**ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
print(tok.decode(out[0, ids["input_ids"].shape[1]:]))
"""


def write_checkpoint(directory: str, layers: int) -> None:
  """A 0.5B-shaped HF checkpoint (float32 safetensors) with a small real tokenizer."""
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  sys.path.insert(0, os.path.join(REPO, "tests"))
  from tokenizer_files import write_tokenizer_dir
  torch.manual_seed(0)
  model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=layers, **SHAPE)).eval()
  model.save_pretrained(directory, safe_serialization=True)
  write_tokenizer_dir(directory)


def timed(command: list[str]) -> float:
  """Wall seconds of one whole process; raises with its output on failure."""
  start = time.perf_counter()
  process = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  wall = time.perf_counter() - start
  if process.returncode:
    raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{process.stdout[-3000:]}")
  return wall


def peak_rss_run(command: list[str]) -> dict:
  """Wall seconds and peak RSS (GB, from wait4) of one whole process."""
  start = time.perf_counter()
  pid = os.fork()
  if pid == 0:
    os.chdir(REPO)
    with open(os.devnull, "w") as sink:
      os.dup2(sink.fileno(), 1)
    os.execv(command[0], command)
  _, status, usage = os.wait4(pid, 0)
  wall = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status):
    raise RuntimeError(f"{' '.join(command)} exited {os.waitstatus_to_exitcode(status)}")
  return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 1e6}


def decode_commands(directory: str) -> dict[str, list[list[str]]]:
  """name -> [short command, long command]."""
  def ours(config: str, new: int) -> list[str]:
    return [PYTHON, "main.py", f"--config={config}", f"--config.checkpoint={directory}",
            f"--config.prompt={PROMPT}", f"--config.max_new_tokens={new}"]
  return {
      "qwen_logical 1x1 (configs/single.py)": [ours("configs/single.py", n) for n in (SHORT, LONG)],
      "qwen_logical 1x8 (configs/tp8.py)": [ours("configs/tp8.py", n) for n in (SHORT, LONG)],
      "transformers": [[PYTHON, "-c", _TRANSFORMERS, directory, str(n), PROMPT] for n in (SHORT, LONG)],
  }


def measure_decode(directory: str, rounds: int) -> dict:
  commands = decode_commands(directory)
  walls: dict[str, list[list[float]]] = {name: [[], []] for name in commands}
  for r in range(rounds):
    for name, pair in commands.items():
      for i, command in enumerate(pair):
        walls[name][i].append(timed(command))
      print(f"round {r + 1}: {name}: {walls[name][0][-1]:.1f} s / {walls[name][1][-1]:.1f} s", flush=True)
  out = {}
  for name, (short, long) in walls.items():
    per_token = [(b - a) / (LONG - SHORT) for a, b in zip(short, long)]
    out[name] = {"wall_short_s": short, "wall_long_s": long, "decode_s_per_token": per_token,
                 "decode_s_per_token_median": statistics.median(per_token)}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--layers", type=int, default=24, help="decoder layers of the 0.5B-shaped checkpoint")
  parser.add_argument("--skip-7b", action="store_true")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "default_commands.json"))
  args = parser.parse_args()
  result: dict = {"date": time.strftime("%Y-%m-%d"), "bars": BARS}
  if not args.skip_7b:
    print("python main.py (whole Qwen2.5-7B shape) ...", flush=True)
    result["main_7b"] = peak_rss_run([PYTHON, "main.py"])
    print(f"  wall {result['main_7b']['wall_s']:.0f} s, peak RSS {result['main_7b']['peak_rss_gb']:.1f} GB")
  with tempfile.TemporaryDirectory(prefix="qwen_logical_bench_") as directory:
    write_checkpoint(directory, args.layers)
    result["decode"] = measure_decode(directory, args.rounds)
  decode = result["decode"]
  hf = decode["transformers"]["decode_s_per_token_median"]
  one = decode["qwen_logical 1x1 (configs/single.py)"]["decode_s_per_token_median"]
  eight = decode["qwen_logical 1x8 (configs/tp8.py)"]["decode_s_per_token_median"]
  result["decode_vs_transformers"] = hf / one
  result["mesh8_decode_ratio"] = eight / one
  print("\ncommand                                  decode s/token (median)")
  for name, d in decode.items():
    print(f"{name:<40} {d['decode_s_per_token_median']:.4f}")
  print(f"1x1 decode speed vs transformers: {hf / one:.2f}x (bar >= {BARS['decode_vs_transformers']}x)")
  print(f"1x8 decode time / 1x1: {eight / one:.2f}x (bar <= {BARS['mesh8_decode_ratio']}x)")
  write_results(args.out, result)


if __name__ == "__main__":
  main()
