"""Masked next-token cross-entropy in float32, written so that every rule table can split the vocab.

The logits keep their logical axes (activation_batch, activation_length, activation_vocab). The
log-sum-exp and the target's logit are both reductions over the vocab axis (the target picked by
comparing a vocab iota with the target id, not by a gather), so a vocab split over 'model' becomes
partial sums and one all-reduce each, and nothing gathers the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_logical.model import axes as ax
from qwen_logical.model.layers import constrain


def masked_cross_entropy(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(tokens[:, t+1] | tokens[:, :t+1]) over trained positions, their count), f32[] each.

  logits [B, L, V] (any float dtype; computed in float32), tokens int[B, L], loss_mask [B, L]:
  1 where position t's next token is trained. The last position has no next token and never counts.
  """
  logits = constrain(logits.astype(jnp.float32), ax.LOGITS_ACTIVATION)
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  mask = loss_mask.astype(jnp.float32).at[:, -1].set(0.0)
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  shifted = logits - peak
  log_normalizer = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
  target_logit = jnp.sum(jnp.where(vocab == targets[..., None], shifted, 0.0), axis=-1)
  losses = (log_normalizer - target_logit) * mask
  return jnp.sum(losses), jnp.sum(mask)
