"""The verification suite: every mesh x every rule table vs the single-device run, one report.

  python main.py --config=configs/verify.py [--config.report=verify.json]
  python main.py --config=configs/verify.py --config.checkpoint=/path/to/Qwen2.5-0.5B

Exits non-zero when any combination disagrees beyond tolerance or replicates a
parameter axis its table claims to shard. The model is the Qwen2.5-0.5B shape with
random weights unless a checkpoint is given.
"""

from ml_collections import ConfigDict

from configs import base


def get_config():
  config = base.get_config()
  config.job = "verify"
  config.mesh = "1x8"  # unused: the suite makes its meshes from verify.meshes (the largest sizes the devices)
  config.model.preset = "qwen2.5-0.5b"
  config.model.param_dtype = "float32"
  config.verify = ConfigDict()
  config.verify.meshes = "1x1,1x8,2x4,4x2,8x1"  # batch x model
  # --config.rule_overrides applies to each; expert_parallel is skipped for a model without experts (for it
  # the table is tensor_parallel)
  config.verify.tables = "tensor_parallel,data_parallel,fsdp,tp_fsdp,expert_parallel"
  # MESH:TABLE,... (e.g. "1x8:tensor_parallel,2x4:tp_fsdp"): only these, in this order, instead of
  # every mesh x every table
  config.verify.combinations = ""
  # reference: the 1x1 run's random weights, saved as an HF checkpoint in a temporary directory
  # and loaded onto each mesh | init: sharded random init on each mesh (also checks init)
  config.verify.weights = "reference"
  config.verify.batch_size = 8
  config.verify.seq_len = 32  # forward batch [batch_size, seq_len]; greedy prompts are its rows, cut to seq_len/2..seq_len
  config.verify.new_tokens = 3  # greedy tokens per prompt, compared (prefill + 2 cached decode steps)
  # The verdict, per position (one row of V logits) vs the 1x1 run; tolerances scale with the logits:
  # max|dlogit| <= atol + rtol * max|logit| (real checkpoints: logit std ~3, maxima ~30, and float32
  # all-reduces in another order differ by ~1e-3 there); then the smallest per-position Pearson
  # correlation and the mean KL(softmax(1x1) || softmax(combination)). float32; raise for bfloat16 compute.
  config.verify.rtol = 1e-3
  config.verify.atol = 1e-4
  config.verify.min_pcc = 0.99999
  config.verify.max_kl = 1e-5  # nats
  config.verify.top_k = 100
  config.verify.min_top_k_overlap = 0.98  # per position; a near-tie at rank k may swap one token
  config.verify.key_params = ("embed_tokens/embedding,layers/attention/q_kernel,layers/attention/k_kernel,"
                              "layers/attention/o_kernel,layers/mlp/up_kernel,layers/mlp/down_kernel,lm_head")
  return config
