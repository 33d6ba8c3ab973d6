"""What a served request may ask beyond its tokens, checked against transformers (float32) on a model whose
logits look real (std ~10, maxima ~30): each token's log-probability and top alternatives and the prompt's
own (echo); repetition, presence and frequency penalties, logit_bias and min_tokens; a grammar's token mask;
and the prefix cache, which must give the tokens a full prefill gives."""

import functools

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from test_serving_engine import Collector, hf_model, setup
from qwen_logical.inference.logit_processing import Processing
from qwen_logical.inference.sampling import SamplingParams
from qwen_logical.serving.engine import Engine, EngineRequest, ServingError

CONTEXT = 128
RNG = np.random.RandomState(11)
PROMPT = tuple(int(t) for t in RNG.randint(0, 256, 70))


@pytest.fixture(scope="module")
def engine():
  part, params = setup("1x1", "tensor_parallel")
  engine = Engine(part, params, slots=4, context=CONTEXT, queue_size=16)
  engine.start()
  yield engine
  engine.stop(5)


def run(engine, *requests):
  collector = Collector()
  rids = [engine.submit(r, collector) for r in requests]
  collector.wait(rids)
  return [[e for e in collector.events if e.request_id == rid] for rid in rids]


def tokens_of(events):
  return [e.token for e in events if e.token is not None]


@functools.lru_cache(maxsize=None)
def hf_log_softmax(ids: tuple) -> np.ndarray:
  with torch.no_grad():
    logits = hf_model()(torch.tensor([ids])).logits[0].float()
  return torch.log_softmax(logits, dim=-1).numpy()


def hf_generate(ids, new, **kwargs):
  with torch.no_grad():
    out = hf_model().generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs)
  return out[0, len(ids):].tolist()


def test_logprobs_and_echo_equal_transformers(engine):
  prompt = PROMPT[:20]
  [events] = run(engine, EngineRequest(prompt, 8, SamplingParams(), logprobs=5, echo=True))
  tokens = tokens_of(events)
  reference = hf_log_softmax(prompt + tuple(tokens))
  assert reference.max(axis=-1).mean() > -3 and np.exp(reference).max() > 0.5  # peaked, as real logits are
  for j, event in enumerate(events):
    row = reference[len(prompt) + j - 1]
    assert event.token == int(row.argmax())
    assert abs(event.logprob - row[event.token]) < 1e-3
    ids, values = zip(*event.top_logprobs)
    assert list(ids) == list(np.argsort(-row)[:5]) and np.allclose(values, np.sort(row)[::-1][:5], atol=1e-3)
  scores = events[0].prompt_logprobs
  assert len(scores) == len(prompt) and scores[0] is None
  for i in range(1, len(prompt)):
    assert abs(scores[i][0] - reference[i - 1][prompt[i]]) < 1e-3
    assert scores[i][1][0][0] == int(reference[i - 1].argmax())


class _OpenAIPenalties(LogitsProcessor):
  """OpenAI's presence and frequency penalties over the generated tokens, for transformers."""

  def __init__(self, start, presence, frequency):
    self.start, self.presence, self.frequency = start, presence, frequency

  def __call__(self, input_ids, scores):
    counts = torch.zeros_like(scores)
    counts.scatter_add_(1, input_ids[:, self.start:], torch.ones_like(input_ids[:, self.start:], dtype=scores.dtype))
    return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def test_penalties_bias_and_min_tokens_equal_transformers(engine):
  prompt, new = PROMPT[:12], 24
  plain = hf_generate(prompt, new)
  assert len(set(plain)) < len(plain)  # the greedy text repeats, so the penalties have work to do
  requests = {
      "repetition": (Processing(repetition_penalty=1.8), dict(repetition_penalty=1.8)),
      "presence_frequency": (Processing(presence_penalty=1.5, frequency_penalty=2.0),
                             dict(logits_processor=LogitsProcessorList([_OpenAIPenalties(len(prompt), 1.5, 2.0)]))),
  }
  results = run(engine, *(EngineRequest(prompt, new, processing=p) for p, _ in requests.values()))
  for (name, (_, hf_kwargs)), events in zip(requests.items(), results):
    expected = hf_generate(prompt, new, **hf_kwargs)
    assert expected != plain and tokens_of(events) == expected, name
  stop = plain[1]
  bias, late = run(engine, EngineRequest(prompt, 6, processing=Processing(logit_bias=((77, 100.0),))),
                   EngineRequest(prompt, new, stop_ids=(stop,), processing=Processing(min_tokens=6)))
  assert tokens_of(bias) == [77] * 6
  expected = hf_generate(prompt, new, eos_token_id=stop, min_new_tokens=6)
  assert tokens_of(late) == expected and stop not in expected[:6]


