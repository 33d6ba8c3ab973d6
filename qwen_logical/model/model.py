"""Qwen2ForCausalLM in Flax Linen: embed -> decoder layers (scanned or unrolled) -> norm -> logits.

Called without a cache it is the plain forward pass. Called with a KV cache (see
`qwen_logical.kv_cache`) it writes this call's keys/values at `cache_index` and
attends over every cache slot: prefill (L prompt tokens at slot 0) and decode
(one token at slot P + t) are the same code path.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_logical.model import axes as ax
from qwen_logical.model.config import ModelConfig
from qwen_logical.model.head_layout import HeadLayout, plan_heads
from qwen_logical.model.layers import DecoderLayer, Embedder, RMSNorm, logical_param, constrain

_MASKED = float(jnp.finfo(jnp.float32).min)

Cache = Any  # {'layers': {'k', 'v': [N, B, K, S, D]}} scanned, {'layers_i': {'k', 'v': [B, K, S, D]}} unrolled


def attention_bias(attention_mask: jax.Array) -> jax.Array:
  """int/bool[B, S] key mask -> f32[B, 1, S, S]: 0 where a query may attend (causal and not padding)."""
  length = attention_mask.shape[1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  allowed = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
  return jnp.where(allowed, 0.0, _MASKED).astype(jnp.float32)


def cached_attention_bias(slot_mask: jax.Array, cache_index: jax.Array, length: int) -> jax.Array:
  """Bias for L queries at slots [cache_index, cache_index + L) over S cache slots.

  slot_mask int/bool[B, S]: 1 for slots holding (or about to hold) real tokens, 0 for
  left padding. Query i may attend slot s iff s <= cache_index + i and slot_mask[b, s].
  Returns f32[B, 1, L, S].
  """
  slots = jnp.arange(slot_mask.shape[1])
  queries = cache_index + jnp.arange(length)
  allowed = (slots[None, :] <= queries[:, None])[None, None] & slot_mask.astype(bool)[:, None, None, :]
  return jnp.where(allowed, 0.0, _MASKED).astype(jnp.float32)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Positions that count only real tokens, so left-padded rows start at 0."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


class Qwen2ForCausalLM(nn.Module):
  """The decoder with its language-model head.

  Params: embed_tokens/embedding (vocab, embed); layers/... (with a leading
  `layers` axis when scanned, else layers_0 ... layers_{n-1}); final_norm/scale
  (norm,); lm_head (vocab, embed) unless embeddings are tied (HF's [out, in] order, as the embedding).
  """

  config: ModelConfig
  layout: HeadLayout | None = None

  def _layout(self) -> HeadLayout:
    return self.layout or plan_heads(self.config.num_heads, self.config.num_kv_heads, 1)

  @nn.compact
  def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None, cache: Cache | None = None,
               cache_index: jax.Array | None = None, last_only: bool = False):
    """tokens int[B, L] (+ mask, positions int[B, L]) -> logits [B, L, V].

    Logits are (activation_batch, activation_length, activation_vocab); `last_only`
    computes them for the last position only ([B, 1, V]).

    With `cache` (tree of [.., B, K, S, D] arrays, `qwen_logical.kv_cache`),
    `attention_mask` is int[B, S] over the cache slots, the tokens go to slots
    [cache_index, cache_index + L), positions default to the count of real slots
    before each one, and the result is (logits, new cache). cache_index given as the
    Python int 0 (prefill into an empty cache) attends over the L new tokens only.
    """
    cfg, layout = self.config, self._layout()
    length = tokens.shape[1]
    if cache is None:
      if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
      if positions is None:
        positions = positions_from_mask(attention_mask)
      bias = attention_bias(attention_mask)
    else:
      if attention_mask is None or cache_index is None:
        raise ValueError("Qwen2ForCausalLM with a cache needs attention_mask int[B, S] over the "
                         "cache slots and cache_index (the slot of the first token).")
      if isinstance(cache_index, int) and cache_index == 0:  # prefill: only this call's keys exist
        positions = positions_from_mask(attention_mask[:, :length]) if positions is None else positions
        bias = attention_bias(attention_mask[:, :length])
      else:
        cache_index = jnp.asarray(cache_index, jnp.int32)
        if positions is None:
          positions = jax.lax.dynamic_slice_in_dim(positions_from_mask(attention_mask), cache_index, length, 1)
        bias = cached_attention_bias(attention_mask, cache_index, length)

    embedder = Embedder(cfg, name="embed_tokens")
    x = embedder(tokens)
    new_cache = None
    if cfg.scan_layers:
      cached = cache is not None
      stack = nn.scan(
          DecoderLayer,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast) + ((0, nn.broadcast) if cached else ()),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: ax.LAYERS},
      )
      args = (positions, bias) + ((cache["layers"], cache_index) if cached else ())
      x, stacked = stack(cfg, layout, name="layers")(x, *args)
      new_cache = {"layers": stacked} if cached else None
    else:
      new_cache = {} if cache is not None else None
      for i in range(cfg.num_layers):
        name = f"layers_{i}"
        layer_cache = (cache[name], cache_index) if cache is not None else (None, None)
        # The last layer's queries, o projection and MLP are needed for the last token only.
        trim = last_only and length > 1 and i == cfg.num_layers - 1
        x, out = DecoderLayer(cfg, layout, name=name)(x, positions, bias, *layer_cache, last_only=trim)
        if cache is not None:
          new_cache[name] = out
    if last_only and length > 1:
      x = x[:, -1:]
    x = RMSNorm(cfg, name="final_norm")(x)

    if cfg.tie_word_embeddings:
      logits = embedder.attend(x)
    else:
      kernel = logical_param(self, "lm_head", nn.initializers.normal(cfg.initializer_range),
                      (cfg.vocab_size, cfg.hidden_size), (ax.VOCAB, ax.EMBED), jnp.dtype(cfg.param_dtype))
      logits = jnp.einsum("ble,ve->blv", x, kernel.astype(jnp.dtype(cfg.dtype)))
    logits = constrain(logits, ax.LOGITS_ACTIVATION)
    return logits if cache is None else (logits, new_cache)
