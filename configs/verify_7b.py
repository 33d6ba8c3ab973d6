"""The whole Qwen2.5-7B verified on every mesh of the suite, within this host's memory.

  python main.py --config=configs/verify_7b.py [--config.report=verify_7b.json]

The 7B shape (28 layers, 28 query / 4 KV heads) with bf16 weight storage and float32 compute,
random weights from the hash init (the same model on every mesh and table, so every run builds
its own). Each combination below and each 1x1 reference (one per weight storage: bf16, int8)
runs in a process of its own after its host memory is estimated from its compiled programs; a run
that would not fit is skipped with the figures. The logits of the 1x1 references stay on disk.
"""

from ml_collections import ConfigDict

from configs import base


def get_config():
  config = base.get_config()
  config.job = "verify_large"
  config.platform = "cpu"  # the memory estimate is of host memory: simulated CPU devices
  config.fit_to_host_memory = False  # the whole model or nothing: the estimate decides per run
  config.model.preset = "qwen2.5-7b"
  config.model.param_dtype = "bfloat16"
  config.model.dtype = "float32"
  # Unrolled under every table: with scanned layers the 7B's forward under tp_fsdp / fsdp needs
  # 27-36 GiB of temporaries (2x4 tp_fsdp: 41.9 GiB in all against 17.6 unrolled; estimated
  # 2026-11-25), so the default form for tables that gather weights (scanned) would skip them all.
  config.model.scan_layers = False
  config.verify = ConfigDict()
  # MESH:TABLE[:int8][:NAME=AXES,...] (jobs/verify_large/plan.py). The 7B's estimates (measured
  # peaks) in GiB, 2026-11-25 at d8f13f1: 1x1 bf16 15.9 (15.6), int8 11.7 (10.0); 1x8
  # tensor_parallel 16.3 (16.0); 2x4 tp_fsdp 17.5 (16.9); 4x2 tp_fsdp 20.2 as it is (each device
  # gathers half of every layer), 17.6 (16.5) with replicated activations (activation_batch=None:
  # XLA keeps the weights sharded and sums partial products); 8x1 fsdp int8 with replicated
  # activations 11.7 (9.4), bf16 fsdp 25.7 and 2x4 tensor_parallel int8 22.8 (two int8 copies plus
  # init temporaries) are listed to show the skip on this 24 GiB host.
  config.verify.combinations = ("1x8:tensor_parallel,"
                                "2x4:tp_fsdp,"
                                "4x2:tp_fsdp:activation_batch=None,"
                                "8x1:fsdp:int8:activation_batch=None,"
                                "2x4:tensor_parallel:int8,"
                                "8x1:fsdp")
  config.verify.batch_size = 8
  config.verify.seq_len = 16  # the forward batch [batch_size, seq_len]
  # Of the memory available when each run starts (MemAvailable; no swap here): the estimate
  # already bounds the run from above.
  config.verify.host_memory_fraction = 0.95
  config.verify.keep_dir = ""  # a directory to keep the logits in; "" = a temporary one, removed
  # The verdict, per position vs the 1x1 reference of the same weights (jobs/verify/verdict.py). Float32
  # compute over the same bf16 (or int8) values: runs differ only in the order of float32 sums.
  config.verify.rtol = 1e-3
  config.verify.atol = 1e-4
  config.verify.min_pcc = 0.99999
  config.verify.max_kl = 1e-5  # nats
  config.verify.top_k = 100
  config.verify.min_top_k_overlap = 0.98
  return config
