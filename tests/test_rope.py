"""Rotary embeddings (model/rope.py) against transformers: inv_freq and attention factor of the default RoPE
and YaRN as its Qwen2 / Qwen3 rotary embedding computes them, the rotation of q and k beyond the original
context, and parsing of both HF config shapes (old `rope_scaling`, transformers-5 `rope_parameters`).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen3Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from qwen_logical.common.errors import QwenLogicalError
from qwen_logical.model.rope import RopeError, parse_rope_scaling, rope_frequencies, rotary_embedding

TINY = dict(vocab_size=16, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)  # head_dim 16
QWEN25_7B = dict(vocab_size=16, hidden_size=3584, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6)

# name: (model_type, config.json dict)
CASES = {
    "qwen2.5 yarn x4 (long-context recipe)": ("qwen2", dict(QWEN25_7B, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})),
    "tiny yarn x2 from 64": ("qwen2", dict(TINY, max_position_embeddings=128, rope_theta=10000.0, rope_scaling={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64})),
    "mscale / mscale_all_dim": ("qwen2", dict(TINY, head_dim=64, max_position_embeddings=4096, rope_theta=1e6,
                                              rope_scaling={"type": "yarn", "factor": 8, "mscale": 1.0,
                                                            "mscale_all_dim": 0.707,
                                                            "original_max_position_embeddings": 512})),
    "attention_factor and betas": ("qwen2", dict(TINY, max_position_embeddings=512, rope_theta=50000.0, rope_scaling={
        "type": "yarn", "factor": 3.0, "attention_factor": 1.25, "beta_fast": 16, "beta_slow": 2,
        "original_max_position_embeddings": 100})),
    "truncate false": ("qwen2", dict(TINY, max_position_embeddings=256, rope_theta=10000.0, rope_scaling={
        "type": "yarn", "factor": 2.0, "truncate": False, "original_max_position_embeddings": 64})),
    "qwen3 rope_parameters yarn": ("qwen3", dict(TINY, head_dim=128, max_position_embeddings=40960,
                                                 rope_parameters={"rope_type": "yarn", "rope_theta": 1e6,
                                                                  "factor": 4.0,
                                                                  "original_max_position_embeddings": 32768})),
    "original absent -> max_position_embeddings": ("qwen2", dict(TINY, max_position_embeddings=200, rope_scaling={
        "type": "yarn", "factor": 2.0})),
    "factor null -> max / original": ("qwen2", dict(TINY, max_position_embeddings=256, rope_scaling={
        "type": "yarn", "factor": None, "original_max_position_embeddings": 64})),
    "top-level original wins": ("qwen2", dict(TINY, max_position_embeddings=256, original_max_position_embeddings=32,
                                              rope_scaling={"type": "yarn", "factor": 2.0,
                                                            "original_max_position_embeddings": 64})),
    "zero-width ramp (original 4)": ("qwen2", dict(TINY, max_position_embeddings=8, rope_theta=10000.0,
                                                   rope_scaling={"type": "yarn", "factor": 2.0,
                                                                 "original_max_position_embeddings": 4})),
    "qwen2 default": ("qwen2", dict(QWEN25_7B)),
    "qwen3 rope_parameters default": ("qwen3", dict(TINY, head_dim=128, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6})),
}


def hf_rotary(model_type: str, hf: dict):
  """transformers' rotary embedding module for config.json dict `hf` (a copy: transformers edits its rope dict)."""
  hf = copy.deepcopy(hf)
  if model_type == "qwen2":
    return Qwen2RotaryEmbedding(Qwen2Config(**hf))
  return Qwen3RotaryEmbedding(Qwen3Config(**hf))


def ours(hf: dict):
  """(inv_freq, attention factor) through parse_rope_scaling and rope_frequencies, as hf_config reads `hf`."""
  theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
  head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
  max_positions = hf.get("max_position_embeddings", 32768)
  return rope_frequencies(head_dim, theta, parse_rope_scaling(hf, "config.json"), max_positions)