class _EveryThird:
  """A grammar matcher that allows token ids divisible by 3 only, and records what it was fed."""

  def __init__(self, vocab):
    allowed = np.zeros(-(-vocab // 32) * 32, bool)
    allowed[:vocab:3] = True
    bits = allowed.reshape(-1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)  # bit j: token 32 w + j
    self.words = bits.sum(axis=1).astype(np.uint32).view(np.int32)
    self.fed = []

  def fill(self, out):
    out[:] = self.words

  def accept(self, token):
    self.fed.append(token)
    return True


def test_a_grammar_mask_limits_every_draw(engine):
  prompt, grammar = PROMPT[:9], _EveryThird(256)
  [events] = run(engine, EngineRequest(prompt, 10, grammar=grammar))
  tokens = tokens_of(events)
  assert all(t % 3 == 0 for t in tokens) and grammar.fed == tokens
  ids = list(prompt)
  for t in tokens:  # each the most likely allowed token
    row = hf_log_softmax(tuple(ids))[-1]
    assert t == int(np.argmax(np.where(np.arange(256) % 3 == 0, row, -np.inf)))
    ids.append(t)


def test_the_prefix_cache_gives_the_tokens_of_a_full_prefill(engine):
  before = engine.stats()
  first, = run(engine, EngineRequest(PROMPT, 6))
  longer = PROMPT[:64] + tuple(int(t) for t in RNG.randint(0, 256, 10))
  second, again = run(engine, EngineRequest(longer, 6)), run(engine, EngineRequest(PROMPT, 6))
  assert tokens_of(first) == hf_generate(PROMPT, 6) and tokens_of(again[0]) == tokens_of(first)
  assert tokens_of(second[0]) == hf_generate(longer, 6)
  assert first[-1].cached_tokens == 0
  assert second[0][-1].cached_tokens == len(longer) - 16  # 64 cached; the last 16 (a bucket) computed
  assert again[0][-1].cached_tokens == len(PROMPT) - 16
  penalised = run(engine, EngineRequest(longer, 6, processing=Processing(repetition_penalty=1.8)))[0]
  assert penalised[-1].cached_tokens > 0  # the prompt's tokens still count for the penalty
  assert tokens_of(penalised) == hf_generate(longer, 6, repetition_penalty=1.8) != tokens_of(second[0])
  after = engine.stats()
  assert after.prefix_hits - before.prefix_hits == 3 and after.prefix_queries - before.prefix_queries == 4


def test_requests_with_one_prompt_share_its_prefill(engine):
  prompt = tuple(int(t) for t in RNG.randint(0, 256, 40))
  results = run(engine, *(EngineRequest(prompt, 5, SamplingParams(1.0), seed=s) for s in (1, 2, 3)))
  cached = sorted(events[-1].cached_tokens for events in results)
  assert cached == [0, len(prompt) - 16, len(prompt) - 16]
  alone = [tokens_of(run(engine, EngineRequest(prompt, 5, SamplingParams(1.0), seed=s, echo=True))[0])
           for s in (1, 2, 3)]  # echo: never from the cache
  assert [tokens_of(e) for e in results] == alone and len({tuple(t) for t in alone}) > 1


@pytest.mark.parametrize("field, request_kwargs", [
    ("presence_penalty", dict(processing=Processing(presence_penalty=2.5))),
    ("repetition_penalty", dict(processing=Processing(repetition_penalty=0.0))),
    ("logit_bias", dict(processing=Processing(logit_bias=((256, 1.0),)))),
    ("logit_bias", dict(processing=Processing(logit_bias=((3, 101.0),)))),
    ("logprobs", dict(logprobs=21)),
    ("grammar", dict(grammar=object())),
])
def test_bad_values_name_their_field(engine, field, request_kwargs):
  with pytest.raises(ServingError) as error:
    engine.check(EngineRequest((1, 2, 3), 4, **request_kwargs))
  assert error.value.field == field


def test_only_requests_that_can_reuse_a_prefix_wait_for_it():
  """A prompt sharing whole blocks with one being prefilled this round waits a round (then it reuses them),
  unless it could not: echo scores every position, and a rest beyond the longest extend is prefilled whole."""
  from types import SimpleNamespace
  from qwen_logical.serving.admission import plan_round
  from qwen_logical.serving.prefix_cache import PrefixCache
  from qwen_logical.serving.scheduler import Pending
  from qwen_logical.serving.shapes import EXTEND_LIMIT
  shapes = SimpleNamespace(extend_bucket=lambda n: 16 if n <= 16 else 64 if n <= EXTEND_LIMIT else None,
                           bucket=lambda n: 64 if n <= 64 else 1024, prefill_rows=1)
  shared = PROMPT[:48]
  pending = lambda i, tokens, **kw: Pending(i, EngineRequest(tokens, 4, **kw), print)
  waiting = [pending(0, shared + (1, 2)), pending(1, shared + (3, 4)), pending(2, shared + (5,), echo=True),
             pending(3, shared + tuple(range(300)))]
  hits, prefills = plan_round(waiting, [0, 1, 2, 3], PrefixCache(4, 1000), shapes)
  admitted = sorted(p.rid for call in prefills for p in call.requests)
  assert not hits and admitted == [0, 2, 3]  # request 1 waits for request 0's keys
