"""What goes into the engine and what comes out: requests, token events, stats, and request errors.

A request is prompt token ids (already chat-templated), how many tokens to add, how to pick them
(`SamplingParams`), a seed and stop ids. `check_request` refuses, before anything runs, every
request the engine could not serve, with a `ServingError` naming the field at fault;
`check_settings` does the same for the Engine's own arguments.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

from qwen_logical.common.errors import QwenLogicalError
from qwen_logical.inference.batch_plan import prompt_problem
from qwen_logical.inference.logit_processing import TOP_LOGPROBS, Processing
from qwen_logical.inference.programs import batch_multiple
from qwen_logical.inference.sampling import SamplingError, SamplingParams


class ServingError(QwenLogicalError):
  """A request the engine cannot serve (or an engine that cannot take requests now).

  field: the EngineRequest field at fault ('tokens', 'max_new_tokens', 'temperature', 'top_k',
  'top_p', 'seed', 'stop_ids'), or None when no field is (e.g. shutting down).
  """

  def __init__(self, message: str, field: str | None = None):
    super().__init__(message)
    self.field = field


class QueueFullError(ServingError):
  """Every slot is busy and the waiting queue is full: try again later (HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class EngineRequest:
  """One completion to run: prompt `tokens`, up to `max_new_tokens` new ones, chosen by `sampling`.

  Sampled rows draw from (seed, step) only, so a request gets the same tokens alone or batched,
  and the same as `qwen_logical.inference.generate` for the prompt alone with this seed.
  A token in `stop_ids` ends the request (finish_reason "stop"; the stop id is its last token).
  processing: logit bias, penalties, min_tokens (`logit_processing.Processing`).
  logprobs: None, or each new token's log-probability with this many top alternatives (0..20).
  echo: the first event also carries the prompt's own log-probabilities (no prefix cache then).
  grammar: None, or a matcher whose token mask every draw obeys (`serving.structured`; it must
    have fill(words), accept(token) and a `words` count); the engine feeds it each new token.
  """

  tokens: tuple[int, ...]
  max_new_tokens: int
  sampling: SamplingParams = SamplingParams()
  seed: int = 0
  stop_ids: tuple[int, ...] = ()
  processing: Processing = Processing()
  logprobs: int | None = None
  echo: bool = False
  grammar: Any = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class TokenEvent:
  """One new token of a request, or its end.

  token: the new token id; None on a final event that carries no token (cancelled, error).
  finish_reason: None while running; "stop" | "length" | "cancelled" | "error" on the last event.
  completion_tokens: tokens generated so far (a stop id counts).
  logprob, top_logprobs: the token's log-probability and ((id, log-probability), ...) of the most
    likely tokens (when the request asked for logprobs).
  prompt_logprobs: on the first event of an echo request, per prompt token (None for the first,
    then (log-probability, ((id, log-probability), ...)).
  cached_tokens: prompt tokens whose keys came from the prefix cache (every event).
  """

  request_id: int
  token: int | None
  finish_reason: str | None
  prompt_tokens: int
  completion_tokens: int
  error: str | None = None
  logprob: float | None = None
  top_logprobs: tuple = ()
  prompt_logprobs: tuple | None = None
  cached_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class EngineStats:
  """A snapshot of the engine (for metrics and logs)."""

  queued: int  # requests waiting for a slot
  active: int  # slots running a request
  slots: int
  context: int
  tokens_total: int  # new tokens generated since the start
  prompt_tokens_total: int  # prompt tokens prefilled
  requests_total: int  # requests accepted
  finished_total: int  # requests ended (any reason)
  prefills: int  # prefill programs run
  prefix_queries: int  # prompts looked up in the prefix cache
  prefix_hits: int  # of them, found a cached prefix
  prefix_prompt_tokens: int  # tokens of the prompts looked up
  prefix_cached_tokens: int  # of them, reused from the cache
  decode_steps: int  # decode steps run (up to K per dispatch)
  dispatches: int  # decode programs run
  compilations: int  # programs compiled (none in steady state after warm-up)
  tokens_per_s: float  # new tokens per second over the last log interval


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_request(request: EngineRequest, context: int, vocab_size: int) -> None:
  """Raises ServingError naming the field if `request` cannot run in a context of `context` tokens."""
  if not isinstance(request, EngineRequest):
    raise ServingError(f"Expected an EngineRequest, got a {type(request).__name__}.")
  if not isinstance(request.tokens, (tuple, list)):
    raise ServingError(f"tokens must be a list of token ids, got a {type(request.tokens).__name__}.", "tokens")
  problem = prompt_problem(request.tokens, request.max_new_tokens, context, vocab_size)
  if problem:
    raise ServingError(problem[1], problem[0])
  if not isinstance(request.sampling, SamplingParams):
    raise ServingError("sampling must be a qwen_logical.inference.sampling.SamplingParams.", "temperature")
  try:
    request.sampling.check_vocab(vocab_size)
  except SamplingError as e:
    raise ServingError(str(e), "top_k") from e
  if not _is_int(request.seed):
    raise ServingError(f"seed={request.seed!r} must be an integer.", "seed")
  if not isinstance(request.stop_ids, (tuple, list)) or not all(_is_int(s) for s in request.stop_ids):
    raise ServingError(f"stop_ids={request.stop_ids!r} must be a sequence of token ids.", "stop_ids")
  if not isinstance(request.processing, Processing):
    raise ServingError("processing must be a qwen_logical.inference.logit_processing.Processing.", "processing")
  problem = request.processing.problem(vocab_size)
  if problem:
    raise ServingError(problem[1], problem[0])
  if request.logprobs is not None and not (_is_int(request.logprobs) and 0 <= request.logprobs <= TOP_LOGPROBS):
    raise ServingError(f"logprobs={request.logprobs!r} must be an integer in [0, {TOP_LOGPROBS}].", "logprobs")
  if request.grammar is not None and not all(hasattr(request.grammar, n) for n in ("fill", "accept")):
    raise ServingError("grammar must be a matcher with fill(words) and accept(token).", "grammar")


def check_settings(partitioner, slots, context, queue_size) -> None:
  """Raises ServingError naming the Engine argument that cannot work on this partitioner's mesh."""
  multiple = batch_multiple(partitioner)
  for name, value, least in (("slots", slots, 1), ("context", context, 2), ("queue_size", queue_size, 0)):
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise ServingError(f"{name}={value!r} must be an integer >= {least}.")
  if slots % multiple:
    raise ServingError(f"slots={slots} does not split over the mesh: under {partitioner.name} the cache rows "
                       f"split {multiple} ways; use a multiple of {multiple} (e.g. {multiple * -(-slots // multiple)}).")