@pytest.mark.parametrize("name", CASES)
def test_frequencies_match_transformers(name):
  model_type, hf = CASES[name]
  reference = hf_rotary(model_type, hf)
  inv_freq, factor = ours(hf)
  expected = reference.inv_freq.numpy()
  assert inv_freq.dtype == np.float32 and inv_freq.shape == expected.shape
  # transformers' float32 pow (vectorised) is within 1 ulp of the correctly rounded one used here
  np.testing.assert_array_max_ulp(inv_freq, expected, maxulp=1)
  assert np.mean(inv_freq == expected) >= 0.9, (inv_freq, expected)
  assert factor == reference.attention_scaling
  if "default" not in name:  # the case really scales: not the default frequencies
    default, _ = rope_frequencies(len(inv_freq) * 2, 1e6 if "qwen" in name else 1e4, (), 1)
    assert not np.allclose(inv_freq, default)


def test_attention_factors_are_the_yarn_ones():
  assert ours(CASES["tiny yarn x2 from 64"][1])[1] == pytest.approx(1 + 0.1 * np.log(2))
  assert ours(CASES["attention_factor and betas"][1])[1] == 1.25
  assert ours(CASES["mscale / mscale_all_dim"][1])[1] == pytest.approx((1 + 0.1 * np.log(8)) /
                                                                         (1 + 0.0707 * np.log(8)))
  assert ours(CASES["qwen2 default"][1])[1] == 1.0


def torch_rotation(model_type, hf, q, k, positions):
  """transformers' apply_rotary_pos_emb of q, k [B, L, N, D] at positions [B, L] -> numpy [B, L, N, D]."""
  q_t, k_t = (torch.from_numpy(np.asarray(a)).transpose(1, 2) for a in (q, k))
  cos, sin = hf_rotary(model_type, hf)(q_t, torch.from_numpy(np.asarray(positions)))
  q_out, k_out = apply_rotary_pos_emb(q_t, k_t, cos, sin)
  return q_out.transpose(1, 2).numpy(), k_out.transpose(1, 2).numpy()


@pytest.mark.parametrize("name", ["tiny yarn x2 from 64", "mscale / mscale_all_dim", "attention_factor and betas",
                                  "qwen3 rope_parameters yarn", "qwen2 default"])
def test_rotation_matches_transformers_beyond_the_original_context(name):
  model_type, hf = CASES[name]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, 141, 3, head_dim), dtype=np.float32)
  k = rng.standard_normal((2, 141, 2, head_dim), dtype=np.float32)
  positions = np.stack([np.arange(60, 201), np.arange(60, 201)[::-1] + 7]).astype(np.int32)  # past 64
  expected_q, expected_k = torch_rotation(model_type, hf, q, k, positions.astype(np.int64))
  inv_freq, factor = ours(hf)
  rotate = jax.jit(rotary_embedding, static_argnums=(3,))
  for x, expected in ((q, expected_q), (k, expected_k)):
    got = np.asarray(rotate(jnp.asarray(x), jnp.asarray(positions), inv_freq, factor))
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    # transformers' own inv_freq too: the rotation alone, apart from the frequencies
    got = np.asarray(rotate(jnp.asarray(x), jnp.asarray(positions), hf_rotary(model_type, hf).inv_freq.numpy(),
                            factor))
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
  assert np.abs(expected_q - q).max() > 0.5  # the positions really rotate


def previous_rotary_embedding(x, positions, theta):
  """layers.rotary_embedding before YaRN (default RoPE only), the reference for bit-identity."""
  dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  first, second = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return x * cos + rotated * sin


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_default_rotation_is_bit_identical_to_the_previous_one(dtype):
  theta, dim = 1e6, 64
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 9, 3, dim), dtype=np.float32), dtype)
  positions = jnp.asarray(rng.integers(0, 40000, (2, 9)), jnp.int32)
  old_inv_freq = np.asarray(jax.jit(lambda: 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)))())
  inv_freq, factor = rope_frequencies(dim, theta, (), 32768)
  assert factor == 1.0
  np.testing.assert_array_max_ulp(inv_freq, old_inv_freq, maxulp=1)
  new = jax.jit(rotary_embedding, static_argnums=(3,))(x, positions, old_inv_freq, factor)
  old = jax.jit(previous_rotary_embedding, static_argnums=(2,))(x, positions, theta)
  assert new.dtype == dtype
  np.testing.assert_array_equal(np.asarray(new, np.float32), np.asarray(old, np.float32))


