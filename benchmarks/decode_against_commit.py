"""Decode speed of this checkout against an earlier commit: the same command, interleaved, one run.

    .venv/bin/python benchmarks/decode_against_commit.py --baseline 7781575            # ~6 minutes
    .venv/bin/python benchmarks/decode_against_commit.py --baseline HEAD~3 --config configs/tp8.py

Both sides run `main.py --config=CONFIG --config.checkpoint=DIR --config.prompt=...
--config.max_new_tokens=64` as the README writes it (no other flag), on a Qwen2.5-0.5B-shaped
checkpoint (transformers' random init, float32, a small real tokenizer; built once, as
benchmarks/default_commands.py does), the baseline from a git worktree of the commit, with this
checkout's virtual environment. Rounds alternate the two so machine noise hits both alike; each
run's decode tokens/s is read from its generation summary, and medians are compared.
Prints a table and writes benchmarks/results/decode_against_commit.json.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

from default_commands import write_checkpoint
from results_file import write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
PROMPT = "Repeat this list exactly: apples, pears, plums, cherries, apples, pears, plums, cherries."
SUMMARY = re.compile(r"Generation: prefill ([\d.]+) tokens/s, decode ([\d.]+) tokens/s")


def decode_rate(checkout: str, config: str, checkpoint: str, new_tokens: int) -> float:
  command = [PYTHON, "main.py", f"--config={config}", f"--config.checkpoint={checkpoint}",
             f"--config.prompt={PROMPT}", f"--config.max_new_tokens={new_tokens}"]
  process = subprocess.run(command, cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  match = SUMMARY.search(process.stdout)
  if process.returncode or match is None:
    raise RuntimeError(f"{checkout}: {' '.join(command)} failed ({process.returncode}):\n{process.stdout[-3000:]}")
  return float(match[2])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--baseline", required=True, help="a commit (sha, tag, HEAD~n)")
  parser.add_argument("--config", default="configs/single.py")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--checkpoint", default="", help="an existing 0.5B-shaped HF directory (default: built)")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "decode_against_commit.json"))
  args = parser.parse_args()
  baseline = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=REPO, check=True,
                            stdout=subprocess.PIPE, text=True).stdout.strip()
  head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True, stdout=subprocess.PIPE,
                        text=True).stdout.strip()
  with tempfile.TemporaryDirectory() as tmp:
    checkpoint = args.checkpoint or os.path.join(tmp, "checkpoint")
    if not args.checkpoint:
      write_checkpoint(checkpoint, layers=24)
    worktree = os.path.join(tmp, "baseline")
    subprocess.run(["git", "worktree", "add", "--detach", worktree, baseline], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      rates: dict[str, list[float]] = {baseline: [], head: []}
      for r in range(args.rounds):
        for name, checkout in ((baseline, worktree), (head, REPO)):
          rates[name].append(decode_rate(checkout, args.config, checkpoint, args.new_tokens))
          print(f"round {r + 1}: {name}: decode {rates[name][-1]:.2f} tokens/s", flush=True)
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", worktree], cwd=REPO, check=False)
  medians = {name: statistics.median(values) for name, values in rates.items()}
  ratio = medians[head] / medians[baseline]
  print(f"\n{args.config}, 0.5B shape, float32, {args.new_tokens} new tokens, decode tokens/s (median of "
        f"{args.rounds}):")
  for name, values in rates.items():
    print(f"  {name:<10} {medians[name]:6.2f}   (runs: {', '.join(f'{v:.2f}' for v in values)})")
  print(f"  {head} / {baseline}: {ratio:.3f}")
  write_results(args.out, {"config": args.config, "baseline": baseline, "head": head, "rates": rates,
                           "medians": medians, "ratio": ratio})


if __name__ == "__main__":
  main()
