"""Text generation with a preallocated, sharded KV cache: batched prompts, sampling, streaming.

    gen = Generator(partitioner)                        # compiled programs live here
    out = gen.generate(params, ["Hello", "The sky"], tokenizer=tok, max_new_tokens=32)
    out.tokens, out.texts, out.timings                  # per prompt; per phase
    for event in gen.stream(params, prompts, tokenizer=tok, temperature=0.7, seed=1):
      print(event.texts)                                # text deltas, as tokens arrive

How a call runs (B prompts, left-padded to a bucketed length P; S cache slots):

* prompts are left-padded to P (a power of two from 16, then multiples of 512) and the
  batch to a power of two that splits over the mesh's batch axes; padded rows and slots
  are masked. A slot mask int[B, S] marks real slots; positions are the count of real
  slots before each one, so a left-padded row runs exactly as it would alone.
* prefill (one jitted program per (B, P, S, sampling)) builds the empty cache inside the
  program, runs the prompt through the model writing slots [0, P), and picks token 0.
* decode (one jitted program per (B, S, sampling), the cache donated so it is updated in
  place) feeds the last token at slot P + t - 1 and picks token t. The host dispatches step
  t + 1 before it reads token t, so the device never waits for Python; rows that hit a stop
  id emit `pad_id` afterwards and the loop ends when every real row has stopped.

Every array is sharded by the partitioner's rule table: the cache by `cache_*` names
(`qwen_logical.kv_cache`), tokens by `activation_batch`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import weakref
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qwen_logical.model import axes as ax
from qwen_logical.model.model import Mode
from qwen_logical.sharding import distributed
from qwen_logical.inference import kv_cache
from qwen_logical.sharding.partitioner import Params, Partitioner
from qwen_logical.inference.sampling import SamplingParams, row_keys, sample
from qwen_logical.common.errors import QwenLogicalError

MIN_PROMPT_BUCKET = 16
LINEAR_BUCKETS_FROM = 512  # prompt buckets double up to here, then grow by this much
CACHE_GRANULE = 64  # cache slots are a multiple of this (so max_new_tokens 30 and 33 share programs)
STOP_SLOTS = 8  # stop ids are padded to a multiple of this (-1 never matches)


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
  compilations: int = 0
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

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out.update(prefill_tokens_per_s=self.prefill_tokens_per_s, decode_steps_per_s=self.decode_steps_per_s,
               decode_tokens_per_s=self.decode_tokens_per_s)
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


def prompt_bucket(length: int) -> int:
  """The padded prompt length for a prompt of `length` tokens: 16, 32, ..., 512, 1024, 1536, ..."""
  bucket = MIN_PROMPT_BUCKET
  while bucket < length:
    bucket = bucket * 2 if bucket < LINEAR_BUCKETS_FROM else bucket + LINEAR_BUCKETS_FROM
  return bucket


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


class Generator:
  """Generation for one Partitioner: owns the compiled prefill/decode programs per bucket.

  Args:
    partitioner: the model, mesh and rule table; params passed to `generate` must be its.
    max_length: the context, prompt plus new tokens (default: the config's
      max_position_embeddings).
  """

  def __init__(self, partitioner: Partitioner, max_length: int | None = None):
    self.partitioner = partitioner
    self.config = partitioner.config
    self.max_length = int(max_length or self.config.max_position_embeddings)
    if self.max_length <= 0:
      raise GenerationError(f"max_length={max_length} must be positive.")
    table, shape = partitioner.table, partitioner.mesh_shape
    shards = [math.prod(shape[a] for a in table.mesh_axes(name))
              for name in (ax.ACTIVATION_BATCH, ax.CACHE_BATCH)]
    self.batch_multiple = math.lcm(*shards)
    self.slot_multiple = math.lcm(CACHE_GRANULE, *(
        math.prod(shape[a] for a in table.mesh_axes(name))
        for name in (ax.CACHE_SEQUENCE, ax.ACTIVATION_LENGTH)))
    self._programs: dict[tuple, Any] = {}
    self.compilations = 0  # programs compiled so far (prefill and decode, every bucket)

  # --- shardings ----------------------------------------------------------------------
  def _replicated(self) -> NamedSharding:
    return NamedSharding(self.partitioner.mesh, PartitionSpec())

  def _rows(self) -> NamedSharding:
    return self.partitioner.sharding((ax.ACTIVATION_BATCH,))

  # --- programs -----------------------------------------------------------------------
  def _prefill_program(self, batch: int, prompt: int, slots: int, sampling: SamplingParams, stops: int):
    part = self.partitioner

    def prefill(params, tokens, slot_mask, seed, stop_ids):
      with part.bound():
        cache = kv_cache.zeros_in_jit(part, batch, slots)
        logits, cache = part.model.apply({"params": params}, tokens, slot_mask, mode=Mode.PREFILL,
                                         cache=cache, last_token_only=True)
        keys = row_keys(jax.random.key(seed), jnp.arange(batch), 0)
        token = sample(logits[:, -1], keys, sampling)
        return cache, token, jnp.isin(token, stop_ids)

    rows, tokens = self._rows(), part.sharding(ax.TOKENS)
    fn = jax.jit(prefill,
                 in_shardings=(part.param_shardings, tokens, tokens, self._replicated(), self._replicated()),
                 out_shardings=(kv_cache.cache_shardings(part, batch, slots), rows, rows))
    return fn.lower(part.param_shapes, jax.ShapeDtypeStruct((batch, prompt), jnp.int32),
                    jax.ShapeDtypeStruct((batch, slots), jnp.int32),
                    jax.ShapeDtypeStruct((), jnp.uint32), jax.ShapeDtypeStruct((stops,), jnp.int32))

  def _decode_program(self, batch: int, prompt: int, slots: int, sampling: SamplingParams, stops: int):
    part = self.partitioner

    def decode(params, cache, token, done, index, slot_mask, seed, stop_ids, pad_id):
      with part.bound():
        logits, cache = part.model.apply({"params": params}, token[:, None], slot_mask, mode=Mode.DECODE,
                                         cache=cache, cache_index=index)
        keys = row_keys(jax.random.key(seed), jnp.arange(batch), index - prompt + 1)
        new = sample(logits[:, 0], keys, sampling)
        new = jnp.where(done, pad_id, new)
        return cache, new, done | jnp.isin(new, stop_ids), index + 1

    rows, rep = self._rows(), self._replicated()
    cache_sh = kv_cache.cache_shardings(part, batch, slots)
    fn = jax.jit(decode,
                 in_shardings=(part.param_shardings, cache_sh, rows, rows, rep, part.sharding(ax.TOKENS),
                               rep, rep, rep),
                 out_shardings=(cache_sh, rows, rows, rep),
                 donate_argnums=(1,))
    cache = kv_cache.cache_shapes(self.config, part.layout, batch, slots)
    vector = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return fn.lower(part.param_shapes, cache, vector, jax.ShapeDtypeStruct((batch,), jnp.bool_),
                    jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((batch, slots), jnp.int32),
                    jax.ShapeDtypeStruct((), jnp.uint32), jax.ShapeDtypeStruct((stops,), jnp.int32),
                    jax.ShapeDtypeStruct((), jnp.int32))

  def _program(self, kind: str, *key) -> tuple[Any, float]:
    """The compiled program for (kind, B, P, S, sampling, stops), compiling it on first use."""
    if (kind, *key) in self._programs:
      return self._programs[(kind, *key)], 0.0
    start = time.perf_counter()
    build = self._prefill_program if kind == "prefill" else self._decode_program
    compiled = build(*key).compile()
    self._programs[(kind, *key)] = compiled
    self.compilations += 1
    return compiled, time.perf_counter() - start

  def lower_decode(self, batch: int, prompt: int, slots: int, sampling: SamplingParams = SamplingParams()):
    """The lowered decode step (for HLO inspection and collective counts)."""
    return self._decode_program(batch, prompt, slots, sampling, STOP_SLOTS)

  # --- requests -----------------------------------------------------------------------
  def _prompts(self, prompts, tokenizer, attention_mask) -> list[list[int]]:
    """Normalises str | [str] | [int] | [[int]] | int[B, L] (+ mask) to lists of ids."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and all(isinstance(p, str) for p in prompts)):
      texts = [prompts] if isinstance(prompts, str) else list(prompts)
      if tokenizer is None:
        raise GenerationError("Text prompts need a tokenizer: pass tokenizer=Tokenizer.from_directory(DIR) "
                              "(qwen_logical.tokenizer), or pass token ids.")
      return [list(tokenizer.encode(t)) for t in texts]
    if isinstance(prompts, (np.ndarray, jax.Array)):
      array = np.asarray(prompts)
      if array.ndim == 1:
        array = array[None]
      if array.ndim != 2:
        raise GenerationError(f"Token prompts must be int[B, L] or int[L]; got shape {array.shape}.")
      if attention_mask is None:
        return [row.tolist() for row in array]
      mask = np.asarray(attention_mask).reshape(array.shape).astype(bool)
      return [row[m].tolist() for row, m in zip(array, mask)]
    if isinstance(prompts, (list, tuple)):
      if not prompts:
        raise GenerationError("No prompts given: pass a str, a list of str, or token ids.")
      if all(isinstance(t, (int, np.integer)) for t in prompts):
        return [[int(t) for t in prompts]]
      return [[int(t) for t in p] for p in prompts]
    raise GenerationError(f"Cannot generate from a {type(prompts).__name__}: pass a str, a list of str, "
                          "a list of token ids, a list of such lists, or an int[B, L] array.")

  def _check(self, prompts: list[list[int]], max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
      raise GenerationError(f"max_new_tokens={max_new_tokens!r} must be a positive integer.")
    vocab = self.config.vocab_size
    for r, ids in enumerate(prompts):
      if not ids:
        raise GenerationError(f"Prompt {r} is empty: generation needs at least one prompt token "
                              "(e.g. the chat template's system turn, or a BOS/EOS id).")
      bad = [t for t in ids if not 0 <= t < vocab]
      if bad:
        raise GenerationError(f"Prompt {r} has token id(s) {bad[:5]} outside [0, {vocab}) of this model's "
                              "vocabulary; was it encoded with another model's tokenizer?")
      if len(ids) > self.max_length:
        raise GenerationError(f"Prompt {r} has {len(ids)} tokens, longer than the context of "
                              f"{self.max_length}; shorten it (or truncate its start).")
      if len(ids) + max_new_tokens > self.max_length:
        raise GenerationError(
            f"Prompt {r} ({len(ids)} tokens) plus max_new_tokens={max_new_tokens} is "
            f"{len(ids) + max_new_tokens} tokens, more than the context of {self.max_length}; use "
            f"max_new_tokens <= {self.max_length - len(ids)} or a shorter prompt.")

  def generate(self, params: Params, prompts, **kwargs) -> GenerationResult:
    """Generates for every prompt; see `stream` for the arguments. `callback(StreamEvent)`, when
    given, sees each step's tokens as they arrive."""
    callback = kwargs.pop("callback", None)
    run = self._run(params, prompts, **kwargs)
    while True:
      try:
        event = next(run)
      except StopIteration as stop:
        return stop.value
      if callback is not None:
        callback(event)

  def stream(self, params: Params, prompts, **kwargs) -> GenerationStream:
    """Iterates StreamEvents as tokens arrive; `.result` is the GenerationResult afterwards.

    Args:
      params: the partitioner's parameters (placed or initialised by it).
      prompts: a str, a list of str (needs `tokenizer`), a list of ids, a list of id lists,
        or an int[B, L] array (with `attention_mask` for padded rows).
      tokenizer: anything with encode(str) -> ids and decode(ids, skip_special_tokens=...)
        (qwen_logical.tokenizer.Tokenizer); gives texts and default stop/pad ids.
      max_new_tokens: new tokens per prompt at most (default 32).
      temperature, top_k, top_p: see SamplingParams (default greedy).
      seed: sampling seed; row r at step t draws from (seed, r, t).
      stop_ids: ids that end a row (included in its tokens); default the tokenizer's.
      pad_id: what a stopped row emits in the padded array; default the tokenizer's, else
        the first stop id, else 0.
    """
    return GenerationStream(self._run(params, prompts, **kwargs))

  def _run(self, params: Params, prompts, *, tokenizer=None, attention_mask=None, max_new_tokens: int = 32,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           stop_ids: Sequence[int] | None = None, pad_id: int | None = None):
    start_all = time.perf_counter()
    timings = Timings()
    sampling = SamplingParams(temperature, top_k, top_p)
    sampling.check_vocab(self.config.vocab_size)
    ids = self._prompts(prompts, tokenizer, attention_mask)
    self._check(ids, max_new_tokens)
    max_new_tokens = int(max_new_tokens)
    timings.tokenize_s = time.perf_counter() - start_all
    if stop_ids is None:
      stop_ids = tuple(getattr(tokenizer, "stop_ids", ()) or ())
    stop_ids = tuple(int(s) for s in np.atleast_1d(np.asarray(stop_ids, np.int64)).tolist())
    if pad_id is None:
      pad_id = getattr(tokenizer, "pad_id", None)
      pad_id = pad_id if pad_id is not None else (stop_ids[0] if stop_ids else 0)

    # Shapes: bucketed prompt, power-of-two batch split over the mesh, cache slots in granules.
    real = len(ids)
    longest = max(len(p) for p in ids)
    prompt = min(prompt_bucket(longest), _round_up(self.max_length, MIN_PROMPT_BUCKET))
    batch = _round_up(1 << (real - 1).bit_length(), self.batch_multiple)
    slots = _round_up(prompt + max_new_tokens, self.slot_multiple)
    self.partitioner.check_batch(batch, prompt)
    kv_cache.check_cache(self.partitioner, batch, slots)
    stops = np.full(_round_up(max(len(stop_ids), 1), STOP_SLOTS), -1, np.int32)
    stops[:len(stop_ids)] = stop_ids
    timings.batch_shape = (batch, prompt, slots)

    tokens = np.full((batch, prompt), pad_id, np.int32)
    slot_mask = np.ones((batch, slots), np.int32)
    slot_mask[:, :prompt] = 0
    for r, p in enumerate(ids):
      tokens[r, prompt - len(p):] = p
      slot_mask[r, prompt - len(p):prompt] = 1
    slot_mask[real:, prompt - 1] = 1  # padding rows: one real slot keeps their softmax well defined
    timings.prompt_tokens = sum(len(p) for p in ids)
    token_sharding = self.partitioner.sharding(ax.TOKENS)
    tokens = distributed.global_array(tokens, token_sharding)
    slot_mask = distributed.global_array(slot_mask, token_sharding)

    before = self.compilations
    prefill, t_prefill = self._program("prefill", batch, prompt, slots, sampling, stops.size)
    decode, t_decode = (self._program("decode", batch, prompt, slots, sampling, stops.size)
                        if max_new_tokens > 1 else (None, 0.0))
    timings.compile_s = t_prefill + t_decode
    timings.compilations = self.compilations - before

    seed_arr, pad_arr = np.uint32(seed % 2**32), np.int32(pad_id)
    out: list[list[int]] = [[] for _ in ids]
    finished = [False] * real
    reasons = ["length"] * real
    decoded = [""] * real

    def emit(step: int, host_tokens: np.ndarray) -> StreamEvent:
      last = step == max_new_tokens - 1
      new: list[int | None] = []
      texts: list[str | None] = []
      for r in range(real):
        if finished[r]:
          new.append(None)
          texts.append(None)
          continue
        token = int(host_tokens[r])
        out[r].append(token)
        new.append(token)
        if token in stop_ids:
          finished[r], reasons[r] = True, "stop"
        if tokenizer is not None:
          text = _decode(tokenizer, [t for t in out[r] if t not in stop_ids])
          if text.endswith("\ufffd") and not (finished[r] or last):
            texts.append("")  # an incomplete multi-byte character: wait for its next token
          else:
            texts.append(text[len(decoded[r]):] if text.startswith(decoded[r]) else text)
            decoded[r] = text
      return StreamEvent(step, tuple(new), tuple(texts) if tokenizer is not None else None)

    start = time.perf_counter()
    cache, token, done = prefill(params, tokens, slot_mask, seed_arr, stops)
    index = jax.device_put(np.int32(prompt), self._replicated())
    host = distributed.to_host(token)
    timings.prefill_s = time.perf_counter() - start
    decode_start = time.perf_counter()
    yield emit(0, host)

    steps = 0
    if decode is not None and not all(finished):
      ahead = decode(params, cache, token, done, index, slot_mask, seed_arr, stops, pad_arr)
      for step in range(1, max_new_tokens):
        cache, token, done, index = ahead
        if step + 1 < max_new_tokens:  # dispatch the next step before waiting for this one
          ahead = decode(params, cache, token, done, index, slot_mask, seed_arr, stops, pad_arr)
        host = distributed.to_host(token)
        steps += 1
        event = emit(step, host)
        timings.decode_s = time.perf_counter() - decode_start
        yield event
        if all(finished):
          break
    timings.decode_steps = steps
    timings.new_tokens = sum(len(t) for t in out)
    timings.decode_tokens = timings.new_tokens - real

    texts = None
    if tokenizer is not None:
      start = time.perf_counter()
      texts = [_decode(tokenizer, [t for t in row if t not in stop_ids]) for row in out]
      timings.detokenize_s = time.perf_counter() - start
    timings.total_s = time.perf_counter() - start_all
    return GenerationResult(out, reasons, ids, timings, texts)


def _decode(tokenizer, ids: list[int]) -> str:
  try:
    return tokenizer.decode(ids, skip_special_tokens=True)
  except TypeError:  # a tokenizer whose decode takes ids only
    return tokenizer.decode(ids)


_GENERATORS: "weakref.WeakKeyDictionary[Partitioner, Generator]" = weakref.WeakKeyDictionary()


def generator_for(partitioner: Partitioner) -> Generator:
  """The partitioner's Generator (one per partitioner, so compiled programs are reused)."""
  if partitioner not in _GENERATORS:
    _GENERATORS[partitioner] = Generator(partitioner)
  return _GENERATORS[partitioner]


def generate(partitioner: Partitioner, params: Params, prompts, **kwargs) -> GenerationResult:
  """Generates for `prompts` with the partitioner's model; arguments as `Generator.stream`,
  plus `callback(StreamEvent)` and `max_length` (the context; default the config's)."""
  max_length = kwargs.pop("max_length", None)
  gen = generator_for(partitioner) if max_length is None else Generator(partitioner, max_length)
  return gen.generate(params, prompts, **kwargs)
