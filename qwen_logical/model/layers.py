"""Qwen2 building blocks as Flax Linen modules, annotated with logical axis names only.

Parameters are declared here; values come from the hash init (sharding/init.py) or a checkpoint.
A declaration gives a parameter's shape, dtype and logical axes (what the Partitioner traces);
`model.init` itself makes zeros.

Shape letters: B batch, L query length, S key length (KV cache slots when cached), E embed, H query heads
(layout count), K KV heads (layout count), D head_dim, I mlp, V vocab.
"""

from __future__ import annotations

import enum
import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_logical.model import axes as ax
from qwen_logical.model import rope
from qwen_logical.model.cached_attention import decode_attention, quantize, stored, write_slots
from qwen_logical.model.config import ModelConfig
from qwen_logical.model.head_layout import HeadLayout
from qwen_logical.model.moe import MixtureOfExperts
from qwen_logical.model.params import constrain, kernel_param, logical_param
from qwen_logical.model.projections import dense

KVCache = dict  # one layer's {'k': [B, K, S, D], 'v': [B, K, S, D]} (logical ax.KV_CACHE; int8: + 'k_scale', 'v_scale' [B, K, S])

# The cache's dimension order: heads before slots, so attention reads each head's [S, D] block
# contiguously and a decode step writes one [D] row per head in place (no per-step relayout).


class Mode(enum.Enum):
  """What a call of the model (or of a layer) does with the KV cache.

  FORWARD: no cache; the L tokens attend to each other (causally). Returns logits.
  PREFILL: writes the L tokens' keys/values at slots [0, L) of an empty cache and attends over
    those L tokens only (the empty slots are skipped). Returns (logits, cache).
  DECODE: writes the L tokens' keys/values at slots [cache_index, cache_index + L) and attends
    over every cache slot (the bias masks empty and padded ones). Returns (logits, cache).
  """

  FORWARD = "forward"
  PREFILL = "prefill"
  DECODE = "decode"


