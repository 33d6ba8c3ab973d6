"""The logical-axis vocabulary: every axis name used anywhere in qwen_logical.

Layers name array dimensions with these constants only; rule tables map them to
mesh axes. No layer ever names a mesh axis.
"""

# Parameters.
VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"  # query heads (in the mesh layout, i.e. after the head plan)
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
NORM = "norm"
LAYERS = "layers"  # the stacked-layer dimension when layers are scanned
LORA_RANK = "lora_rank"  # the rank of LoRA adapters (training.lora); replicated in every table
EXPERT = "expert"  # the experts of a mixture-of-experts MLP (Qwen3-MoE), and the router's outputs
EXPERT_MLP = "expert_mlp"  # an expert's own hidden (intermediate) dimension

# Activations.
ACTIVATION_BATCH = "activation_batch"
ACTIVATION_LENGTH = "activation_length"
ACTIVATION_EMBED = "activation_embed"
ACTIVATION_HEADS = "activation_heads"
ACTIVATION_KV_HEADS = "activation_kv_heads"
ACTIVATION_HEAD_DIM = "activation_head_dim"
ACTIVATION_MLP = "activation_mlp"
ACTIVATION_VOCAB = "activation_vocab"

# KV cache.
CACHE_BATCH = "cache_batch"
CACHE_SEQUENCE = "cache_sequence"
CACHE_KV_HEADS = "cache_kv_heads"
CACHE_HEAD_DIM = "cache_head_dim"

PARAMETER_AXES = (VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, NORM, LAYERS, LORA_RANK, EXPERT, EXPERT_MLP)
ACTIVATION_AXES = (
    ACTIVATION_BATCH,
    ACTIVATION_LENGTH,
    ACTIVATION_EMBED,
    ACTIVATION_HEADS,
    ACTIVATION_KV_HEADS,
    ACTIVATION_HEAD_DIM,
    ACTIVATION_MLP,
    ACTIVATION_VOCAB,
)
CACHE_AXES = (CACHE_BATCH, CACHE_SEQUENCE, CACHE_KV_HEADS, CACHE_HEAD_DIM)
ALL_AXES = PARAMETER_AXES + ACTIVATION_AXES + CACHE_AXES

# Axes that carry attention heads; they must all be split the same way, because
# the head layout plan is computed from that one split.
HEAD_CARRYING_AXES = (
    HEADS,
    KV_HEADS,
    ACTIVATION_HEADS,
    ACTIVATION_KV_HEADS,
    CACHE_KV_HEADS,
)

# The logical shapes of the activations the model constrains (validated like parameters).
EMBED_ACTIVATION = (ACTIVATION_BATCH, ACTIVATION_LENGTH, ACTIVATION_EMBED)
QUERY_ACTIVATION = (ACTIVATION_BATCH, ACTIVATION_LENGTH, ACTIVATION_HEADS, ACTIVATION_HEAD_DIM)
KV_ACTIVATION = (ACTIVATION_BATCH, ACTIVATION_LENGTH, ACTIVATION_KV_HEADS, ACTIVATION_HEAD_DIM)
MLP_ACTIVATION = (ACTIVATION_BATCH, ACTIVATION_LENGTH, ACTIVATION_MLP)
LOGITS_ACTIVATION = (ACTIVATION_BATCH, ACTIVATION_LENGTH, ACTIVATION_VOCAB)
TOKENS = (ACTIVATION_BATCH, ACTIVATION_LENGTH)
# Heads before slots: with [B, S, K, D] XLA re-copied the cache on every decode step.
KV_CACHE = (CACHE_BATCH, CACHE_KV_HEADS, CACHE_SEQUENCE, CACHE_HEAD_DIM)
# An int8 cache's scales: one per token and KV head.
KV_CACHE_SCALE = KV_CACHE[:-1]
