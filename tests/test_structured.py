"""Constrained decoding (`serving.structured`): a random "model" (logits ~ N(0, 10), so it strongly prefers
random tokens) drawing masked argmax tokens must write JSON that parses and validates against the schema.

    pytest tests/test_structured.py
"""

import concurrent.futures
import json

import jsonschema
import numpy as np
import pytest
import tokenizer_files as tf
from tokenizers import AddedToken

from qwen_logical.checkpoints.tokenizer import Tokenizer
from qwen_logical.serving.completions import RequestError
from qwen_logical.serving.structured import GrammarCompiler, allowed, fill_rows, words_of
from qwen_logical.serving.tool_calls import parse_reply

PARAM = "response_format.json_schema.schema"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>\n", "\n</tool_call>"

AGE = {"type": "integer", "minimum": 0, "maximum": 120}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": AGE, "email": {"type": "string"},
                         "admin": {"type": "boolean"}}}
SCHEMAS = {
    "required_optional": PERSON,
    "enums_ranges": {"type": "object", "additionalProperties": False,
                     "properties": {"color": {"enum": ["red", "green", "blue"]}, "level": {"enum": [1, 2, 3, None]},
                                    "n": {"type": "integer", "minimum": -5, "exclusiveMaximum": 5},
                                    "x": {"type": "number", "minimum": 0, "maximum": 1}, "unit": {"const": "cm"}},
                     "required": ["color", "level", "n", "x", "unit"]},
    "arrays": {"type": "object", "additionalProperties": False,
               "properties": {"ids": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
                              "people": {"type": "array", "items": PERSON, "maxItems": 2}},
               "required": ["ids", "people"]},
    "nested": {"type": "object", "additionalProperties": False,
               "properties": {"user": {"type": "object", "additionalProperties": False, "required": ["profile"],
                                       "properties": {"profile": PERSON, "tags": {"type": "array"}}}},
               "required": ["user"]},
    "any_of": {"type": "object", "additionalProperties": False,
               "properties": {"contact": {"anyOf": [{"type": "string", "pattern": "^[a-z]{2,5}-[0-9]{2}$"},
                                                    {"type": "null"}, PERSON]},
                              "score": {"type": ["integer", "null"]}},
               "required": ["contact", "score"]},
    "refs": {"type": "object", "$defs": {"point": {"type": "object", "additionalProperties": False,
                                                   "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                                                   "required": ["x", "y"]}},
             "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
             "required": ["a", "b"], "additionalProperties": False},
    "open_object": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]},
    "any_value": {},
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  """The test tokenizer with Qwen2.5's non-special added tokens <tool_call> and </tool_call>."""
  hf = tf.train_tokenizer(800)
  hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<tool_call>", "</tool_call>")])
  tf.write_tokenizer_dir(path := tmp_path_factory.mktemp("structured_tokenizer"), hf)
  return Tokenizer.from_directory(path)


@pytest.fixture(scope="module")
def vocab(tokenizer):
  return tokenizer.vocab_size + 45  # the model has ids the tokenizer does not (and V is not a multiple of 32)


@pytest.fixture(scope="module")
def compiler(tokenizer, vocab):
  return GrammarCompiler(tokenizer, vocab)


def generate(tokenizer, matcher, vocab, seed, max_tokens=600, specials=()):
  """Masked argmax over random logits until a stop id: the ids before the stop. Checks every mask (no ids
  past the tokenizer's, no added tokens but the stop ids and `specials`)."""
  rng = np.random.default_rng(seed)
  stops = list(tokenizer.stop_ids)
  closing = [i for i in range(tokenizer.vocab_size) if (t := tokenizer.decode([i])) and set(t) <= set('"]}')]
  others = sorted(set(tokenizer.backend.get_added_tokens_decoder()) - set(stops) - set(specials))
  words, ids = np.zeros(matcher.words, np.int32), []
  for step in range(max_tokens):
    matcher.fill(words)
    ok = allowed(words, vocab)
    assert ok.any() and not ok[tokenizer.vocab_size:].any() and not ok[others].any()
    logits = rng.normal(0.0, 10.0, vocab)
    if step >= 20 + 20 * (seed % 4):  # then a bias towards closing strings, arrays and objects, and stopping
      logits[closing] += 100.0
      logits[stops] += 200.0
    token = int(np.argmax(np.where(ok, logits, -np.inf)))
    assert matcher.accept(token), (matcher.error, tokenizer.decode(ids + [token]))
    if token in stops:
      assert matcher.done
      return ids
    ids.append(token)
  pytest.fail(f"no stop in {max_tokens} tokens: {tokenizer.decode(ids)!r}")


def check(tokenizer, ids, schema):
  value = json.loads(tokenizer.decode(ids))
  jsonschema.Draft202012Validator(schema).validate(value)
  return value


def test_json_object(tokenizer, compiler, vocab):
  grammar = compiler.compile("json_object")
  for seed in range(8):
    assert isinstance(check(tokenizer, generate(tokenizer, grammar.matcher(), vocab, seed), {}), dict)


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema(tokenizer, compiler, vocab, name):
  grammar = compiler.compile("json_schema", SCHEMAS[name], strict=True, param=PARAM)
  for seed in range(4):
    check(tokenizer, generate(tokenizer, grammar.matcher(), vocab, seed), SCHEMAS[name])


def test_many_seeds_one_schema(tokenizer, compiler, vocab):
  grammar = compiler.compile("json_schema", SCHEMAS["arrays"], strict=True, param=PARAM)
  texts = {tokenizer.decode(generate(tokenizer, grammar.matcher(), vocab, seed)) for seed in range(100, 124)}
  for text in texts:
    check(tokenizer, tokenizer.encode(text, add_special_tokens=False), SCHEMAS["arrays"])
  assert len(texts) > 15  # the matchers are independent: different draws, different replies


def test_compact_json_in_schema_order(tokenizer, compiler):
  matcher = compiler.compile("json_schema", PERSON, strict=True).matcher()
  assert all(matcher.accept(t) for t in tokenizer.encode('{"name": "Al", "age": 3}', add_special_tokens=False))
  assert matcher.accepting and matcher.done
  for text in ('{"age": 3, "name": "Al"}', '{"name":"Al", "age": 3}', '{ "name": "Al", "age": 3}'):
    matcher = compiler.compile("json_schema", PERSON, strict=True).matcher()
    assert not all(matcher.accept(t) for t in tokenizer.encode(text, add_special_tokens=False)), text


def test_forced_tool_call(tokenizer, compiler, vocab):
  weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                              "unit": {"enum": ["c", "f"]}}, "required": ["city"]}
  call = {"anyOf": [{"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": weather},
                     "required": ["name", "arguments"], "additionalProperties": False},
                    {"type": "object", "properties": {"name": {"const": "now"}, "arguments": {"$ref": "#/$defs/a1"}},
                     "required": ["name", "arguments"], "additionalProperties": False}],
          "$defs": {"a1": {"type": "object", "properties": {}, "additionalProperties": False}}}
  grammar = compiler.compile("json_schema", call, strict=True, param="tools", prefix=TOOL_OPEN, suffix=TOOL_CLOSE)
  names, tool_ids = set(), [tokenizer.token_to_id("<tool_call>"), tokenizer.token_to_id("</tool_call>")]
  for seed in range(10):
    ids = generate(tokenizer, grammar.matcher(), vocab, seed, specials=tool_ids)
    assert ids[0] == tokenizer.token_to_id("<tool_call>") and ids[-1] == tokenizer.token_to_id("</tool_call>")
    text = tokenizer.decode(ids)
    assert text.startswith(TOOL_OPEN) and text.endswith(TOOL_CLOSE)
    value = json.loads(text[len(TOOL_OPEN):-len(TOOL_CLOSE)])
    jsonschema.Draft202012Validator(call).validate(value)
    content, calls = parse_reply(text, known_names={"get_weather", "now"})
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [tuple(value.values())]
    names.add(value["name"])
  assert names == {"get_weather", "now"}


