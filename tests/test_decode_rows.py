"""DECODE with a slot per row (cache_index int[B]) against the scalar form, each row decoded alone and
transformers; the row-wise sampler: a row's draw depends on its (seed, step, logits) only."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import mesh_of
from hf_reference import hf_logits, hf_tensors, model_config, real_looking_model
from qwen_logical.checkpoints.hf_names import flax_from_hf
from qwen_logical.inference import kv_cache
from qwen_logical.inference.sampling import (FILTERED, GREEDY, SAMPLE, SamplingParams, kind_of, request_keys,
                                             row_keys, row_values, sample_rows)
from qwen_logical.model.model import Mode
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import get_table

SLOTS = 32
LENGTHS = (5, 11, 8, 14)  # each row's prompt, at slots [0, n) of its cache row
PROMPTS = [np.random.RandomState(40 + r).randint(1, 256, n).tolist() for r, n in enumerate(LENGTHS)]


@functools.lru_cache(maxsize=None)
def hf_model():
  return real_looking_model(seed=2)


@functools.lru_cache(maxsize=None)
def setup(mesh, scan):
  cfg = model_config(hf_model(), scan_layers=scan)
  part = Partitioner(cfg, mesh_of(mesh), get_table("tensor_parallel"))
  return part, part.place(flax_from_hf(hf_tensors(hf_model()), cfg, part.layout))


@functools.lru_cache(maxsize=None)
def _program(part, mode):
  def run(params, tokens, mask, cache, index, positions):
    with part.bound():
      logits, cache = part.model.apply({"params": params}, tokens, mask, positions, mode=mode, cache=cache,
                                       cache_index=index, last_token_only=True)
      return logits[:, -1], cache

  return jax.jit(run)


def _apply(part, params, tokens, mask, mode, cache, index=None, positions=None):
  """The model in `mode` under the partitioner's rules; (logits of the last position f32[B, V], cache)."""
  return _program(part, mode)(params, tokens, mask, cache, index, positions)


def _zeros(part, batch):
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                kv_cache.cache_shapes(part.config, part.layout, batch, SLOTS))


def _batch_axis(leaf):
  return leaf.ndim - 4  # [.., B, K, S, D]


def _row(cache, r):
  return jax.tree_util.tree_map(lambda a: jax.lax.slice_in_dim(a, r, r + 1, axis=_batch_axis(a)), cache)


@pytest.mark.parametrize("mesh,scan", [("1x1", False), ("1x1", True)])
def test_rows_at_their_own_slots_equal_each_row_alone_and_transformers(mesh, scan):
  part, params = setup(mesh, scan)
  # Right-padded prompts: row r holds its prompt at slots [0, n_r); what follows is overwritten or masked.
  tokens = np.array([p + [0] * (max(LENGTHS) - len(p)) for p in PROMPTS], np.int32)
  mask = np.ones((len(PROMPTS), SLOTS), np.int32)
  _, cache = _apply(part, params, tokens, mask, Mode.PREFILL, _zeros(part, len(PROMPTS)))
  alone = [(None, _row(cache, r)) for r in range(len(PROMPTS))]
  index = np.array(LENGTHS, np.int32)
  token = np.array([7, 200, 31, 96], np.int32)
  seqs = [list(p) for p in PROMPTS]
  for step in range(2):  # the second step reads what the first wrote at each row's own slot
    logits, cache = _apply(part, params, token[:, None], mask, Mode.DECODE, cache, index + step)
    explicit, _ = _apply(part, params, token[:, None], mask, Mode.DECODE,
                         jax.tree_util.tree_map(jnp.copy, cache), index + step, (index + step)[:, None])
    np.testing.assert_allclose(np.asarray(explicit), np.asarray(logits), atol=1e-6, rtol=0)
    for r in range(len(PROMPTS)):
      seqs[r].append(int(token[r]))
      alone[r] = _apply(part, params, token[r:r + 1, None], mask[:1], Mode.DECODE, alone[r][1],
                        np.int32(LENGTHS[r] + step))
      np.testing.assert_allclose(np.asarray(logits[r]), np.asarray(alone[r][0][0]), atol=2e-4, rtol=0)
      np.testing.assert_allclose(np.asarray(logits[r]), hf_logits(hf_model(), [seqs[r]])[0, -1], atol=2e-3, rtol=0)
      for rows, one in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(alone[r][1])):
        filled = len(seqs[r])  # slots [0, filled) hold this row's tokens
        np.testing.assert_allclose(np.take(np.asarray(rows), r, axis=_batch_axis(rows))[..., :filled, :],
                                   np.take(np.asarray(one), 0, axis=_batch_axis(one))[..., :filled, :],
                                   atol=1e-5, rtol=0)
    token = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)
  assert np.std(np.asarray(logits)) >= 3  # real-looking logits


