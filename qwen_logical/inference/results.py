"""What a generation call gives back: its result, its stream of per-step events, its timings."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from qwen_logical.common.errors import QwenLogicalError


class GenerationError(QwenLogicalError):
  """A generation request that cannot run as asked (prompt, length or sampling parameter)."""


@dataclasses.dataclass
class Timings:
  """Wall-clock seconds per phase of one call and the rates they give.

  compile_s: compiling programs this call needed (0 when every bucket was seen before).
  prefill_s: prompt through the model to the first new token on the host.
  decode_s: first new token to the last one on the host (decode_steps steps).
  Rates count the real (unpadded) tokens of the real rows.
  """

  tokenize_s: float = 0.0
  compile_s: float = 0.0
  prefill_s: float = 0.0
  decode_s: float = 0.0
  detokenize_s: float = 0.0
  total_s: float = 0.0
  prompt_tokens: int = 0
  new_tokens: int = 0
  decode_tokens: int = 0  # new tokens from decode steps (all rows; the first token comes from prefill)
  decode_steps: int = 0
  dispatches: int = 0  # decode programs run (each draws up to K tokens per row)
  compilations: int = 0
  speculative_rounds: int = 0  # speculative rounds, summed over the real rows (each a target pass)
  drafted: int = 0  # draft tokens proposed (real rows)
  accepted: int = 0  # draft tokens kept
  batch_shape: tuple[int, int, int] = (0, 0, 0)  # (padded batch B, prompt bucket P, cache slots S)

  @property
  def prefill_tokens_per_s(self) -> float:
    return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

  @property
  def decode_steps_per_s(self) -> float:
    """Tokens per second of one sequence during decode."""
    return self.decode_steps / self.decode_s if self.decode_s else 0.0

  @property
  def decode_tokens_per_s(self) -> float:
    """Tokens per second of the whole batch during decode (every row's tokens after its first)."""
    return self.decode_tokens / self.decode_s if self.decode_s else 0.0

  @property
  def dispatches_per_token(self) -> float:
    """Decode dispatches per token a row generated (prefill's first token included): about 1/K."""
    return self.dispatches / (self.decode_steps + 1) if self.decode_steps else 0.0

  def add_rounds(self, stats: np.ndarray) -> None:
    """Adds speculative rounds' per-row counts i32[rows, 3] (rounds, drafted, accepted)."""
    rounds, drafted, accepted = (int(x) for x in stats.sum(axis=0))
    self.speculative_rounds += rounds
    self.drafted += drafted
    self.accepted += accepted

  @property
  def acceptance_rate(self) -> float:
    """The share of drafted tokens that were kept."""
    return self.accepted / self.drafted if self.drafted else 0.0

  @property
  def tokens_per_round(self) -> float:
    """Mean tokens a row gained per speculative round (one target pass): 1 + accepted drafts."""
    return (self.speculative_rounds + self.accepted) / self.speculative_rounds if self.speculative_rounds else 0.0

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out.update(prefill_tokens_per_s=self.prefill_tokens_per_s, decode_steps_per_s=self.decode_steps_per_s,
               decode_tokens_per_s=self.decode_tokens_per_s, dispatches_per_token=self.dispatches_per_token,
               acceptance_rate=self.acceptance_rate, tokens_per_round=self.tokens_per_round)
    return out


@dataclasses.dataclass(frozen=True)
class StreamEvent:
  """The tokens of one step. tokens[r] is prompt r's new token, None once it has finished;
  texts[r] the text it adds ('' while a multi-byte character is incomplete, None once
  finished); texts is None without a tokenizer."""

  step: int
  tokens: tuple[int | None, ...]
  texts: tuple[str | None, ...] | None


@dataclasses.dataclass
class GenerationResult:
  """tokens[r]: prompt r's new tokens, through its stop id when it stopped on one.
  finish_reasons[r]: 'stop' or 'length'. texts[r]: the decoded new tokens without the stop
  id (None without a tokenizer)."""

  tokens: list[list[int]]
  finish_reasons: list[str]
  prompt_tokens: list[list[int]]
  timings: Timings
  texts: list[str] | None = None

  def padded(self, pad_id: int) -> np.ndarray:
    """int32[num_prompts, longest]: the new tokens, `pad_id` after each row's end (as transformers)."""
    width = max((len(t) for t in self.tokens), default=0)
    out = np.full((len(self.tokens), width), pad_id, np.int32)
    for r, row in enumerate(self.tokens):
      out[r, :len(row)] = row
    return out


class GenerationStream:
  """An iterator of StreamEvent; `result` holds the GenerationResult once it is exhausted."""

  def __init__(self, run: Iterator[StreamEvent]):
    self._run = run
    self.result: GenerationResult | None = None

  def __iter__(self):
    return self

  def __next__(self) -> StreamEvent:
    try:
      return next(self._run)
    except StopIteration as stop:
      self.result = stop.value
      raise