def test_literal_prefix_and_suffix(tokenizer, compiler, vocab):
  prefix, suffix = 'Answer:\t"é\u2028" {\\} ', "\n<|im_start|>"  # quotes, escapes, non-ASCII, a special token
  grammar = compiler.compile("json_object", prefix=prefix, suffix=suffix)
  for seed in range(3):
    ids = generate(tokenizer, grammar.matcher(), vocab, seed, specials=[tokenizer.token_to_id("<|im_start|>")])
    text = tokenizer.decode(ids)
    assert text.startswith(prefix) and text.endswith(suffix) and ids[-1] == tokenizer.token_to_id("<|im_start|>")
    assert isinstance(json.loads(text[len(prefix):-len(suffix)]), dict)


def test_stop_ids_end_it(tokenizer, compiler, vocab):
  matcher = compiler.compile("json_schema", {"type": "integer"}, strict=True).matcher()
  words = np.zeros(matcher.words, np.int32)
  assert matcher.accept(tokenizer.encode("7", add_special_tokens=False)[0])
  matcher.fill(words)
  ok = allowed(words, vocab)
  assert matcher.accepting and not matcher.done and ok[list(tokenizer.stop_ids)].all() and ok.sum() > 2
  matcher = compiler.compile("json_object").matcher()
  assert all(matcher.accept(t) for t in tokenizer.encode('{"a": [1]}', add_special_tokens=False))
  matcher.fill(words)
  assert matcher.done and set(np.flatnonzero(allowed(words, vocab))) == set(tokenizer.stop_ids)
  for stop in tokenizer.stop_ids:  # either stop id ends it, and nothing follows
    ended = compiler.compile("json_schema", {"type": "integer"}, strict=True).matcher()
    assert ended.accept(tokenizer.encode("7", add_special_tokens=False)[0]) and ended.accept(stop) and ended.done
    assert not ended.accept(tokenizer.encode("7", add_special_tokens=False)[0])


