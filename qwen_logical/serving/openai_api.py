"""OpenAI-compatible request parsing and response bodies (no HTTP: plain dicts in and out).

    parsed = parse_request("chat", body, served)       # RequestError(message, param) on bad input
    parsed.request                                      # the EngineRequest (chat-templated token ids)
    parsed.choice(i)                                    # choice i's EngineRequest (its seed, its grammar matcher)

`served` (ServedModel) says what the server runs: its model name, tokenizer (None: token-id prompts
only), context and vocabulary size. Beyond prompt and sampling, a request may ask for `n` choices,
log-probabilities (chat `logprobs` + `top_logprobs`, completions `logprobs` and `echo`, with
`max_tokens` 0 to score a prompt), penalties and `logit_bias` (`openai_options`), `tools` and
`tool_choice` (`openai_tools`), `response_format` (`structured_output`), and chat's
`chat_template_kwargs` (template variables, as vLLM takes them: `openai_prompts`). Fields OpenAI defines
but this server does not implement are accepted at their default values and refused otherwise;
unknown fields are refused. Extensions: `top_k` (0 or -1: off), `repetition_penalty`, `min_tokens`
and `return_token_ids` (each choice, and each chunk, carries `token_ids`; always on for a server
without a tokenizer). A server with a reasoning parser (`ServedModel.reasoning_parser`, "qwen3") splits
each chat reply's leading `<think>...</think>` block into the message's `reasoning_content` (`reasoning`).
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
import time
from typing import Any

from qwen_logical.serving import completions, openai_tools, reasoning, structured_output
from qwen_logical.serving.completions import RequestError
from qwen_logical.serving.engine import EngineRequest
from qwen_logical.serving.openai_fields import IGNORED_AT_DEFAULT, expect, optional_int, sampling_params
from qwen_logical.serving.openai_options import Options, parse_options
from qwen_logical.serving.openai_prompts import chat_tokens, echo_text, prompt_batch

_SHARED = ("model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
           "stream", "stream_options", "n", "return_token_ids", "presence_penalty", "frequency_penalty", "logit_bias",
           "repetition_penalty", "min_tokens", "logprobs")
FIELDS = {"chat": frozenset(_SHARED + ("messages", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
                                       "response_format", "chat_template_kwargs")),
          "completion": frozenset(_SHARED + ("prompt", "echo", "best_of", "response_format"))}
MAX_CHOICES = 64  # completions per request: prompts x n
MAX_STOP = 16  # stop strings per request (each is searched for in the text after every token)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
# EngineRequest / ServingError field names -> the OpenAI parameter a client sent.
_ENGINE_PARAMS = {"max_new_tokens": "max_tokens", "sampling": "temperature", "stop_ids": "stop"}


@dataclasses.dataclass(frozen=True)
class ServedModel:
  """What the server runs: `name` (the only accepted `model`), `tokenizer` (None: token ids only),
  `context` (prompt + new tokens per request), `vocab_size` (token ids must be below it),
  `reasoning_parser` ("" off, "qwen3": chat replies' <think> blocks become `reasoning_content`)."""

  name: str
  tokenizer: Any
  context: int
  vocab_size: int
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))
  defaults: dict = dataclasses.field(default_factory=dict)  # request fields' defaults (`generation_defaults`)
  reasoning_parser: str = ""

  def __post_init__(self):
    reasoning.check_parser(self.reasoning_parser)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return tuple(getattr(self.tokenizer, "stop_ids", ()) or ())

  @functools.cached_property
  def grammars(self):
    """The grammar compiler over this tokenizer (`serving.structured`), built on first use."""
    from qwen_logical.serving.structured import GrammarCompiler
    return GrammarCompiler(self.tokenizer, self.vocab_size)


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
  """A validated request: `kind` "chat" | "completion", the EngineRequest (of choice 0), the text-side
  options; `options` (n, logprobs, echo, logit processing), `tools` (a ToolRequest or None),
  `grammar` (what every choice's reply must match, or None), `score_only` (max_tokens 0 with echo:
  the prompt's log-probabilities only), `prompts` (completions: each prompt's ids and echo text;
  `choices` = prompts x n, choice i answering prompt i // n); `reasoning`: None when replies are not
  split into reasoning and content, else whether the prompt left a `<think>` block open."""

  kind: str
  model: str
  request: EngineRequest
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool
  return_token_ids: bool
  options: Options = Options()
  tools: Any = None
  grammar: Any = None
  score_only: bool = False
  prompts: tuple = ()  # completions: (token ids, echo text) per prompt; choice i answers prompt i // n
  reasoning: bool | None = None

  @property
  def prompt_param(self) -> str:
    return "messages" if self.kind == "chat" else "prompt"

  @property
  def choices(self) -> int:
    return max(1, len(self.prompts)) * self.options.n

  def prompt_text(self, i: int) -> str:
    """What echo puts before choice i's completion."""
    return self.prompts[i // self.options.n][1] if self.prompts else ""

  def choice(self, i: int) -> EngineRequest:
    """The engine request of choice i: its prompt, its own seed (seed + i % n), its own grammar matcher."""
    grammar = self.grammar.matcher() if self.grammar is not None else None
    tokens = self.prompts[i // self.options.n][0] if self.prompts else self.request.tokens
    return dataclasses.replace(self.request, tokens=tokens, seed=(self.request.seed + i % self.options.n) % 2**32,
                               grammar=grammar)


DEFAULTED = ("temperature", "top_p", "top_k", "repetition_penalty")  # what a checkpoint's generation_config may set


def generation_defaults(tokenizer) -> dict:
  """The sampling defaults of the checkpoint's generation_config.json (temperature, top_p, top_k,
  repetition_penalty) for requests that leave them out, as transformers' generate and vLLM apply them."""
  config = getattr(tokenizer, "generation_config", None) or {}
  return {name: config[name] for name in DEFAULTED if isinstance(config.get(name), (int, float))}


def engine_param(parsed: ParsedRequest | None, field: str | None) -> str | None:
  """The OpenAI parameter for an engine error's field (`tokens` -> the prompt's parameter)."""
  if field == "tokens":
    return parsed.prompt_param if parsed is not None else "prompt"
  return _ENGINE_PARAMS.get(field, field)


def parse_request(kind: str, body: Any, served: ServedModel) -> ParsedRequest:
  """Validates an OpenAI request body (the decoded JSON) into a ParsedRequest; RequestError names the field."""
  if not isinstance(body, dict):
    raise RequestError(f"The request body must be a JSON object, got {type(body).__name__}.")
  _check_fields(kind, body)
  body = {**served.defaults, **{k: v for k, v in body.items() if v is not None or k not in served.defaults}}
  model = expect(body, "model", str, required=True)
  if model != served.name:
    raise RequestError(f"The model `{model}` does not exist: this server serves `{served.name}` (GET /v1/models).",
                       "model")
  options = parse_options(kind, body, served.vocab_size)
  stream = expect(body, "stream", bool, default=False)
  include_usage = _stream_options(body, stream)
  stop = _stop(body, served)
  sampling = sampling_params(body)
  seed = optional_int(body, "seed")
  if seed is None:
    seed = secrets.randbits(31) if not sampling.greedy else 0
  token_ids = expect(body, "return_token_ids", bool, default=False) or served.tokenizer is None  # no text without
  asked = _asked_max_tokens(body, options.echo)
  tools = openai_tools.parse_tools(body) if kind == "chat" else None
  grammar = structured_output.grammar_for(body, tools, served)
  batch = [(chat_tokens(body, served, tools), None)] if kind == "chat" else prompt_batch(body, served)
  if len(batch) * options.n > MAX_CHOICES:
    raise RequestError(f"{len(batch)} prompts x n={options.n} is {len(batch) * options.n} completions: at most "
                       f"{MAX_CHOICES} per request.", "n" if len(batch) == 1 else "prompt")
  tokens, score_only = max((ids for ids, _ in batch), key=len), asked[1] == 0
  max_new = _max_tokens(kind, (asked[0], asked[1] or None) if score_only else asked, len(tokens), served.context,
                        "messages" if kind == "chat" else "prompt")
  if score_only:
    max_new = 1  # the engine draws one token; the answer leaves it out
  if grammar is not None and options.processing.min_tokens:
    raise RequestError("min_tokens cannot be combined with response_format or a forced tool call: the grammar "
                       "decides where the reply ends.", "min_tokens")
  if options.processing.min_tokens > max_new:
    raise RequestError(f"min_tokens={options.processing.min_tokens} exceeds the {max_new} tokens this request may "
                       "generate (max_tokens).", "min_tokens")
  request = EngineRequest(tuple(tokens), max_new, sampling, seed=seed % 2**32, stop_ids=served.stop_ids,
                          processing=options.processing, logprobs=options.logprobs,
                          echo=options.echo and options.logprobs is not None)  # echoed text alone needs no scores
  prompts = tuple((tuple(ids), echo_text(text, ids, served) if options.echo else "") for ids, text in
                  (batch if kind == "completion" else []))
  return ParsedRequest(kind, model, request, stop, stream, include_usage, token_ids, options, tools, grammar,
                       score_only, prompts, _reasoning(kind, tokens, grammar, served))


def _reasoning(kind: str, tokens, grammar, served: ServedModel) -> bool | None:
  """None unless the server splits reasoning from chat replies; else whether the prompt opened a `<think>`
  block (a grammar shapes the reply from its first token: then it is all content)."""
  if kind != "chat" or not served.reasoning_parser:
    return None
  return grammar is None and reasoning.prompt_opens_thinking(served.tokenizer.decode(list(tokens[-16:])))


def _check_fields(kind: str, body: dict) -> None:
  for name, value in body.items():
    if name in FIELDS[kind]:
      continue
    if name in IGNORED_AT_DEFAULT:
      if not IGNORED_AT_DEFAULT[name](value):
        raise RequestError(f"`{name}` is not supported by this server; leave it out (or at its default).", name)
      continue
    raise RequestError(f"Unrecognized request argument supplied: {name}", name)


def _stream_options(body: dict, stream: bool) -> bool:
  options = expect(body, "stream_options", dict)
  if options is None:
    return False
  if not stream:
    raise RequestError("`stream_options` is only allowed with stream=true.", "stream_options")
  unknown = set(options) - {"include_usage"}
  if unknown:
    raise RequestError(f"Unrecognized stream option: {sorted(unknown)[0]}", "stream_options")
  return bool(expect(options, "include_usage", bool, default=False, where="stream_options"))


def _stop(body: dict, served: ServedModel) -> tuple[str, ...]:
  stop = body.get("stop")
  if stop is None:
    return ()
  stops = [stop] if isinstance(stop, str) else stop
  if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
    raise RequestError("`stop` must be a non-empty string or a list of non-empty strings.", "stop")
  if len(stops) > MAX_STOP:
    raise RequestError(f"`stop` has {len(stops)} strings: at most {MAX_STOP} are taken.", "stop")
  if served.tokenizer is None:
    raise RequestError(f"Stop strings need text: {completions.NO_TOKENIZER}.", "stop")
  return tuple(stops)


def _asked_max_tokens(body: dict, echo: bool = False) -> tuple[str, int | None]:
  """(the parameter used, its value or None): max_completion_tokens or the older max_tokens (0 only
  with echo: the prompt scored, nothing generated)."""
  param, value = "max_completion_tokens", optional_int(body, "max_completion_tokens")
  legacy = optional_int(body, "max_tokens")
  if value is None:
    param, value = "max_tokens", legacy
  elif legacy is not None and legacy != value:
    raise RequestError("max_tokens and max_completion_tokens differ: send only one.", "max_tokens")
  if value is not None and value < (0 if echo else 1):
    raise RequestError(f"{param}={value} is invalid: it must be at least 1 (0 only with echo=true).", param)
  return param, value


def _max_tokens(kind: str, asked: tuple[str, int | None], prompt_len: int, context: int, prompt_param: str) -> int:
  """New tokens at most: as asked if the context holds them; by default 16 for completions (as OpenAI),
  the rest of the context for chat."""
  param, value = asked
  room = context - prompt_len
  if value is None:
    return min(COMPLETIONS_DEFAULT_MAX_TOKENS, room) if kind == "completion" else room
  if value > room:
    raise RequestError(f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{prompt_len + value} tokens ({prompt_len} in the {prompt_param}, {value} in the "
                       f"completion). Reduce the {prompt_param} or {param} (at most {room} here).", param)
  return value
