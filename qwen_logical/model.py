"""Qwen2ForCausalLM in Flax Linen: embed -> decoder layers (scanned or unrolled) -> norm -> logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_logical import axes as ax
from qwen_logical.config import ModelConfig
from qwen_logical.head_plan import HeadLayout, plan_heads
from qwen_logical.layers import DecoderLayer, Embedder, RMSNorm, logical_param, constrain

_MASKED = float(jnp.finfo(jnp.float32).min)


def attention_bias(attention_mask: jax.Array) -> jax.Array:
  """int/bool[B, S] key mask -> f32[B, 1, S, S]: 0 where a query may attend (causal and not padding)."""
  length = attention_mask.shape[1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  allowed = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
  return jnp.where(allowed, 0.0, _MASKED).astype(jnp.float32)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Positions that count only real tokens, so left-padded rows start at 0."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


class Qwen2ForCausalLM(nn.Module):
  """The decoder with its language-model head.

  Params: embed_tokens/embedding (vocab, embed); layers/... (with a leading
  `layers` axis when scanned, else layers_0 ... layers_{n-1}); final_norm/scale
  (norm,); lm_head (embed, vocab) unless embeddings are tied.
  """

  config: ModelConfig
  layout: HeadLayout | None = None

  def _layout(self) -> HeadLayout:
    return self.layout or plan_heads(self.config.num_heads, self.config.num_kv_heads, 1)

  @nn.compact
  def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """tokens int[B, L] (+ mask int[B, L], positions int[B, L]) -> logits [B, L, V].

    Logits are (activation_batch, activation_length, activation_vocab).
    """
    cfg, layout = self.config, self._layout()
    if attention_mask is None:
      attention_mask = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
      positions = positions_from_mask(attention_mask)
    bias = attention_bias(attention_mask)

    embedder = Embedder(cfg, name="embed_tokens")
    x = embedder(tokens)
    if cfg.scan_layers:
      stack = nn.scan(
          DecoderLayer,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: ax.LAYERS},
      )
      x, _ = stack(cfg, layout, name="layers")(x, positions, bias)
    else:
      for i in range(cfg.num_layers):
        x, _ = DecoderLayer(cfg, layout, name=f"layers_{i}")(x, positions, bias)
    x = RMSNorm(cfg, name="final_norm")(x)

    if cfg.tie_word_embeddings:
      logits = embedder.attend(x)
    else:
      kernel = logical_param(self, "lm_head", nn.initializers.normal(cfg.initializer_range),
                      (cfg.hidden_size, cfg.vocab_size), (ax.EMBED, ax.VOCAB), jnp.dtype(cfg.param_dtype))
      logits = x @ kernel.astype(jnp.dtype(cfg.dtype))
    return constrain(logits, ax.LOGITS_ACTIVATION)