def test_rejected_token_leaves_only_stops(tokenizer, compiler, vocab):
  matcher = compiler.compile("json_object").matcher()
  words = np.zeros(matcher.words, np.int32)
  assert not matcher.accept(tokenizer.encode("x", add_special_tokens=False)[0])
  assert matcher.error and not matcher.done and not matcher.accepting
  matcher.fill(words)
  assert set(np.flatnonzero(allowed(words, vocab))) == set(tokenizer.stop_ids)
  assert not compiler.compile("json_object").matcher().accept(vocab)  # past the vocabulary: False, no raise


def test_cut_by_max_tokens(tokenizer, compiler):
  """A reply cut by max_tokens leaves its matcher mid-grammar: nothing to close, the caller drops it."""
  matcher = compiler.compile("json_schema", PERSON, strict=True).matcher()
  assert all(matcher.accept(t) for t in tokenizer.encode('{"name": "A', add_special_tokens=False))
  assert not matcher.done and not matcher.accepting and matcher.error is None


def test_mask_words_and_tail(tokenizer, compiler, vocab):
  assert compiler.words == words_of(vocab) == -(-vocab // 32)
  matcher = compiler.compile("json_schema", {}).matcher()
  words = np.full(matcher.words + 3, -1, np.int32)  # a longer row: only out[:W] is written
  matcher.fill(words)
  ok = allowed(words, vocab)
  assert ok[:tokenizer.vocab_size].sum() > 10 and not ok[tokenizer.vocab_size:].any()
  assert (words[matcher.words:] == -1).all()
  for bad in (np.zeros(matcher.words, np.int64), np.zeros(matcher.words - 1, np.int32),
              np.zeros((2, matcher.words), np.int32)[:, 0]):
    with pytest.raises(ValueError):
      matcher.fill(bad)


@pytest.mark.parametrize("schema, feature", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "if"),
])
def test_unsupported_feature(tokenizer, compiler, vocab, schema, feature):
  with pytest.raises(RequestError, match=feature) as info:
    compiler.compile("json_schema", schema, strict=True, param=PARAM)
  assert info.value.param == PARAM and "strict false" in str(info.value)
  with pytest.raises(RequestError, match=feature) as info:
    compiler.compile("json_schema", schema, strict=True, param="tools")
  assert info.value.param == "tools"
  grammar = compiler.compile("json_schema", schema, strict=False, param=PARAM)  # best effort: keyword ignored
  json.loads(tokenizer.decode(generate(tokenizer, grammar.matcher(), vocab, 0)))