YARN_X4 = (("beta_fast", 32.0), ("beta_slow", 1.0), ("factor", 4.0), ("original_max_position_embeddings", 32768),
           ("rope_type", "yarn"), ("truncate", True))


def test_parse_both_config_shapes():
  old = {"rope_theta": 1e6, "max_position_embeddings": 32768,
         "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
  new = {"max_position_embeddings": 32768, "rope_parameters": {
      "rope_type": "yarn", "rope_theta": 1e6, "factor": 4, "original_max_position_embeddings": 32768}}
  assert parse_rope_scaling(old, "a") == YARN_X4
  assert parse_rope_scaling(new, "b") == YARN_X4
  assert hash(parse_rope_scaling(new, "b")) == hash(YARN_X4)
  given = {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "mscale": 0.5, "mscale_all_dim": 1.0,
                            "attention_factor": 1.1, "beta_fast": 8, "truncate": False, "rope_theta": 5.0}}
  assert dict(parse_rope_scaling(given, "c")) == {
      "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32768, "beta_fast": 8.0,
      "beta_slow": 1.0, "truncate": False, "mscale": 0.5, "mscale_all_dim": 1.0, "attention_factor": 1.1}
  # old shape wins over rope_parameters (as transformers); rope_type over the legacy type
  both = {"rope_scaling": {"type": "linear", "rope_type": "yarn", "factor": 4.0,
                           "original_max_position_embeddings": 32768}, "rope_parameters": {"rope_type": "default"}}
  assert parse_rope_scaling(both, "d") == YARN_X4


def test_parsed_items_round_trip_as_a_transformers_rope_scaling():
  for name, (model_type, hf) in CASES.items():
    items = parse_rope_scaling(hf, name)
    if not items:
      continue
    again = dict(hf, rope_scaling=dict(items))
    again.pop("rope_parameters", None)
    again.pop("original_max_position_embeddings", None)
    assert parse_rope_scaling(again, name) == items
    again["rope_theta"] = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    np.testing.assert_array_equal(hf_rotary(model_type, again).inv_freq, hf_rotary(model_type, hf).inv_freq)


@pytest.mark.parametrize("hf", [{}, {"rope_theta": 1e6}, {"rope_scaling": None}, {"rope_scaling": {}},
                                {"rope_scaling": {"type": "default"}},
                                {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}])
def test_default_parses_to_empty(hf):
  assert parse_rope_scaling(hf, "config.json") == ()


@pytest.mark.parametrize("hf", [{"rope_scaling": {"type": "linear", "factor": 2.0}},
                                {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
                                {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
                                {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0]}}])
def test_other_scalings_are_refused(hf):
  with pytest.raises(RopeError) as info:
    parse_rope_scaling(hf, "ckpt/config.json")
  message = str(info.value)
  rope_type = (hf.get("rope_scaling") or hf.get("rope_parameters")).get("rope_type") or hf["rope_scaling"]["type"]
  assert "ckpt/config.json" in message and repr(rope_type) in message
  assert "supported: default, yarn" in message and "remove rope_scaling" in message
  assert isinstance(info.value, QwenLogicalError)


@pytest.mark.parametrize("scaling, field", [
    ({"type": "yarn", "original_max_position_embeddings": 64}, "'factor'"),
    ({"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}, "factor=0.5"),
    ({"type": "yarn", "factor": "4"}, "factor='4'"),
    ({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),
    ({"type": "yarn", "factor": 2.0, "attention_factor": -1.0}, "attention_factor"),
    ({"type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_bad_yarn_fields_are_named(scaling, field):
  with pytest.raises(RopeError, match="ckpt/config.json") as info:
    parse_rope_scaling({"rope_scaling": scaling, "max_position_embeddings": 128}, "ckpt/config.json")
  assert field in str(info.value)