def test_one_slot_for_every_row_equals_the_scalar_index():
  part, params = setup("1x1", False)
  width = max(LENGTHS)
  tokens = np.array([[0] * (width - len(p)) + p for p in PROMPTS], np.int32)
  mask = np.ones((len(PROMPTS), SLOTS), np.int32)
  mask[:, :width] = tokens != 0
  logits, cache = _apply(part, params, tokens, mask, Mode.PREFILL, _zeros(part, len(PROMPTS)))
  token = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)[:, None]
  scalar, scalar_cache = _apply(part, params, token, mask, Mode.DECODE, jax.tree_util.tree_map(jnp.copy, cache),
                                np.int32(width))
  rows, rows_cache = _apply(part, params, token, mask, Mode.DECODE, cache, np.full(len(PROMPTS), width, np.int32))
  np.testing.assert_array_equal(np.asarray(rows), np.asarray(scalar))
  for a, b in zip(jax.tree_util.tree_leaves(rows_cache), jax.tree_util.tree_leaves(scalar_cache)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Left padding: positions come from each row's mask, as transformers' left-padded batch has them.
  for r, p in enumerate(PROMPTS):
    np.testing.assert_allclose(np.asarray(rows[r]), hf_logits(hf_model(), [p + [int(token[r, 0])]])[0, -1],
                               atol=2e-3, rtol=0)


# --- the row-wise sampler -----------------------------------------------------------------------

def _logits(rows, vocab=256, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(rows, vocab), jnp.float32)


@functools.partial(jax.jit, static_argnums=(6,))
def _sample(logits, seeds, steps, temperature, top_k, top_p, kind):
  return sample_rows(logits, request_keys(seeds, steps), temperature, top_k, top_p, kind)


def _draw(logits, seeds, steps, settings, kind):
  seeds, steps = np.asarray(seeds, np.uint32), np.asarray(steps, np.int32)
  return np.asarray(_sample(logits, seeds, steps, *row_values(settings), kind))


def test_a_rows_draw_depends_on_its_seed_step_and_logits_only():
  logits = _logits(6)
  settings = [SamplingParams(1.0), SamplingParams(0.7, top_k=5), SamplingParams(0.0), SamplingParams(1.3),
              SamplingParams(0.9, top_p=0.8), SamplingParams(2.0)]
  seeds, steps = np.array([3, 4, 5, 6, 7, 8]), np.array([0, 1, 2, 3, 4, 5])
  batched = _draw(logits, seeds, steps, settings, kind_of(settings))
  assert kind_of(settings) == FILTERED and kind_of(settings[:1]) == SAMPLE and kind_of(settings[2:3]) == GREEDY
  for r in range(6):  # alone, with the cheapest kind that serves the row
    assert _draw(logits[r:r + 1], seeds[r:r + 1], steps[r:r + 1], settings[r:r + 1], settings[r].kind)[0] == batched[r]
  order = np.array([5, 3, 0, 1, 4, 2])  # other slots, other neighbours
  shuffled = _draw(logits[order], seeds[order], steps[order], [settings[i] for i in order], FILTERED)
  assert shuffled.tolist() == batched[order].tolist()
  # Rows without top-k/top-p draw the same whether the batch sorts (FILTERED) or not (SAMPLE).
  unfiltered = [r for r, s in enumerate(settings) if not s.filtered]
  assert _draw(logits, seeds, steps, settings, SAMPLE)[unfiltered].tolist() == batched[unfiltered].tolist()
  assert batched[2] == int(np.argmax(logits[2]))  # greedy row
  # A request's key is row 0's key of `generate` with the same seed: alone it draws what generate draws.
  key = row_keys(jax.random.key(np.uint32(3)), jnp.arange(1), 0)
  assert int(sample_rows(logits[:1], key, *row_values(settings[:1]), SAMPLE)[0]) == batched[0]
  # ... and the draws do depend on the seed and on the step.
  same = lambda seeds, steps: set(_draw(logits[:1].repeat(6, 0), seeds, steps, settings[:1] * 6, SAMPLE).tolist())
  assert len(same(np.arange(6), np.zeros(6))) > 2 and len(same(np.zeros(6), np.arange(6))) > 2


def test_mixed_settings_in_one_batch_draw_from_their_own_distributions():
  probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
  groups = [(SamplingParams(1.0), probs), (SamplingParams(1.0, top_k=2), [0.625, 0.375, 0, 0]),
            (SamplingParams(1.0, top_p=0.85), [0.5 / .95, 0.3 / .95, 0.15 / .95, 0]),
            (SamplingParams(0.0), [1, 0, 0, 0])]
  n = 3000
  settings = [g for g, _ in groups] * n
  logits = jnp.asarray(np.log(probs)[None].repeat(len(settings), 0))
  drawn = _draw(logits, np.arange(len(settings)), np.zeros(len(settings)), settings, FILTERED)
  for g, (_, expected) in enumerate(groups):
    freq = np.bincount(drawn[g::len(groups)], minlength=4) / n
    np.testing.assert_allclose(freq, expected, atol=0.03)