@pytest.mark.parametrize("schema, words", [
    ({"type": "strin"}, "strin"),
    ({"type": "object", "properties": []}, "properties"),
    ({"type": "object", "required": "a"}, "required"),
    ({"type": "integer", "minimum": 3, "maximum": 1}, "minimum"),
    ({"enum": []}, "anyOf is empty"),
    ({"$ref": "#/$defs/missing"}, "missing"),
    ({"type": "string", "pattern": "(unclosed"}, "regex parse error: \\(unclosed error: unclosed group"),
    ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ([{"type": "object"}], "list"),
    ("object", "str"),
    ({"type": "number", "maximum": float("nan")}, "JSON"),
])
def test_invalid_schema(compiler, schema, words):
  for strict in (True, False):
    with pytest.raises(RequestError, match=words) as info:
      compiler.compile("json_schema", schema, strict=strict, param=PARAM)
    assert info.value.param == PARAM


def test_kind_and_tokenizer_checks(tokenizer, compiler):
  with pytest.raises(ValueError):
    compiler.compile("regex", "a+")
  with pytest.raises(ValueError):
    GrammarCompiler(tokenizer, tokenizer.vocab_size - 1)
  no_stops = Tokenizer(tokenizer.backend)
  with pytest.raises(RequestError, match="stop token") as info:
    GrammarCompiler(no_stops, tokenizer.vocab_size).compile("json_object", param="response_format")
  assert info.value.param == "response_format"


def test_cache(tokenizer, vocab):
  compiler = GrammarCompiler(tokenizer, vocab, cache_size=2)
  a = compiler.compile("json_schema", PERSON, strict=True)
  assert compiler.compile("json_schema", json.loads(json.dumps(PERSON)), strict=True) is a
  reordered = {"required": PERSON["required"], **{k: v for k, v in PERSON.items() if k != "required"}}
  assert compiler.compile("json_schema", reordered, strict=True) is not a  # key order is property order
  assert compiler.compile("json_schema", PERSON, strict=False) is not a
  assert compiler.cached() == 2
  assert compiler.compile("json_schema", PERSON, strict=True) is not a  # evicted, compiled anew


def test_threads(tokenizer, compiler, vocab):
  schemas = [SCHEMAS[n] for n in ("required_optional", "nested", "refs")] * 4
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    grammars = list(pool.map(lambda s: compiler.compile("json_schema", s, strict=True), schemas))
    texts = list(pool.map(lambda g: tokenizer.decode(generate(tokenizer, g.matcher(), vocab, 5)), grammars))
  assert texts[:3] * 4 == texts


def test_fill_rows(tokenizer, compiler, vocab):
  grammars = [compiler.compile("json_schema", SCHEMAS[n], strict=True) for n in ("arrays", "any_of", "refs")]
  matchers = [g.matcher() for g in grammars] + [compiler.compile("json_object").matcher()]
  for m, text in zip(matchers, ('{"ids": [1', '{"contact": "ab', '', 'x')):
    [m.accept(t) for t in tokenizer.encode(text, add_special_tokens=False)]  # the last one fails: stops only
  assert matchers[3].error and not any(m.error for m in matchers[:3])
  rows = [(5, matchers[0]), (0, matchers[1]), (2, matchers[2]), (3, matchers[3])]
  batch = np.full((6, compiler.words), 7, np.int32)
  fill_rows(rows, batch)
  one = np.zeros(compiler.words, np.int32)
  for r, m in rows:
    m.fill(one)
    assert (batch[r] == one).all()
  assert (batch[[1, 4]] == 7).all()
  with pytest.raises(ValueError):
    fill_rows(rows, np.zeros((6, compiler.words + 1), np.int32))
