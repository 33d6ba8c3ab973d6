"""Prometheus metrics of the server, in a registry of its own (one per app, so apps never share counts).

    metrics = Metrics(engine.stats)                     # gauges read the engine's stats at scrape time
    timer = metrics.timer()                            # per request: timer.token() on each new token
    metrics.finished("/v1/completions", 200, prompt_tokens, completion_tokens)
    metrics.exposition()                               # bytes in the Prometheus text format

Names (counters end in _total in the text format):
  qwen_logical_requests_total{endpoint, status}          HTTP requests answered, by endpoint and status code
  qwen_logical_prompt_tokens_total, qwen_logical_completion_tokens_total
  qwen_logical_time_to_first_token_seconds               histogram: request accepted -> first token
  qwen_logical_time_per_output_token_seconds             histogram: between consecutive tokens of a request
  qwen_logical_queue_length, qwen_logical_active_slots, qwen_logical_slots   gauges from engine.stats()
"""

from __future__ import annotations

import time
from typing import Any, Callable

import prometheus_client as prom

PREFIX = "qwen_logical_"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Timer:
  """One request's token timing: the first token's delay from the start, then each gap."""

  def __init__(self, metrics: "Metrics"):
    self._metrics = metrics
    self._start = self._last = time.perf_counter()
    self.tokens = 0

  def token(self, count: int = 1, now: float | None = None) -> None:
    """Counts `count` new tokens that arrived at `now` (time.perf_counter(); default: now)."""
    now = time.perf_counter() if now is None else now
    if self.tokens == 0:
      self._metrics.ttft.observe(now - self._start)
    else:
      self._metrics.tpot.observe(now - self._last)
    self._last = now
    self.tokens += count


class Metrics:
  """The server's counters, histograms and gauges; `stats()` returns the engine's EngineStats."""

  def __init__(self, stats: Callable[[], Any] | None = None):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter(PREFIX + "requests", "HTTP requests answered, by endpoint and status code.",
                                 ["endpoint", "status"], registry=r)
    self.prompt_tokens = prom.Counter(PREFIX + "prompt_tokens", "Prompt tokens of requests run.", registry=r)
    self.completion_tokens = prom.Counter(PREFIX + "completion_tokens", "Tokens generated.", registry=r)
    self.cached_tokens = prom.Counter(PREFIX + "prompt_cached_tokens",
                                      "Prompt tokens of answered requests whose keys came from the prefix cache.",
                                      registry=r)
    self.ttft = prom.Histogram(PREFIX + "time_to_first_token_seconds",
                               "Seconds from a request's acceptance to its first token.", buckets=TTFT_BUCKETS,
                               registry=r)
    self.tpot = prom.Histogram(PREFIX + "time_per_output_token_seconds",
                               "Seconds between consecutive tokens of one request.", buckets=TPOT_BUCKETS,
                               registry=r)
    if stats is not None:
      for name, attribute, doc in (("queue_length", "queued", "Requests waiting for a slot."),
                                   ("active_slots", "active", "Slots running a request."),
                                   ("slots", "slots", "Slots of the engine."),
                                   ("prefix_cache_queries", "prefix_queries", "Prompts looked up in the prefix cache."),
                                   ("prefix_cache_hits", "prefix_hits", "Prompts that found a cached prefix."),
                                   ("prefix_cache_prompt_tokens", "prefix_prompt_tokens",
                                    "Tokens of the prompts looked up in the prefix cache."),
                                   ("prefix_cache_cached_tokens", "prefix_cached_tokens",
                                    "Prompt tokens whose keys the prefix cache gave (not computed again).")):
        gauge = prom.Gauge(PREFIX + name, doc, registry=r)
        gauge.set_function(lambda attribute=attribute: float(getattr(stats(), attribute, 0)))
      hit_rate = prom.Gauge(PREFIX + "prefix_cache_hit_rate",
                            "Share of looked-up prompt tokens the prefix cache gave (0 before any lookup).", registry=r)
      hit_rate.set_function(lambda: _rate(stats()))

  def timer(self) -> Timer:
    return Timer(self)

  def finished(self, endpoint: str, status: int, prompt_tokens: int = 0, completion_tokens: int = 0,
               cached_tokens: int = 0) -> None:
    """Counts one answered request (and the tokens it ran)."""
    self.requests.labels(endpoint=endpoint, status=str(status)).inc()
    if prompt_tokens:
      self.prompt_tokens.inc(prompt_tokens)
    if completion_tokens:
      self.completion_tokens.inc(completion_tokens)
    if cached_tokens:
      self.cached_tokens.inc(cached_tokens)

  def exposition(self) -> bytes:
    return prom.generate_latest(self.registry)

  content_type = prom.CONTENT_TYPE_LATEST


def _rate(stats) -> float:
  asked = getattr(stats, "prefix_prompt_tokens", 0)
  return getattr(stats, "prefix_cached_tokens", 0) / asked if asked else 0.0
