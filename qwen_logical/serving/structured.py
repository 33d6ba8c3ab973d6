"""Constrained decoding: replies that must be JSON (OpenAI `response_format` json_object / json_schema) or
a forced tool call, enforced as a token bitmask per step. Built on llguidance (the only module importing it).

    compiler = GrammarCompiler(tokenizer, vocab_size=151936)   # once per server (~1 s for Qwen's vocabulary)
    grammar = compiler.compile("json_schema", schema={"type": "object", ...}, strict=True,
                               param="response_format.json_schema.schema")         # RequestError: a 400
    call = compiler.compile("json_schema", schema=tools.call_schema(), strict=True, param="tools",
                            prefix="<tool_call>\\n", suffix="\\n</tool_call>")
    matcher = grammar.matcher()        # one per request (choice); cheap
    words = np.empty(matcher.words, np.int32)
    while True:
      matcher.fill(words)              # int32[W]: bit j of word w allows token 32 w + j
      token = draw(logits, allowed(words, vocab_size))   # allowed: bool[V]
      matcher.accept(token)            # False: the token broke the grammar (only stop ids are allowed then)
      if token in tokenizer.stop_ids:
        break
    matcher.done                       # True: the reply is whole and its stop id was taken
    fill_rows([(row, matcher), ...], mask)   # mask: int32[R, W]; every row's mask at once, on a thread pool

Masks. W = ceil(vocab_size / 32) for the model's vocabulary size V (>= the tokenizer's size); ids the
tokenizer does not have are never allowed, nor are special tokens except the stop ids, which are allowed
exactly when the text so far is a whole reply (and are then the only choice once nothing may follow).

JSON. Compact separators (", " and ": ", no other whitespace between values), properties in the schema's
order. `strict` True: a schema keyword the grammar cannot enforce (e.g. `not`, `uniqueItems`, `if`) is a
RequestError naming it; False (OpenAI's default, "best effort"): such keywords are ignored and the rest is
enforced. An invalid schema is a RequestError either way (`param` names the field, e.g.
`response_format.json_schema.schema`). `prefix` / `suffix`: literal text around the JSON; text equal to
one of the tokenizer's added tokens (e.g. Qwen2.5's `<tool_call>`) is that single token, as encode() gives.

Max tokens. The grammar never ends a reply by itself: a reply that reaches max_tokens before the grammar
completes is cut there (finish_reason "length", text not parseable), as OpenAI does; its matcher is dropped.

Threads. GrammarCompiler.compile and Grammar.matcher may be called from any thread (the cache is locked;
compiled grammars are read-only). A Matcher is used by one thread at a time (the engine thread).
"""

from __future__ import annotations

import collections
import json
import re
import threading
from typing import Any

import llguidance
import numpy as np

from qwen_logical.inference.logit_processing import mask_words
from qwen_logical.serving.completions import RequestError

__all__ = ["KINDS", "GrammarCompiler", "Grammar", "Matcher", "allowed", "fill_rows", "words_of"]

KINDS = ("json_object", "json_schema")
_SEPARATORS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_EXECUTOR: list = []  # llguidance's thread pool for fill_rows, made on first use
_EXECUTOR_LOCK = threading.Lock()
_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[(.*?)\]")
_ECHO = re.compile(r"^\s+\d+ \| ")  # a line of the grammar, in llguidance's messages
_WHERE = re.compile(r"^(at \d+\(\d+\): )?(failed to compile JSON schema: )?")  # llguidance's Lark position


words_of = mask_words  # W: int32 words of a bitmask over `vocab_size` token ids (one place: logit_processing)


def allowed(mask_words: np.ndarray, vocab_size: int) -> np.ndarray:
  """bool[vocab_size] of a bitmask int32[>= W] (bit j of word w: token 32 w + j)."""
  words = np.ascontiguousarray(mask_words[:words_of(vocab_size)], dtype="<i4")
  return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)


def _mask(ids, vocab_size: int) -> np.ndarray:
  """int32[W] with the bits of `ids` set."""
  bits = np.zeros(words_of(vocab_size) * 32, np.uint8)
  bits[np.asarray(list(ids), np.int64)] = 1
  return np.packbits(bits, bitorder="little").view("<i4").astype(np.int32)