class RMSNorm(nn.Module):
  """x: [..., E] -> [..., E]; statistics in float32 as in HF Qwen2RMSNorm. Param scale: (norm,)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    scale = logical_param(self, "scale", (x.shape[-1],), (ax.NORM,), cfg.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    return scale.astype(cfg.dtype) * normed.astype(cfg.dtype)


class Embedder(nn.Module):
  """Token embedding, param `embedding`: (vocab, embed). Also the tied output projection."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embedding = kernel_param(self, "embedding", (cfg.vocab_size, cfg.hidden_size), (ax.VOCAB, ax.EMBED), cfg)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens int[B, L] -> [B, L, E] (activation_batch, activation_length, activation_embed).

    int8: the rows are gathered as int8 and scaled by their own scales."""
    dtype = self.config.dtype
    table, scale = self.embedding
    x = jnp.take(table, tokens, axis=0).astype(dtype)
    if scale is not None:
      x = x * jnp.take(scale, tokens, axis=0)[..., None].astype(dtype)
    return constrain(x, ax.EMBED_ACTIVATION)

  def attend(self, x: jax.Array) -> jax.Array:
    """x [B, L, E] -> logits [B, L, V] with the embedding transposed (tied weights)."""
    return dense(x, self.embedding, self.config.dtype, (ax.VOCAB, ax.EMBED))


class Attention(nn.Module):
  """Grouped-query self-attention in the head layout.

  Params: q_kernel (heads, head_dim, embed), q_bias (heads, head_dim),
  k/v_kernel (kv_heads, head_dim, embed), k/v_bias (kv_heads, head_dim),
  o_kernel (embed, heads, head_dim) — no o bias, as in Qwen2. Qwen3 (config.qk_norm, no
  config.attention_bias): no q/k/v biases, and q_norm/scale, k_norm/scale (norm,) over head_dim,
  applied to every query and key head before RoPE. Kernels are stored in HF's
  [out, in] order (outputs first, the contracted dimension last), so that a decode step's
  matrix-vector products read each kernel row contiguously.

  `mode` (see Mode) says whether a cache is written and which keys are attended;
  `last_token_only` keeps keys and values for all L tokens but computes the output for the
  last one only ([B, 1, E]).
  """

  config: ModelConfig
  layout: HeadLayout
  mode: Mode = Mode.FORWARD
  last_token_only: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, bias: jax.Array,
               cache: KVCache | None = None, cache_index: jax.Array | int = 0):
    """x [B, L, E], positions int[B, L], bias f32[B, 1, L, S] (0 or -inf-like) -> y [B, L, E].

    FORWARD: S == L, the keys are this call's tokens; returns y. PREFILL / DECODE: `cache`
    ({'k', 'v'}: [R, K, S_cache, D], logical ax.KV_CACHE; R == B, or in DECODE R >= B: the call
    uses rows [0, B)) gets this call's keys/values at slots [cache_index, cache_index + L)
    (PREFILL: 0; DECODE: a scalar, or int[B]: a slot per row); PREFILL attends over the L new keys
    (S == L), DECODE over all S_cache slots; returns (y, new cache).
    """
    cfg, layout = self.config, self.layout
    dtype, pdtype = cfg.dtype, cfg.param_dtype
    e, d = cfg.hidden_size, cfg.head_dim
    h, k = layout.layout_num_heads, layout.layout_num_kv_heads

    def project(name, heads, head_axis_name, activation_names, x=x):
      kernel, scale = kernel_param(self, f"{name}_kernel", (heads, d, e), (head_axis_name, ax.HEAD_DIM, ax.EMBED),
                                   cfg)
      # One [B*L, E] x [H*D, E]^T product on the kernel in its stored order, then split the heads:
      # einsum "ble,hde->blhd" makes XLA:CPU transpose the whole kernel on every call.
      y = dense(x, (kernel.reshape(heads * d, e), scale), dtype, (head_axis_name, ax.EMBED))
      y = y.reshape(*x.shape[:2], heads, d)
      if cfg.attention_bias:
        y = y + logical_param(self, f"{name}_bias", (heads, d), (head_axis_name, ax.HEAD_DIM), pdtype).astype(dtype)
      if cfg.qk_norm and name != "v":  # a padded (all-zero) head stays zero
        y = RMSNorm(cfg, name=f"{name}_norm")(y)
      return constrain(y, activation_names)

    trim = self.last_token_only
    x_q, q_positions = (x[:, -1:], positions[:, -1:]) if trim else (x, positions)
    bias = bias[:, :, -1:] if trim else bias
    q = project("q", h, ax.HEADS, ax.QUERY_ACTIVATION, x=x_q)
    key = project("k", k, ax.KV_HEADS, ax.KV_ACTIVATION)
    value = project("v", k, ax.KV_HEADS, ax.KV_ACTIVATION)
    inv_freq, rope_factor = rope.rope_frequencies(d, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    q = rope.rotary_embedding(q, q_positions, inv_freq, rope_factor)
    key = rope.rotary_embedding(key, positions, inv_freq, rope_factor)

    keys = "bskd"  # this call's keys [B, L, K, D]
    if self.mode is not Mode.FORWARD:
      index = 0 if self.mode is Mode.PREFILL else cache_index
      write = lambda name, new, names=ax.KV_CACHE: constrain(write_slots(cache[name], new, index), names)
      new_cache = {}
      for name, new in (("k", key), ("v", value)):
        if f"{name}_scale" in cache:  # int8: this call's attention uses its own keys unrounded
          new, scale = quantize(new)
          new_cache[f"{name}_scale"] = write(f"{name}_scale", scale, ax.KV_CACHE_SCALE)
        new_cache[name] = write(name, new)
      cache = new_cache
      if self.mode is Mode.DECODE:  # this call's rows are the cache's first rows
        rows = x.shape[0]
        (key, value), keys = (stored(cache, n, rows, dtype) for n in ("k", "v")), "bksd"

    b, l = q.shape[:2]
    grouped = q.reshape(b, l, k, h // k, d)  # layout head j uses KV head j // (h // k)
    if l == 1 and keys == "bksd":
      out = decode_attention(grouped[:, 0], key, value, bias[:, :, 0], d ** -0.5).reshape(b, 1, h, d)
    else:
      scores = jnp.einsum(f"blkgd,{keys}->bkgls", grouped, key).astype(jnp.float32)
      scores = scores * (d ** -0.5) + bias[:, :, None]
      probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
      out = jnp.einsum(f"bkgls,{keys}->blkgd", probs, value).reshape(b, l, h, d)
    out = constrain(out, ax.QUERY_ACTIVATION)

    o_kernel, o_scale = kernel_param(self, "o_kernel", (e, h, d), (ax.EMBED, ax.HEADS, ax.HEAD_DIM), cfg)
    # One [B*L, H*D] x [E, H*D]^T product: the kernel is used in its stored order (an einsum over
    # (h, d) lets XLA:CPU transpose the whole kernel on every call).
    y = dense(out.reshape(b, l, h * d), (o_kernel.reshape(e, h * d), o_scale), dtype, (ax.EMBED, ax.HEADS))
    y = constrain(y, ax.EMBED_ACTIVATION)
    return y if self.mode is Mode.FORWARD else (y, cache)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)). gate/up (mlp, embed), down (embed, mlp): HF's [out, in]
  order, so a decode step's matrix-vector products read kernel rows contiguously."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, L, E] -> [B, L, E]."""
    cfg = self.config
    dtype = cfg.dtype
    e, i = cfg.hidden_size, cfg.intermediate_size
    gate = kernel_param(self, "gate_kernel", (i, e), (ax.MLP, ax.EMBED), cfg)
    up = kernel_param(self, "up_kernel", (i, e), (ax.MLP, ax.EMBED), cfg)
    down = kernel_param(self, "down_kernel", (e, i), (ax.EMBED, ax.MLP), cfg)
    hidden = jax.nn.silu(dense(x, gate, dtype, (ax.MLP, ax.EMBED))) * dense(x, up, dtype, (ax.MLP, ax.EMBED))
    hidden = constrain(hidden, ax.MLP_ACTIVATION)
    y = dense(hidden, down, dtype, (ax.EMBED, ax.MLP))
    return constrain(y, ax.EMBED_ACTIVATION)


