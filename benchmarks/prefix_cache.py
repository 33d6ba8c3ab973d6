"""The prefix cache on a real-size model: time to the first token of a request whose 1,000-token prefix
was served before, against the same request computed whole, and the same text either way.

    .venv/bin/python benchmarks/prefix_cache.py                 # 0.5B shape, float32, 1x1, ~4 min
    .venv/bin/python benchmarks/prefix_cache.py --prefix 500     # a shorter shared prefix

The model is the Qwen2.5-0.5B shape in float32 whose greedy text follows a walk through the vocabulary
(benchmarks/speculative.py's `walk_tensors`: every weight read on every pass, as a real checkpoint's,
and a text that does not repeat). The engine runs as the server runs it (`serving.engine.Engine`,
default decode steps), with 2 slots and a context of prefix + 256. Each round sends:

* "uncached": a fresh prefix + a suffix (nothing of it cached): the whole prompt is prefilled;
* "cached": a prefix sent before (with another suffix) + a suffix: its whole blocks come from the
  cache and only the rest (a bucket of 16 or 64 tokens) is computed over them.

Time to first token is the time from submit to the first TokenEvent. Both are measured after a
round that compiles every program involved. The cached request's tokens must equal the tokens of
the same prompt computed whole (asked with echo, which never reads the cache). Prints a table and writes benchmarks/results/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_file import write_results  # noqa: E402
from speculative import walk_model, walk_of  # noqa: E402

from qwen_logical.model.config import preset  # noqa: E402
from qwen_logical.serving.engine import Engine, EngineRequest  # noqa: E402

SHAPE = "qwen2.5-0.5b"


def ask(engine: Engine, tokens, new: int, echo: bool = False) -> tuple[float, list[int], int]:
  """(seconds to the first token, the tokens, cached prompt tokens) of one greedy request."""
  done, got, first = threading.Event(), [], []
  cached = [0]

  def callback(event):
    if event.token is not None:
      if not got:
        first.append(time.perf_counter())
      got.append(event.token)
    cached[0] = event.cached_tokens
    if event.finish_reason is not None:
      done.set()

  start = time.perf_counter()
  engine.submit(EngineRequest(tuple(int(t) for t in tokens), new, echo=echo), callback)
  assert done.wait(1200), "the request did not finish"
  return first[0] - start, got, cached[0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--prefix", type=int, default=1000, help="tokens of the shared prefix")
  parser.add_argument("--suffix", type=int, default=24, help="tokens after it")
  parser.add_argument("--new", type=int, default=8, help="tokens generated per request")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "prefix_cache.json"))
  args = parser.parse_args()
  part, params = walk_model(SHAPE, walk_of(preset(SHAPE).vocab_size))
  engine = Engine(part, params, slots=2, context=args.prefix + args.suffix + 256, queue_size=4)
  engine.start()
  rng = np.random.RandomState(0)
  fresh = lambda n: rng.randint(0, 151_000, n)
  rows = []
  try:
    for round_ in range(args.rounds + 1):  # round 0 compiles every program involved
      prefix = fresh(args.prefix)
      uncached_s, _, none = ask(engine, np.concatenate([fresh(args.prefix), fresh(args.suffix)]), args.new)
      ask(engine, np.concatenate([prefix, fresh(args.suffix)]), args.new)  # the prefix is cached from here
      prompt = np.concatenate([prefix, fresh(args.suffix)])
      cached_s, tokens, cached = ask(engine, prompt, args.new)
      _, whole, _ = ask(engine, prompt, args.new, echo=True)
      if round_:
        rows.append({"uncached_s": uncached_s, "cached_s": cached_s, "cached_tokens": cached,
                     "identical": tokens == whole, "uncached_cached_tokens": none})
        print(f"round {round_}: uncached {uncached_s:.2f} s, cached {cached_s:.2f} s "
              f"({cached} of {len(prompt)} prompt tokens cached), identical text: {tokens == whole}")
  finally:
    engine.stop(5)
  uncached, cached = (statistics.median(r[k] for r in rows) for k in ("uncached_s", "cached_s"))
  ratio = cached / uncached
  print(f"\n{'':24}{'median s':>10}\n{'uncached first token':24}{uncached:>10.2f}\n{'cached first token':24}"
        f"{cached:>10.2f}\nratio {ratio:.1%} (bar: <= 25%), identical text in {sum(r['identical'] for r in rows)}"
        f"/{len(rows)} rounds")
  write_results(args.out, {"shape": SHAPE, "dtype": "float32", "mesh": "1x1", "prefix": args.prefix,
                           "suffix": args.suffix, "rounds": rows, "median_uncached_s": uncached,
                           "median_cached_s": cached, "ratio": ratio,
                           "identical": all(r["identical"] for r in rows)})


if __name__ == "__main__":
  main()
