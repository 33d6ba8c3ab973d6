"""The shapes the engine runs, chosen so that few programs ever compile: prompt buckets, prefill
rows, decode row counts, and the list of programs a warm-up makes.

* Prompt buckets grow x4 (16, 64, 256, 1024, then every 512; `batch_plan.prompt_bucket`), capped at
  the cache's slots: a 2048-token context has 6.
* A prefill inserts `prefill_rows` requests (the fewest rows the mesh splits: one request per call
  on 1x1 and tensor-parallel meshes), so each bucket is one program.
* A decode dispatch covers rows [0, n): n a power of 4 over the highest running row, a multiple
  of what splits the rows, at most the slots (1, 4, 8 for 8 slots: two or three running rows
  cost four rows' products, which an accelerator does not notice and XLA:CPU pays ~1.3x for).
* A prompt whose first blocks are cached computes the rest in an extend call of a bucket up to
  EXTEND_LIMIT (16, 64, 256), one more program each, and a row copy (`admission`).
The default serving config (8 slots, context 2048) thus warms up 1 + 1 + 6 + 3 + 3 = 14 programs.
* A dispatch runs K decode steps (`decode_steps`) while every slot is taken, and at most
  `join_steps` (default K / 8) while one is free, so a request that arrives waits that few steps
  for its prefill (the step limit is a runtime value: no other program).
"""

from __future__ import annotations

from qwen_logical.inference.batch_plan import prompt_bucket
from qwen_logical.inference.programs import CachePrograms, row_count

BUCKET_GROWTH = 4
ROW_GROWTH = 4
EXTEND_LIMIT = 256  # the longest rest of a prompt computed after a cached prefix (longer: prefilled whole)


class EngineShapes:
  """The shapes of an engine of `slots` rows and `context` tokens over `programs`."""

  def __init__(self, programs: CachePrograms, slots: int, context: int, join_steps: int | None = None):
    self.programs, self.slots, self.context = programs, slots, context
    self.prefill_rows = programs.batch_multiple
    self.join_steps = min(int(join_steps or max(1, programs.steps // 8)), programs.steps)
    if self.join_steps < 1:
      raise ValueError(f"join_steps={join_steps} must be a positive integer.")

  def decode_limit(self, free_rows: int) -> int:
    """Steps the next decode dispatch may run: K when no row is free, else join_steps."""
    return self.join_steps if free_rows else self.programs.steps

  def bucket(self, prompt_length: int) -> int:
    """The prompt bucket P of a prompt, at most the cache's slots."""
    return min(prompt_bucket(prompt_length, BUCKET_GROWTH), self.programs.length)

  def buckets(self) -> list[int]:
    """Every bucket a prompt of 1 .. context - 1 tokens can get."""
    found, length = [], 1
    while length < self.context:
      found.append(self.bucket(length))
      length = found[-1] + 1
    return found

  def extend_bucket(self, rest: int) -> int | None:
    """The bucket of an extend call for the `rest` of a prompt after its cached prefix (None: too long)."""
    bucket = self.bucket(rest)
    return bucket if bucket <= EXTEND_LIMIT else None

  def extend_buckets(self) -> list[int]:
    return [b for b in self.buckets() if b <= EXTEND_LIMIT]

  def decode_rows(self, count: int) -> int:
    """Rows of the decode dispatch whose highest running row is count - 1."""
    return row_count(count, self.programs.batch_multiple, self.slots, growth=ROW_GROWTH)

  def decode_sizes(self) -> list[int]:
    return sorted({self.decode_rows(n) for n in range(1, self.slots + 1)})

  def warmup_builds(self) -> list:
    """Callables that make every program the engine can need: the empty cache, the row copy, a
    prefill per bucket, an extend per short bucket, a decode (and speculative rounds) per row count.
    The echo prefills (the prompt's log-probabilities) compile when first asked for."""
    p, rows = self.programs, self.prefill_rows
    decodes = [lambda n=n: p.decode(n) for n in self.decode_sizes()]
    if hasattr(p, "speculate"):
      decodes += [lambda n=n: p.speculate(n) for n in self.decode_sizes()]
    return ([p.cache_program, p.copy] + [lambda b=b: p.prefill(rows, b) for b in self.buckets()]
            + [lambda b=b: p.extend(rows, b) for b in self.extend_buckets()] + decodes)
