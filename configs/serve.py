"""The OpenAI-compatible server: python main.py --config=configs/serve.py --config.checkpoint=DIR.

Mesh and rule table as every config (default 1x8 tensor_parallel). Without a checkpoint it serves
the random-weights default model; text then needs --config.tokenizer=DIR (else token-id prompts only).
"""

from ml_collections import ConfigDict

from configs import base


def get_config():
  config = base.get_config()
  config.job = "serve"
  config.serve = ConfigDict()
  config.serve.host = "127.0.0.1"
  config.serve.port = 8000
  config.serve.model_name = ""  # the `model` clients send; "" = the checkpoint directory's name, else the preset's
  config.serve.slots = 8  # requests decoded together (their KV cache must fit); 0 = as many as fit, at most 64
  config.serve.queue_size = 64  # requests waiting for a slot; one more gets HTTP 429
  config.serve.context = 2048  # prompt + new tokens per request (at most the model's max_position_embeddings)
  config.serve.max_body_bytes = 4 << 20  # a larger request body gets HTTP 413 (checked while it is read)
  config.serve.read_timeout_s = 30.0  # a request body must arrive whole within this of its headers, else HTTP 408
  config.serve.drain_seconds = 30.0  # on SIGTERM: time running requests get to finish
  # With a slot free a decode dispatch runs at most this many steps, so a new request starts within them
  # (all slots taken: --config.decode_steps per dispatch); 0 = decode_steps / 8.
  config.serve.join_steps = 0
  config.serve.warmup = False  # compile every program (each prompt bucket) before listening, not on first use
  # Requests that leave out temperature, top_p, top_k or repetition_penalty get the checkpoint's
  # generation_config.json values (as transformers' generate and vLLM); False: OpenAI's defaults.
  config.serve.generation_defaults = True
  # "qwen3": a chat reply's leading <think>...</think> block becomes the message's `reasoning_content` (streamed
  # as reasoning_content deltas) and the rest its `content` (Qwen3 thinking models); "" = off (Qwen2.5).
  config.serve.reasoning_parser = ""
  return config
