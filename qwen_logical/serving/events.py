"""The log-probabilities a TokenEvent carries, cut from the programs' host results (`row_state.Drawn`)
to what the request asked for."""

from __future__ import annotations


def token_logprobs(drawn, at: tuple, request) -> tuple:
  """(log-probability, ((id, log-probability), ...) of the request's top alternatives) of the token
  drawn at index `at` of a Drawn ((i,) for a prefill's row i, (row, step) for a decode), or
  (None, ()) when the request did not ask for log-probabilities."""
  if request.logprobs is None:
    return None, ()
  top = tuple((int(t), float(v)) for t, v in zip(drawn.top_ids[at][:request.logprobs],
                                                   drawn.top_logprobs[at][:request.logprobs]))
  return float(drawn.logprobs[at]), top


def prompt_logprobs(prompts, i: int, request) -> tuple:
  """Per prompt token of prefill row i (prompts: a Drawn [b, P] of left-padded prompts): None for the
  first, then (log-probability, ((id, log-probability), ...) of the top `request.logprobs` or 0)."""
  n, width, k = len(request.tokens), prompts.logprobs.shape[1], request.logprobs or 0
  scores = [None]
  for j in range(width - n + 1, width):
    top = tuple((int(t), float(v)) for t, v in zip(prompts.top_ids[i, j][:k], prompts.top_logprobs[i, j][:k]))
    scores.append((float(prompts.logprobs[i, j]), top))
  return tuple(scores)
