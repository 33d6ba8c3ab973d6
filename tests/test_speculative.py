"""Speculative decoding is exact: greedy output is token for token plain greedy decoding's (every mesh
and table, prompt lookup and a draft model, rows accepting different counts and stopping mid-round),
and sampled output is distributed as the target's sampler draws (against exact probabilities)."""

import functools

import numpy as np
import pytest
import torch

from conftest import mesh_of
from hf_reference import copying_model, hf_logits, hf_tensors, model_config, tiny_hf_model, walk_successors
from qwen_logical.checkpoints.hf_names import flax_from_hf
from qwen_logical.inference.generate import Generator
from qwen_logical.inference.speculative import DraftModel, Speculation, SpeculationError
from qwen_logical.inference.speculative_accept import sampler_probs
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import get_table

NEW = 21
COMBINATIONS = [("1x1", "tensor_parallel"), ("1x8", "tensor_parallel"), ("2x4", "tp_fsdp"), ("4x2", "fsdp"),
                ("8x1", "data_parallel")]


def _walk(start: int, length: int, seed: int = 3) -> list[int]:
  successors, out = walk_successors(256, seed), [start]
  while len(out) < length:
    out.append(int(successors[out[-1]]))
  return out


# Rows 0-2 end on a stretch of the walk they saw earlier (prompt lookup drafts from it); row 3 has none.
PROMPTS = [_walk(a, 20) + np.random.RandomState(r).randint(0, 256, 3).tolist() + _walk(a, 3)
           for r, a in enumerate((5, 77, 140))] + [np.random.RandomState(9).randint(0, 256, 11).tolist()]


@functools.lru_cache(maxsize=None)
def model(mesh, table, seed=3, draft=False):
  hf = copying_model(seed=seed, pull=1.2)  # logit std ~17, maxima ~100; follows the walk most steps
  if draft:  # a weaker model of the same walk: its layers at half scale
    with torch.no_grad():
      for p in hf.model.layers.parameters():
        p.mul_(0.5)
  cfg = model_config(hf, scan_layers=table == "fsdp")
  part = Partitioner(cfg, mesh_of(mesh), get_table(table))
  return part, part.place(flax_from_hf(hf_tensors(hf), cfg, part.layout))


@functools.lru_cache(maxsize=None)
def plain():
  part, params = model("1x1", "tensor_parallel")
  tokens = Generator(part, decode_steps=1).generate(params, PROMPTS, max_new_tokens=NEW).tokens
  stops = (tokens[1][6],)  # row 1 stops mid-round; the others run to the length
  result = Generator(part, decode_steps=1).generate(params, PROMPTS, max_new_tokens=NEW, stop_ids=stops)
  return stops, result.tokens, result.finish_reasons


@pytest.mark.parametrize("mesh,table", COMBINATIONS)
def test_prompt_lookup_gives_plain_greedy_tokens_on_every_mesh(mesh, table):
  stops, tokens, reasons = plain()
  assert reasons[1] == "stop" and "length" in reasons and len(set(tokens[3])) > 8
  part, params = model(mesh, table)
  spec = Speculation("prompt_lookup", num_tokens=3, ngram=2)
  result = Generator(part, decode_steps=3, speculation=spec).generate(params, PROMPTS, max_new_tokens=NEW,
                                                                       stop_ids=stops)
  assert result.tokens == tokens and result.finish_reasons == reasons, (mesh, table)
  t = result.timings
  assert 0.3 < t.acceptance_rate < 1 and t.tokens_per_round > 1.4  # rows accept different counts


@pytest.mark.parametrize("mesh,table,draft_table", [("1x1", "tensor_parallel", "tensor_parallel"),
                                                     ("2x4", "tp_fsdp", "tensor_parallel")])
