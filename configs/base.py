"""Shared defaults for every run config; the mesh configs change only the mesh and rule table."""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
  config = ConfigDict()
  config.job = "run"  # run: one mesh and table | verify: the verification suite (configs/verify.py)
  config.mesh = "1x8"  # batch x model
  config.rules = "tensor_parallel"  # tensor_parallel | data_parallel | fsdp | tp_fsdp
  config.rule_overrides = ""  # e.g. "mlp=None,embed=batch+model"
  config.platform = ""  # "" = JAX's default backend; "cpu" forces simulated CPU devices
  config.num_cpu_devices = 0  # 0 = as many as the mesh needs
  config.seed = 0
  config.batch_size = 8
  config.seq_len = 16
  config.fit_to_host_memory = True  # on CPU, run fewer layers (and say so) if the model would not fit
  config.host_memory_fraction = 0.9  # of available memory, for parameters and the forward's temporaries
  config.report = ""  # path of a JSON report
  config.show_sharding = True  # after the sharding table: the mesh, each layout as a grid of devices, memory bars
  config.checkpoint = ""  # an HF Qwen2 directory (config.json + safetensors); the architecture comes from it
  # Generation (with a prompt the job generates text instead of running the sample forward pass).
  config.prompt = ""
  config.prompts = ""  # a file with one prompt per line, or prompts joined by '||'; batched together
  config.tokenizer = ""  # directory with tokenizer.json (default: the checkpoint's)
  config.chat = False  # wrap each prompt in the tokenizer's chat template as a user message
  config.chat_template_kwargs = ""  # JSON object of chat template variables, e.g. '{"enable_thinking": false}' (Qwen3)
  config.max_new_tokens = 64
  config.temperature = 0.0  # 0 = greedy
  config.top_k = 0
  config.top_p = 1.0
  config.decode_steps = 0  # tokens per decode dispatch (K), on the device; 0 = the platform's default (8 CPU, 32 GPU/TPU)
  # Compiled programs are kept here, so a second start on this machine loads them instead of compiling; "" = off.
  config.compilation_cache_dir = "~/.cache/qwen_logical/xla"
  # Speculative decoding: several tokens checked per pass over the weights; greedy output unchanged.
  config.speculative = ConfigDict()
  config.speculative.method = ""  # "" = off | prompt_lookup (drafts from the prompt and output) | draft
  config.speculative.num_tokens = 7  # tokens drafted per round (K); K + 1 = 8 rows suit XLA:CPU's products
  config.speculative.ngram = 3  # prompt_lookup: the tokens matched to find a continuation
  config.speculative.draft_checkpoint = ""  # draft: an HF directory of a model with the same tokenizer
  config.speculative.draft_rules = ""  # draft: its own rule table ("" = the target's)
  config.speculative.draft_rule_overrides = ""
  config.export = ""  # write the params as an HF directory here (safetensors shards + index + config)

  # Several processes (one per host): all join one job and the mesh spans every process's devices.
  config.distributed = ConfigDict()
  config.distributed.coordinator = ""  # HOST:PORT of process 0; "" = a single process
  config.distributed.num_processes = 0
  config.distributed.process_id = -1
  config.distributed.auto = False  # let JAX read the cluster's environment (SLURM, Open MPI, TPU pods)
  config.distributed.initialization_timeout_s = 300  # waiting for every process to join
  config.distributed.heartbeat_timeout_s = 100  # a silent peer for this long ends every process with an error

  config.model = ConfigDict()
  config.model.preset = "qwen2.5-7b"
  config.model.hf_config = ""  # path to an HF config.json (or its directory) instead of a preset
  # "" = float32 (the fast path on CPU) when the model fits this host so, else bfloat16 (the 7B here)
  config.model.param_dtype = ""
  config.model.dtype = "float32"
  config.model.quantization = ""  # "" = weights in param_dtype | "int8": weight-only, one scale per output channel
  config.model.kv_cache_dtype = ""  # "" = the compute dtype | bfloat16 | int8 (a scale per token and KV head)
  # None = the fast layer form for the platform: unrolled on CPU and GPU (XLA copies each layer's slice of
  # scanned weights on every decode step: ~4x slower decode on CPU, 2.6x on an H100), scanned on TPU and
  # under tables that gather weights (fsdp).
  config.model.scan_layers = config_dict.placeholder(bool)
  # Architecture overrides (None = as in the preset / config.json).
  for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
               "head_dim", "vocab_size"):
    config.model[name] = config_dict.placeholder(int)
  config.model.tie_word_embeddings = config_dict.placeholder(bool)
  config.model.rope_theta = config_dict.placeholder(float)
  config.model.initializer_range = config_dict.placeholder(float)
  return config
