"""The OpenAI request fields beyond prompt and sampling: n, log-probabilities, echo, penalties,
logit_bias and the common extensions repetition_penalty and min_tokens (each checked, with the
400 a bad value deserves naming the field).

    options = parse_options("completion", body, vocab_size)   # Options(n, logprobs, echo, processing)
"""

from __future__ import annotations

import dataclasses
import math

from qwen_logical.inference.logit_processing import TOP_LOGPROBS, Processing
from qwen_logical.serving.completions import RequestError
from qwen_logical.serving.openai_fields import expect, optional_int, optional_number

MAX_N = 16  # choices per request


@dataclasses.dataclass(frozen=True)
class Options:
  """n: choices; logprobs: None (off) or top alternatives per token (0..20); echo: the prompt
  (text and log-probabilities) before the completion; processing: the logit processing."""

  n: int = 1
  logprobs: int | None = None
  echo: bool = False
  processing: Processing = Processing()


def parse_options(kind: str, body: dict, vocab_size: int) -> Options:
  n = expect(body, "n", int, default=1)
  if not 1 <= n <= MAX_N:
    raise RequestError(f"n={n} is invalid: ask for 1 to {MAX_N} choices per request.", "n")
  echo = False
  if kind == "chat":
    wanted = expect(body, "logprobs", bool, default=False)
    top = optional_int(body, "top_logprobs")
    if top is not None and not wanted:
      raise RequestError("top_logprobs needs logprobs=true.", "top_logprobs")
    _check_top(top, "top_logprobs")
    logprobs = (top or 0) if wanted else None
  else:
    logprobs = optional_int(body, "logprobs")
    _check_top(logprobs, "logprobs")
    echo = expect(body, "echo", bool, default=False)
    best_of = optional_int(body, "best_of")
    if best_of is not None and best_of != n:
      raise RequestError(f"best_of={best_of} is not supported apart from best_of == n (each choice is returned).",
                         "best_of")
  return Options(n, logprobs, echo, _processing(body, vocab_size))


def _check_top(value: int | None, name: str) -> None:
  if value is not None and not 0 <= value <= TOP_LOGPROBS:
    raise RequestError(f"{name}={value} is invalid: it must be in [0, {TOP_LOGPROBS}].", name)


def _processing(body: dict, vocab_size: int) -> Processing:
  """The logit processing; its ranges are checked where the engine checks them (`Processing.problem`)."""
  processing = Processing(optional_number(body, "presence_penalty", 0.0),
                          optional_number(body, "frequency_penalty", 0.0),
                          optional_number(body, "repetition_penalty", 1.0),
                          expect(body, "min_tokens", int, default=0), _logit_bias(body, vocab_size))
  problem = processing.problem(vocab_size)
  if problem:
    raise RequestError(problem[1], problem[0])
  return processing


def _logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
  bias = expect(body, "logit_bias", dict, default={})
  pairs = []
  for key, value in bias.items():
    try:
      token = int(key)
    except ValueError:
      raise RequestError(f"logit_bias key {key!r} is not a token id: keys are token ids as strings, e.g. "
                         "{\"1234\": -100}.", "logit_bias") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise RequestError(f"logit_bias[{key!r}]={value!r} is invalid: each bias is a number in [-100, 100].",
                         "logit_bias")
    pairs.append((token, float(value)))
  return tuple(pairs)
