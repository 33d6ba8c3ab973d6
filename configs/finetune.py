"""Fine-tuning: the model on one mesh under one rule table, trained on chat conversations.

  python main.py --config=configs/finetune.py                     # tiny random model, built-in chats
  python main.py --config=configs/finetune.py --config.checkpoint=DIR --config.train.data=chats.jsonl \
      --config.train.output=/tmp/tuned

Without a checkpoint the default is the `tiny` preset (2 layers, hidden 112, 14 query / 2 KV heads)
with a 320-row vocabulary, random weights, the built-in byte tokenizer and the built-in conversation
set (qwen_logical/training/builtin_data.py): 120 steps on 1x8 tensor_parallel, about a minute on CPU.
"""

from ml_collections import ConfigDict, config_dict

from configs import base


def get_config() -> ConfigDict:
  config = base.get_config()
  config.job = "finetune"
  config.mesh = "1x8"
  config.rules = "tensor_parallel"
  config.fit_to_host_memory = False  # training holds 4x the weights; a silently reduced model helps no one
  config.model.preset = "tiny"
  config.model.param_dtype = "float32"  # master weights and Adam moments
  config.model.dtype = "float32"
  # None: the model's own (a checkpoint's config.json, the preset's); without a checkpoint and with the
  # built-in byte tokenizer (259 ids) the job uses 320 when the preset has fewer rows.
  config.model.vocab_size = config_dict.placeholder(int)

  train = config.train = ConfigDict()
  train.data = ""  # JSONL, one {"messages": [...]} per line; "" = the built-in conversations
  train.eval_fraction = 0.1  # held out (a seeded shuffle), evaluated every eval_every steps and at the end
  train.max_length = 256  # tokens per conversation; longer ones: `overlong`
  train.overlong = "truncate"  # truncate | skip (counted and logged either way)
  train.length_buckets = 3  # batches padded to max_length, /2, /4: one compilation per bucket
  train.batch_size = 8  # conversations per optimizer step (all processes), split into grad_accum micro-batches
  train.grad_accum = 1
  train.steps = 120
  train.learning_rate = 3e-3
  train.warmup_steps = 10
  train.weight_decay = 0.01
  train.clip_norm = 1.0  # 0 = off
  train.eval_every = 40  # 0 = at the end only
  train.seed = 0
  train.remat = "none"  # none | full | dots (recompute each layer, or all but its weight products)
  train.lora_rank = 0  # 0 = full fine-tuning; > 0 trains low-rank adapters (training/lora.py)
  train.lora_alpha = 16.0
  train.lora_targets = "q,k,v,o,gate,up,down"
  train.checkpoint_dir = ""  # train-state checkpoints (training/checkpointing.py); "" = none
  train.checkpoint_every = 0
  train.checkpoint_keep = 3  # newest train-state checkpoints kept (0 = all)
  train.output = ""  # export the tuned model as an HF directory here
  train.peak_tflops = 0.0  # per device, for the MFU estimate; 0 = measure a matrix product on this mesh
  train.sample_prompt = "What is the capital of France?"  # generated after training ("" = none)
  return config
