"""Qwen2ForCausalLM in Flax Linen: embed -> decoder layers (scanned or unrolled) -> norm -> logits.

Each call names its `mode` (`Mode`, from layers): FORWARD (no cache) returns logits; PREFILL
(the prompt into an empty KV cache, `qwen_logical.inference.kv_cache`) and DECODE (tokens at
slot `cache_index` of a filled cache) return (logits, new cache). `last_token_only` computes
the last position's logits only, for scanned and unrolled layers alike.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_logical.common.errors import QwenLogicalError
from qwen_logical.model import axes as ax
from qwen_logical.model.config import ModelConfig
from qwen_logical.model.head_layout import HeadLayout, plan_heads
from qwen_logical.model.layers import DecoderLayer, Embedder, Mode, RMSNorm, constrain, kernel_param
from qwen_logical.model.projections import dense

__all__ = ["Mode", "ModelCallError", "Qwen2ForCausalLM", "attention_bias", "cached_attention_bias",
           "positions_from_mask"]

_MASKED = float(jnp.finfo(jnp.float32).min)

Cache = Any  # {'layers': {'k', 'v': [N, B, K, S, D]}} scanned, {'layers_i': {'k', 'v': [B, K, S, D]}} unrolled


class ModelCallError(QwenLogicalError):
  """A model call whose arguments do not fit its mode."""


def attention_bias(attention_mask: jax.Array) -> jax.Array:
  """int/bool[B, S] key mask -> f32[B, 1, S, S]: 0 where a query may attend (causal and not padding)."""
  length = attention_mask.shape[1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  allowed = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
  return jnp.where(allowed, 0.0, _MASKED).astype(jnp.float32)


def _query_slots(cache_index: jax.Array, batch: int, length: int) -> jax.Array:
  """int[B, L]: the slot of each query; cache_index is one slot for every row (scalar) or int[B]."""
  index = jnp.asarray(cache_index, jnp.int32)
  return jnp.broadcast_to(index[..., None] + jnp.arange(length, dtype=jnp.int32), (batch, length))


def cached_attention_bias(slot_mask: jax.Array, cache_index: jax.Array, length: int) -> jax.Array:
  """Bias for L queries at slots [cache_index, cache_index + L) over S cache slots.

  slot_mask int/bool[B, S]: 1 for slots holding (or about to hold) real tokens, 0 for
  left padding. cache_index: a scalar (every row) or int[B] (each row its own slot). Query i
  of row b may attend slot s iff s <= cache_index[b] + i and slot_mask[b, s].
  Returns f32[B, 1, L, S].
  """
  slots = jnp.arange(slot_mask.shape[1])
  queries = _query_slots(cache_index, slot_mask.shape[0], length)  # [B, L]
  allowed = (slots[None, None, :] <= queries[:, :, None]) & slot_mask.astype(bool)[:, None, :]
  return jnp.where(allowed[:, None], 0.0, _MASKED).astype(jnp.float32)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Positions that count only real tokens, so left-padded rows start at 0."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def _check_call(mode: Mode, attention_mask, cache, cache_index) -> None:
  if mode is Mode.FORWARD:
    if cache is not None or cache_index is not None:
      raise ModelCallError("Qwen2ForCausalLM in Mode.FORWARD takes no cache; pass mode=Mode.PREFILL "
                           "or Mode.DECODE to use one.")
    return
  if cache is None or attention_mask is None:
    raise ModelCallError(f"Qwen2ForCausalLM in {mode} needs cache= (qwen_logical.inference.kv_cache) "
                         "and attention_mask int[B, S] over the cache slots.")
  if mode is Mode.DECODE and cache_index is None:
    raise ModelCallError("Qwen2ForCausalLM in Mode.DECODE needs cache_index (the slot of the first token).")
  if mode is Mode.PREFILL and cache_index is not None:
    raise ModelCallError("Qwen2ForCausalLM in Mode.PREFILL writes from slot 0; pass no cache_index "
                         "(Mode.DECODE writes at cache_index).")


def _positions_and_bias(mode: Mode, shape: tuple[int, int], attention_mask, positions, cache_index):
  """(positions int[B, L], bias f32[B, 1, L, S]) for tokens of `shape` [B, L] in `mode`."""
  length = shape[1]
  if mode is Mode.DECODE:
    if positions is None:  # each row's count of real slots before its own query slots
      queries = _query_slots(cache_index, shape[0], length)
      positions = jnp.take_along_axis(positions_from_mask(attention_mask), queries, axis=1)
    return positions, cached_attention_bias(attention_mask, cache_index, length)
  if attention_mask is None:
    attention_mask = jnp.ones(shape, jnp.int32)
  mask = attention_mask[:, :length]  # PREFILL: the mask covers the cache slots; the tokens are [0, L)
  return (positions_from_mask(mask) if positions is None else positions), attention_bias(mask)


def _layer_class(remat: str, scanned: bool):
  """DecoderLayer, rematerialised as ModelConfig.remat says ("full": recompute the whole layer in the
  backward pass; "dots": keep the weight products, recompute the rest)."""
  if remat == "none":
    return DecoderLayer
  policy = None if remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return nn.remat(DecoderLayer, policy=policy, prevent_cse=not scanned)


def _scan(num_layers: int, cached: bool, remat: str = "none"):
  """DecoderLayer scanned over `num_layers` stacked layers (params with a leading `layers` axis);
  called as (x, positions, bias[, cache stacked [n, ...], cache_index])."""
  return nn.scan(
      _layer_class(remat, scanned=True),
      variable_axes={"params": 0, "intermediates": 0},  # intermediates: the MoE router's logits
      split_rngs={"params": True},
      in_axes=(nn.broadcast, nn.broadcast) + ((0, nn.broadcast) if cached else ()),
      length=num_layers,
      metadata_params={nn.PARTITION_NAME: ax.LAYERS},
  )


class _LastTokenStack(nn.Module):
  """Scanned layers whose last layer computes the last token only (apply only; init uses `_scan`).

  Its scope holds the stacked params exactly as `_scan` makes them ([N, ...]). Layers [0, N-1)
  run in a loop that indexes the stack per layer, as nn.scan does: slicing the stack for a
  shorter nn.scan would copy every layer's weights (measured: +455 MiB of temporaries and 1.7x
  the prefill time on an 8-layer 0.5B shape). The cache, if any, is the loop's carry, each
  layer's slice read and written in place.
  """

  config: ModelConfig
  layout: HeadLayout
  mode: Mode

  @nn.compact
  def __call__(self, x, positions, bias, cache=None, cache_index=0):
    params = nn.meta.unbox(self.variables["params"])
    cached = self.mode is not Mode.FORWARD

    def run(i, x, cache, trim):
      at = lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False)
      layer = DecoderLayer(self.config, self.layout, self.mode, trim, parent=None)
      y, new = layer.apply({"params": jax.tree_util.tree_map(at, params)}, x, positions, bias,
                           jax.tree_util.tree_map(at, cache) if cached else None, cache_index)
      if cached:
        cache = jax.tree_util.tree_map(
            lambda full, one: jax.lax.dynamic_update_index_in_dim(full, one, i, 0), cache, new)
      return y, cache

    last = self.config.num_layers - 1
    x, cache = jax.lax.fori_loop(0, last, lambda i, carry: run(i, *carry, False), (x, cache))
    return run(last, x, cache, True)


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
               positions: jax.Array | None = None, *, mode: Mode = Mode.FORWARD,
               cache: Cache | None = None, cache_index: jax.Array | None = None,
               last_token_only: bool = False):
    """tokens int[B, L] -> logits [B, L, V] (FORWARD) or (logits, new cache) (PREFILL, DECODE).

    Logits are (activation_batch, activation_length, activation_vocab); `last_token_only`
    computes them for the last position only ([B, 1, V]; the cache still gets all L tokens).
    FORWARD: attention_mask int[B, L] (default all ones). PREFILL / DECODE: `cache` (tree of
    [.., B, K, S, D] arrays), attention_mask int[B, S] over the cache slots; PREFILL writes the
    tokens at slots [0, L), DECODE at [cache_index, cache_index + L) where cache_index is one
    slot for every row (scalar) or each row's own (int[B]). Positions default to the count of
    real tokens (slots) before each one.
    """
    mode = Mode(mode)
    _check_call(mode, attention_mask, cache, cache_index)
    cfg, length = self.config, tokens.shape[1]
    positions, bias = _positions_and_bias(mode, tokens.shape, attention_mask, positions, cache_index)
    trim = last_token_only and length > 1
    embedder = Embedder(cfg, name="embed_tokens")
    x = embedder(tokens)
    index = 0 if cache_index is None else jnp.asarray(cache_index, jnp.int32)
    if cfg.scan_layers:
      x, new_cache = self._scanned(x, positions, bias, mode, cache, index, trim)
    else:
      x, new_cache = self._unrolled(x, positions, bias, mode, cache, index, trim)
    x = RMSNorm(cfg, name="final_norm")(x[:, -1:] if trim else x)
    logits = constrain(self._logits(embedder, x), ax.LOGITS_ACTIVATION)
    return logits if mode is Mode.FORWARD else (logits, new_cache)

  def _scanned(self, x, positions, bias, mode, cache, cache_index, trim):
    cfg, cached = self.config, mode is not Mode.FORWARD
    args = (positions, bias) + ((cache["layers"], cache_index) if cached else ())
    if trim and not self.is_initializing():
      x, stacked = _LastTokenStack(cfg, self._layout(), mode, name="layers")(x, *args)
    else:  # init creates the stacked params with the full-length scan
      remat = "none" if cached else cfg.remat  # remat serves training (FORWARD) only
      x, stacked = _scan(cfg.num_layers, cached, remat)(cfg, self._layout(), mode, name="layers")(x, *args)
    return x, ({"layers": stacked} if cached else None)

  def _unrolled(self, x, positions, bias, mode, cache, cache_index, trim):
    cfg, new_cache = self.config, {}
    layer_class = _layer_class(cfg.remat if mode is Mode.FORWARD else "none", scanned=False)
    for i in range(cfg.num_layers):
      name = f"layers_{i}"
      # The last layer's queries, o projection and MLP are needed for the last token only.
      last = trim and i == cfg.num_layers - 1
      layer_cache = cache[name] if mode is not Mode.FORWARD else None
      x, new_cache[name] = layer_class(cfg, self._layout(), mode, last, name=name)(
          x, positions, bias, layer_cache, cache_index)
    return x, (new_cache if mode is not Mode.FORWARD else None)

  def _logits(self, embedder: Embedder, x: jax.Array) -> jax.Array:
    """x [B, L, E] -> logits [B, L, V] (tied: the embedding transposed; else the lm_head)."""
    cfg = self.config
    if cfg.tie_word_embeddings:
      return embedder.attend(x)
    kernel = kernel_param(self, "lm_head", (cfg.vocab_size, cfg.hidden_size), (ax.VOCAB, ax.EMBED), cfg)
    return dense(x, kernel, cfg.dtype, (ax.VOCAB, ax.EMBED))