class DecoderLayer(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)). Scan-compatible. The MLP is a
  MixtureOfExperts (model.moe) when config.num_experts > 0.

  `mode` and `last_token_only` as Attention's: with `last_token_only` (the last layer of a call
  that needs only the last position's logits) the cache still gets all L keys/values and the
  output is [B, 1, E] for the last token.
  """

  config: ModelConfig
  layout: HeadLayout
  mode: Mode = Mode.FORWARD
  last_token_only: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, bias: jax.Array,
               cache: KVCache | None = None, cache_index: jax.Array | int = 0):
    """x [B, L, E] -> (y [B, L, E], None) in FORWARD, (y, new cache) in PREFILL / DECODE."""
    attention = Attention(self.config, self.layout, self.mode, self.last_token_only, name="attention")
    normed = RMSNorm(self.config, name="input_norm")(x)
    if self.mode is Mode.FORWARD:
      attended = attention(normed, positions, bias)
    else:
      attended, cache = attention(normed, positions, bias, cache, cache_index)
    h = (x[:, -1:] if self.last_token_only else x) + attended
    mlp = MixtureOfExperts(self.config, name="mlp") if self.config.is_moe else MLP(self.config, name="mlp")
    out = h + mlp(RMSNorm(self.config, name="post_attention_norm")(h))
    return constrain(out, ax.EMBED_ACTIVATION), cache