class GrammarCompiler:
  """Compiles grammars over one tokenizer's tokens for a model vocabulary of `vocab_size` ids.

  Built once per server: reading the tokenizer's vocabulary costs ~1 s for 151k tokens. Compiled grammars
  are cached by their canonical JSON (kind, schema with its key order, strict, prefix, suffix), the
  `cache_size` most recently used kept.
  """

  def __init__(self, tokenizer, vocab_size: int, *, cache_size: int = 256):
    size = tokenizer.vocab_size
    if vocab_size < size:
      raise ValueError(f"vocab_size={vocab_size} is below the tokenizer's {size} tokens.")
    self.vocab_size, self.words, self.tokenizer_size = int(vocab_size), words_of(vocab_size), size
    stops = tuple(tokenizer.stop_ids) or ((tokenizer.eos_id,) if tokenizer.eos_id is not None else ())
    self.stop_ids: tuple[int, ...] = tuple(int(i) for i in stops)
    self._llg = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                       eos_token=list(self.stop_ids) or None)
    # Added tokens (Qwen's <tool_call>, <|im_start|>, ...): literal text equal to one is that one token.
    added = {t.content: i for i, t in tokenizer.backend.get_added_tokens_decoder().items()}
    self._added = added
    self._added_re = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
                                ) if added else None
    self.stop_mask = _mask(self.stop_ids, self.vocab_size)  # int32[W]: the stop ids only
    self.known = _mask(range(size), self.vocab_size)  # int32[W]: the ids the tokenizer has
    self._cache: collections.OrderedDict[str, Grammar] = collections.OrderedDict()
    self._cache_size = int(cache_size)
    self._lock = threading.Lock()

  def compile(self, kind: str, schema: Any = None, *, strict: bool = False, param: str = "response_format",
              prefix: str = "", suffix: str = "") -> "Grammar":
    """The Grammar of replies `prefix` + JSON + `suffix`.

    kind: "json_object" (any JSON object; `schema` is ignored) or "json_schema" (a JSON value valid under
    `schema`, a dict or True; None: any JSON value). RequestError(message, param) for a schema that is not
    valid, not JSON, or (strict) uses a keyword the grammar cannot enforce; for a tokenizer without stop ids.
    """
    if kind not in KINDS:
      raise ValueError(f"kind={kind!r}: use one of {KINDS}.")
    if not self.stop_ids:
      raise RequestError("Structured output needs a stop token to end the reply, and the tokenizer names none "
                         "(no eos_token in tokenizer_config.json nor eos_token_id in generation_config.json).",
                         param)
    if kind == "json_object":
      schema, strict = {"type": "object"}, True
    elif schema is None or schema is True:
      schema = {}
    elif not isinstance(schema, dict):
      raise RequestError(f"{param} must be a JSON Schema object, got {type(schema).__name__}.", param)
    try:
      key = json.dumps([kind, schema, bool(strict), prefix, suffix], ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
      raise RequestError(f"{param} is not plain JSON: {e}", param) from e
    with self._lock:
      hit = self._cache.get(key)
      if hit is not None:
        self._cache.move_to_end(key)
        return hit
    grammar = Grammar(self, kind, key, self._build(schema, strict, param, prefix, suffix))
    with self._lock:
      self._cache[key] = grammar
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    return grammar

  def cached(self) -> int:
    """Grammars in the cache."""
    with self._lock:
      return len(self._cache)

  def _build(self, schema: dict, strict: bool, param: str, prefix: str, suffix: str):
    """The llguidance matcher (at its start) of the Lark grammar prefix %json{schema} suffix."""
    options = dict(_SEPARATORS, lenient=not strict)
    body = json.dumps({**schema, "x-guidance": options}, allow_nan=False)  # ASCII: one line of Lark
    parts = [*self._literal(prefix), "json_body", *self._literal(suffix)]
    lark = f"start: {' '.join(parts)}\njson_body: %json {body}\n"
    matcher = llguidance.LLMatcher(self._llg, lark, log_level=0)
    if matcher.is_error():
      raise _schema_error(matcher.get_error(), param)
    return matcher

  def _literal(self, text: str) -> list[str]:
    """Lark items for literal `text`: added tokens as token references (<[id]>), the rest as strings."""
    pieces = self._added_re.split(text) if self._added_re is not None and text else [text]
    out = []
    for i, piece in enumerate(pieces):
      if i % 2 == 1:
        out.append(f"<[{self._added[piece]}]>")
      elif piece:
        out.append(json.dumps(piece))
    return out


def _schema_error(message: str, param: str) -> RequestError:
  """A RequestError for llguidance's message on a schema it cannot take."""
  lines = []
  for line in message.strip().splitlines():  # the message, without llguidance's echo of the grammar
    if _ECHO.match(line) or line.startswith("<state>"):
      break
    if line.strip(" ^"):
      lines.append(line.strip())
  first = _WHERE.sub("", " ".join(lines) or "unknown error")[:500]
  found = _UNIMPLEMENTED.search(first)
  if found:
    names = ", ".join(n.strip().strip('"') for n in found.group(1).split(","))
    hint = " (with strict false they are ignored)" if param.startswith("response_format") else ""
    return RequestError(f"{param} uses JSON Schema keywords that constrained decoding cannot enforce: {names}. "
                        f"Remove them{hint}.", param)
  return RequestError(f"{param} is not a JSON Schema that constrained decoding can follow: {first}", param)


class Grammar:
  """A compiled grammar: `matcher()` makes one Matcher per request. Read-only, shared by threads."""

  def __init__(self, compiler: GrammarCompiler, kind: str, key: str, start):
    self.kind, self.key = kind, key
    self.vocab_size, self.words = compiler.vocab_size, compiler.words
    self.stop_ids = compiler.stop_ids
    self._start = start  # an llguidance LLMatcher at the grammar's start, never advanced
    self._stop_mask, self._known = compiler.stop_mask, compiler.known
    self._tail = compiler.tokenizer_size // 32  # from this word on, ids past the tokenizer are cleared
    self._lock = threading.Lock()

  def matcher(self) -> "Matcher":
    with self._lock:
      return Matcher(self, self._start.deep_copy())

  def __repr__(self) -> str:
    return f"Grammar({self.kind}, {self.key[:80]!r})"


class Matcher:
  """One request's position in its Grammar: `fill` the next token's mask, `accept` each drawn token.

  Not thread-safe: one thread at a time (the engine thread). `words`: W, the int32 words of a mask.
  """

  def __init__(self, grammar: Grammar, state):
    self.grammar, self.words = grammar, grammar.words
    self._state = state
    self.error: str | None = None  # why the last accept failed (the matcher then allows stop ids only)

  def fill(self, out: np.ndarray) -> None:
    """Writes the allowed next tokens into out[:W] (int32, C-contiguous; bit j of word w: token 32 w + j)."""
    w = self.words
    if out.dtype != np.int32 or out.ndim != 1 or out.shape[0] < w or not out.flags.c_contiguous:
      raise ValueError(f"fill takes a C-contiguous int32[>= {w}] array, got {out.dtype}{list(out.shape)}.")
    if self.error is not None:
      out[:w] = self.grammar._stop_mask
      return
    self._state.unsafe_compute_mask_ptr(out.ctypes.data, 4 * w)
    tail = self.grammar._tail
    out[tail:w] &= self.grammar._known[tail:]

  def accept(self, token_id: int) -> bool:
    """Advances past `token_id`; False if the grammar does not allow it (and then only stop ids are allowed)."""
    if self.error is not None:
      return False
    token = int(token_id)
    if not 0 <= token < self.grammar.vocab_size:
      self.error = f"token {token} is outside the vocabulary of {self.grammar.vocab_size}"
      return False
    if self._state.consume_token(token):
      return True
    self.error = (self._state.get_error().strip().splitlines() or ["rejected"])[0][:300]
    return False

  @property
  def done(self) -> bool:
    """Whether the reply is whole and nothing but a stop id may follow (or one was taken)."""
    return self.error is None and self._state.is_stopped()

  @property
  def accepting(self) -> bool:
    """Whether the text so far is a whole reply (a stop id may come next)."""
    return self.error is None and (self._state.is_accepting() or self._state.is_stopped())

  def __repr__(self) -> str:
    return f"Matcher({self.grammar.kind}, done={self.done}, error={self.error!r})"


def fill_rows(rows, out: np.ndarray) -> None:
  """Fills out[r] for each (r, matcher) of `rows` as matcher.fill(out[r]) does, the masks computed in
  parallel on llguidance's thread pool. out: int32[R, W], C-contiguous; the rows distinct, all W the same."""
  rows = list(rows)
  if not rows:
    return
  w = rows[0][1].words
  if out.dtype != np.int32 or out.ndim != 2 or out.shape[1] != w or not out.flags.c_contiguous:
    raise ValueError(f"fill_rows takes a C-contiguous int32[R, {w}] array, got {out.dtype}{list(out.shape)}.")
  if any(m.words != w for _, m in rows) or len({r for r, _ in rows}) != len(rows):
    raise ValueError("fill_rows takes matchers of one vocabulary size, each for its own row.")
  if not all(0 <= r < out.shape[0] for r, _ in rows):
    raise ValueError(f"fill_rows: a row is outside the mask's {out.shape[0]} rows.")
  live = [(m._state, int(r)) for r, m in rows if m.error is None]
  if live:
    with _EXECUTOR_LOCK:
      if not _EXECUTOR:
        _EXECUTOR.append(llguidance.LLExecutor())
    _EXECUTOR[0].unsafe_compute_mask_ptr(live, out.ctypes.data, 4 * w, out.shape[0])
  for r, m in rows:
    grammar = m.grammar
    if m.error is not None:
      out[r] = grammar._stop_mask
    else:
      out[r, grammar._tail:] &= grammar._known[grammar._tail:]