def test_draft_model_gives_plain_greedy_tokens(mesh, table, draft_table):
  """The draft is another model of the same vocabulary, under its own rule table."""
  stops, tokens, reasons = plain()
  part, params = model(mesh, table)
  draft_part, draft_params = model(mesh, draft_table, draft=True)
  spec = Speculation("draft", num_tokens=3, draft=DraftModel(draft_part, draft_params))
  result = Generator(part, decode_steps=2, speculation=spec).generate(params, PROMPTS, max_new_tokens=NEW,
                                                                       stop_ids=stops)
  assert result.tokens == tokens and result.finish_reasons == reasons
  assert 0.1 < result.timings.acceptance_rate < 1


# --- sampling: the distribution of the tokens after the first, against exact probabilities ---------
VOCAB, DRAWS = 12, 1024


@functools.lru_cache(maxsize=None)
def tiny(layer_scale=1.0):
  hf = tiny_hf_model(hidden=16, layers=1, vocab=VOCAB, seed=0)
  with torch.no_grad():
    hf.lm_head.weight.mul_(8.0)  # peaked enough that drafts are often right, often wrong
    for p in hf.model.layers.parameters():
      p.mul_(layer_scale)  # the draft: the same model with its layer at another scale
  cfg = model_config(hf)
  part = Partitioner(cfg, mesh_of("1x1"), get_table("tensor_parallel"))
  return hf, part, part.place(flax_from_hf(hf_tensors(hf), cfg, part.layout))


def exact_second_and_third(hf, prompt, temperature, top_k):
  """P(token 1), P(token 2) of the sampler, enumerating tokens 0 and 1 (float64 sums)."""
  probs = lambda rows: np.asarray(sampler_probs(
      hf_logits(hf, rows)[:, -1], np.full(len(rows), temperature, np.float32),
      np.full(len(rows), top_k, np.int32), np.ones(len(rows), np.float32), "filtered"), np.float64)
  p0 = probs([prompt])[0]
  p1 = probs([prompt + [a] for a in range(VOCAB)])  # [t0, t1]
  p2 = probs([prompt + [a, b] for a in range(VOCAB) for b in range(VOCAB)]).reshape(VOCAB, VOCAB, VOCAB)
  first = p0 @ p1
  second = np.einsum("a,ab,abc->c", p0, p1, p2)
  return first, second


@pytest.mark.parametrize("method", ["prompt_lookup", "draft"])
def test_speculative_sampling_keeps_the_target_distribution(method):
  hf, part, params = tiny()
  prompt = [3, 7, 1, 3, 7, 5, 1, 3]
  temperature, top_k = 0.9, 6
  draft = DraftModel(*tiny(0.9)[1:]) if method == "draft" else None
  spec = Speculation(method, num_tokens=2, ngram=1, draft=draft)
  result = Generator(part, decode_steps=2, speculation=spec).generate(
      params, [prompt] * DRAWS, max_new_tokens=3, temperature=temperature, top_k=top_k, seed=11)
  assert 0.2 < result.timings.acceptance_rate < 0.95  # drafts are both kept and rejected
  tokens = np.array(result.tokens)
  for position, exact in zip((1, 2), exact_second_and_third(hf, prompt, temperature, top_k)):
    seen = np.bincount(tokens[:, position], minlength=VOCAB)
    expected = DRAWS * exact
    assert np.all(seen[exact == 0] == 0), (position, seen, expected)  # never outside top-k's support
    kept = expected > 0
    chi2 = float(np.sum((seen[kept] - expected[kept]) ** 2 / expected[kept]))
    # chi-square with at most 11 degrees of freedom: P(chi2 > 40) < 1e-4 for a correct sampler
    assert chi2 < 40, (position, chi2, seen, np.round(expected))


def test_bad_settings_are_named():
  with pytest.raises(SpeculationError, match="method='ngram'.*prompt_lookup"):
    Speculation("ngram")
  with pytest.raises(SpeculationError, match="num_tokens=0"):
    Speculation("prompt_lookup", num_tokens=0)
  with pytest.raises(SpeculationError, match="needs a draft model"):
    Speculation("draft")
  part, _ = model("1x1", "tensor_parallel")
  other, other_params = model("2x4", "tp_fsdp", seed=4)
  with pytest.raises(SpeculationError, match="same mesh"):
    Generator(part, speculation=Speculation("draft", draft=DraftModel(other, other_params)))
