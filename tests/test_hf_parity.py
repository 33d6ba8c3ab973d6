"""Logits equal HF transformers' Qwen2ForCausalLM (torch, float32) given the same weights."""

import functools

import jax
import numpy as np
import pytest

from conftest import mesh_of
from hf_reference import hf_logits, hf_tensors, model_config, tiny_hf_model
from qwen_logical.checkpoints.hf_names import flax_from_hf, hf_from_flax
from qwen_logical.inference import kv_cache
from qwen_logical.model.model import Mode, ModelCallError
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import get_table

TOLERANCE = 1e-4


def _tokens(vocab, shape, seed=1):
  return np.random.RandomState(seed).randint(0, vocab, shape)


@pytest.mark.parametrize("heads,kv_heads,tied,scan", [
    (4, 4, False, True),   # multi-head (group size 1)
    (4, 2, True, False),   # group 2, tied embeddings
    (8, 2, False, False),  # group 4
    (6, 1, True, True),    # multi-query (group 6), tied
    (14, 2, False, True),  # 0.5B/7B-like group of 7
])
def test_logits_match_transformers(heads, kv_heads, tied, scan):
  hf = tiny_hf_model(heads=heads, kv_heads=kv_heads, tied=tied, hidden=heads * 8)
  cfg = model_config(hf, scan_layers=scan)
  part = Partitioner(cfg, mesh_of("1x1"), get_table("tensor_parallel"))
  params = part.place(flax_from_hf(hf_tensors(hf), cfg, part.layout))
  tokens = _tokens(cfg.vocab_size, (2, 11))
  expected = hf_logits(hf, tokens)
  got = np.asarray(part.forward(params, tokens))
  assert expected.std() > 0.5, "reference logits too flat to make the comparison meaningful"
  np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("mesh", ["1x8", "2x4"])
def test_head_plan_matches_transformers_on_tensor_parallel(mesh):
  """14 query / 2 KV heads split 8 (and 4) ways by padding and KV repetition, exact vs HF."""
  hf = tiny_hf_model(heads=14, kv_heads=2, hidden=112)
  cfg = model_config(hf)
  part = Partitioner(cfg, mesh_of(mesh), get_table("tensor_parallel"))
  assert not part.layout.is_identity
  params = part.place(flax_from_hf(hf_tensors(hf), cfg, part.layout))
  tokens = _tokens(cfg.vocab_size, (8, 9))
  np.testing.assert_allclose(np.asarray(part.forward(params, tokens)), hf_logits(hf, tokens),
                             atol=TOLERANCE, rtol=0)


def test_left_padded_batch_matches_transformers():
  """Positions come from the attention mask: a left-padded row equals HF on its real tokens."""
  hf = tiny_hf_model(heads=4, kv_heads=2)
  cfg = model_config(hf)
  part = Partitioner(cfg, mesh_of("1x1"), get_table("tensor_parallel"))
  params = part.place(flax_from_hf(hf_tensors(hf), cfg, part.layout))
  tokens = _tokens(cfg.vocab_size, (2, 10))
  mask = np.ones_like(tokens)
  mask[1, :4] = 0
  expected = hf_logits(hf, tokens, mask)
  got = np.asarray(part.forward(params, tokens, mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], expected[real], atol=TOLERANCE, rtol=0)
  alone = np.asarray(part.forward(params, tokens[1:, 4:]))[0]
  np.testing.assert_allclose(got[1, 4:], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mesh", ["1x8", "4x2"])
def test_hf_conversion_round_trip_undoes_head_plan(mesh):
  hf = tiny_hf_model(heads=14, kv_heads=2, hidden=112, tied=False)
  cfg = model_config(hf)
  part = Partitioner(cfg, mesh_of(mesh), get_table("tensor_parallel"))
  tensors = hf_tensors(hf)
  back = hf_from_flax(part.place(flax_from_hf(tensors, cfg, part.layout)), cfg, part.layout)
  assert set(back) == set(tensors)
  for name, value in tensors.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.parametrize("scan", [True, False])
def test_modes_and_last_token_trim_match_transformers(scan):
  """FORWARD trimmed to the last token, PREFILL (trimmed) into a cache and DECODE token by token
  all give HF's logits at those positions; the trim leaves the cache as the untrimmed prefill does."""
  hf = tiny_hf_model(heads=4, kv_heads=2, layers=3)
  cfg = model_config(hf, scan_layers=scan)
  part = Partitioner(cfg, mesh_of("1x1"), get_table("tensor_parallel"))
  params = part.place(flax_from_hf(hf_tensors(hf), cfg, part.layout))
  tokens = _tokens(cfg.vocab_size, (2, 12))
  expected = hf_logits(hf, tokens)

  @functools.partial(jax.jit, static_argnames=("mode", "last_token_only"))
  def run(params, tokens, mask, cache, cache_index, mode, last_token_only):
    with part.bound():
      return part.model.apply({"params": params}, tokens, mask, mode=mode, cache=cache,
                              cache_index=cache_index, last_token_only=last_token_only)

  def apply(tokens, mask=None, mode=Mode.FORWARD, cache=None, cache_index=None, last_token_only=False):
    return run(params, tokens, mask, cache, cache_index, mode, last_token_only)

  last = apply(tokens, last_token_only=True)
  assert last.shape == (2, 1, cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(last), expected[:, -1:], atol=TOLERANCE, rtol=0)

  empty = kv_cache.cache_shapes(cfg, part.layout, 2, 16)
  empty = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), empty)
  slots = np.ones((2, 16), np.int32)
  logits, cache = apply(tokens[:, :9], slots, mode=Mode.PREFILL, cache=empty, last_token_only=True)
  np.testing.assert_allclose(np.asarray(logits), expected[:, 8:9], atol=TOLERANCE, rtol=0)
  full, untrimmed = apply(tokens[:, :9], slots, mode=Mode.PREFILL, cache=empty)
  np.testing.assert_allclose(np.asarray(full), expected[:, :9], atol=TOLERANCE, rtol=0)
  for a, b in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(untrimmed)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
  for t in range(9, 12):
    logits, cache = apply(tokens[:, t:t + 1], slots, mode=Mode.DECODE, cache=cache, cache_index=t)
    np.testing.assert_allclose(np.asarray(logits), expected[:, t:t + 1], atol=TOLERANCE, rtol=0)


def test_a_call_that_does_not_fit_its_mode_is_refused():
  cfg = model_config(tiny_hf_model())
  part = Partitioner(cfg, mesh_of("1x1"), get_table("tensor_parallel"))
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), part.param_shapes)
  tokens = np.zeros((1, 4), np.int32)
  cache = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                 kv_cache.cache_shapes(cfg, part.layout, 1, 8))
  mask = np.ones((1, 8), np.int32)
  for kwargs, message in [(dict(cache=cache), "FORWARD takes no cache"),
                          (dict(mode=Mode.PREFILL), "needs cache="),
                          (dict(mode=Mode.DECODE, cache=cache), "needs cache_index"),
                          (dict(mode=Mode.PREFILL, cache=cache, cache_index=2), "pass no cache_index")]:
    with pytest.raises(ModelCallError, match=message):
      part.model.apply({"params": params}, tokens, mask, **kwargs)
