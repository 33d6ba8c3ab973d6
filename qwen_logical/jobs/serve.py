"""The serve job: the model on one mesh under one rule table, served over an OpenAI-compatible HTTP API.

Process 0 builds the Engine and runs uvicorn; every other process of a multi-process job builds the
same Engine and follows process 0's decisions (`engine.follow()`). SIGTERM (or Ctrl-C) drains: new
requests get 503, running ones finish within --config.serve.drain_seconds, the process exits 0.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import uvicorn
from absl import logging
from ml_collections import ConfigDict

from qwen_logical.jobs import run
from qwen_logical.jobs.common import build, host_memory
from qwen_logical.jobs.common.speculation import speculation_from
from qwen_logical.sharding import distributed

devices_needed = run.devices_needed


def open_tokenizer(config: ConfigDict):
  """--config.tokenizer, else the checkpoint's tokenizer; None (token-id prompts only) when there is none."""
  from qwen_logical.checkpoints.tokenizer import Tokenizer
  from qwen_logical.checkpoints.tokenizer_files import TOKENIZER_FILE
  source = config.tokenizer or config.checkpoint
  if config.tokenizer or (source and os.path.exists(os.path.join(source, TOKENIZER_FILE))):
    return Tokenizer.from_directory(source)
  logging.warning("No tokenizer (%s): serving token-id prompts only (`prompt` as a list of ints on "
                  "/v1/completions, text answered as token_ids). For text and chat pass --config.tokenizer=DIR.",
                  f"no {TOKENIZER_FILE} in {source}" if source else "no checkpoint")
  return None


def reasoning_parser(config: ConfigDict) -> str:
  """--config.serve.reasoning_parser: "" (off) or "qwen3" (chat replies' <think> blocks as reasoning_content)."""
  from qwen_logical.serving.reasoning import check_parser
  try:
    return check_parser(config.serve.get("reasoning_parser", ""))
  except ValueError as e:
    raise build.JobError(str(e)) from None


def context_for(config: ConfigDict, model_config) -> int:
  """--config.serve.context, at most the model's max_position_embeddings (said in the log when capped)."""
  context = int(config.serve.context)
  if context < 2:
    raise build.JobError(f"--config.serve.context={context}: use at least 2 (a prompt token and a new one).")
  if context > model_config.max_position_embeddings:
    logging.info("Context %d capped to the model's max_position_embeddings %d", context,
                 model_config.max_position_embeddings)
    context = model_config.max_position_embeddings
  return context


def free_bytes_per_device(partitioner) -> int:
  """Memory a device has left for the KV cache once the weights are placed: on an accelerator what
  its allocator has not handed out, on CPU the host's available memory (shared by the simulated
  devices) split over them; --config.host_memory_fraction of either."""
  import jax
  device = partitioner.mesh.devices.flat[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  return host_memory.allowance_bytes(1.0) // jax.local_device_count()


def fit_slots(config: ConfigDict, partitioner, context: int) -> int:
  """--config.serve.slots, or (0) as many as fit the memory that is there; logs the cache's size.
  Raises JobError when the asked slots do not fit, naming the sizes and the fixes."""
  from qwen_logical.inference import kv_cache
  from qwen_logical.inference.programs import batch_multiple, slot_multiple
  cfg, layout = partitioner.config, partitioner.layout
  per_slot = kv_cache.bytes_per_slot(cfg, layout)
  devices = partitioner.mesh.devices.size
  free = int(free_bytes_per_device(partitioner) * config.host_memory_fraction) * devices
  length = -(-context // slot_multiple(partitioner)) * slot_multiple(partitioner)
  per_request = per_slot * length  # all devices together; the cache splits over them
  fits = free // per_request
  slots = int(config.serve.slots)
  if slots == 0:
    multiple = batch_multiple(partitioner)
    slots = min(64, fits // multiple * multiple)  # 0 when not even one fits: the error below
  dtype = cfg.kv_cache_dtype or f"{cfg.dtype} (the compute dtype)"
  if slots < 1 or slots > fits:
    raise build.JobError(
        f"--config.serve.slots={config.serve.slots} needs {host_memory.size_text(max(slots, 1) * per_request)} of KV "
        f"cache ({per_slot} bytes per token slot in {dtype}, context {context}) but "
        f"{host_memory.size_text(free)} is free after the weights ({fits} requests fit): use fewer slots, a "
        "shorter --config.serve.context, or --config.model.kv_cache_dtype=int8 (a quarter of float32's bytes).")
  logging.info("KV cache: %d slots x %d tokens, %d bytes per token slot (%s): %s of %s free", slots, length,
               per_slot, dtype, host_memory.size_text(slots * per_request), host_memory.size_text(free))
  return slots


def model_name(config: ConfigDict, model_config) -> str:
  if config.serve.model_name:
    return config.serve.model_name
  if config.checkpoint:
    return os.path.basename(os.path.normpath(config.checkpoint))
  return model_config.name


class DrainingServer(uvicorn.Server):
  """A uvicorn server whose SIGTERM / SIGINT drains the app before stopping; a second signal forces it.

  (uvicorn's own handler re-raises the signal once it has shut down, so the process would not exit 0.)
  """

  def __init__(self, uvicorn_config: uvicorn.Config, serving, drain_seconds: float):
    super().__init__(uvicorn_config)
    self.serving, self.drain_seconds = serving, drain_seconds

  def handle_exit(self, sig, frame):
    if self.serving.draining:
      self.should_exit = self.force_exit = True
      return
    logging.info("Signal %d: draining (up to %.0f s), then stopping", sig, self.drain_seconds)
    self.serving.draining = True
    threading.Thread(target=self._drain, name="drain", daemon=True).start()

  def _drain(self):
    try:
      self.serving.drain(self.drain_seconds)
    finally:
      self.should_exit = True


def main(config: ConfigDict) -> dict[str, Any]:
  """Builds the model and the Engine, serves until a signal; returns the JSON report."""
  from qwen_logical.serving.engine import Engine
  from qwen_logical.sharding.mesh import make_mesh
  from qwen_logical.sharding.rules import get_table

  if config.speculative.method == "draft":
    raise build.JobError("--config.speculative.method='draft': the server drafts by prompt lookup only "
                         "(method=prompt_lookup); main.py and the library draft with a model too.")
  table = get_table(config.rules, config.rule_overrides)
  reasoning_parser(config)  # a mistake costs no load time
  tokenizer = open_tokenizer(config)
  mesh = make_mesh(config.mesh)
  source = build.model_source(config, gathers=build.gathers_weights(table, dict(mesh.shape)))
  partitioner = build.make_partitioner(source, mesh, table)
  params, _ = source.weights(partitioner)
  s = config.serve
  context = context_for(config, partitioner.config)
  slots = fit_slots(config, partitioner, context)
  engine = Engine(partitioner, params, slots=slots, context=context,
                  queue_size=s.queue_size, decode_steps=config.decode_steps or None,
                  join_steps=s.join_steps or None, speculation=speculation_from(config, partitioner, tokenizer))
  if s.warmup:
    engine.warmup()
  if not distributed.is_main_process():
    engine.follow()
    return {"ok": True, "summary": {"served": False}}
  engine.start()
  try:
    summary = _serve(config, engine, partitioner.config, tokenizer, slots)
  finally:
    engine.stop(0.0)
  if source.note:
    logging.warning(source.note)
  return {"ok": True, "summary": summary}


def _serve(config: ConfigDict, engine, model_config, tokenizer, slots: int) -> dict[str, Any]:
  from qwen_logical.serving.guard import RequestLimits
  from qwen_logical.serving.http_app import create_app
  from qwen_logical.serving.openai_api import ServedModel, generation_defaults
  s = config.serve
  served = ServedModel(model_name(config, model_config), tokenizer, engine.context, model_config.vocab_size,
                       defaults=generation_defaults(tokenizer) if config.serve.generation_defaults else {},
                       reasoning_parser=reasoning_parser(config))
  if served.defaults:
    logging.info("Requests that leave them out get the checkpoint's generation_config defaults: %s "
                 "(--config.serve.generation_defaults=False: OpenAI's)", served.defaults)
  app = create_app(engine, served, limits=RequestLimits(int(s.max_body_bytes), float(s.read_timeout_s)))
  server = DrainingServer(uvicorn.Config(app, host=s.host, port=s.port, log_level="info", access_log=False,
                                         timeout_graceful_shutdown=5), app.state.serving, s.drain_seconds)
  logging.info("Serving %s on http://%s:%d/v1 (%d slots, context %d, queue %d%s)", served.name, s.host, s.port,
               slots, engine.context, s.queue_size, "" if tokenizer else ", token ids only")
  try:
    server.run()
  except SystemExit as e:  # uvicorn exits when it cannot listen (it logged why)
    raise build.JobError(f"Could not serve on {s.host}:{s.port} (see the log above; is the port in use?): "
                         "pass another --config.serve.port or --config.serve.host.") from e
  return {"model": served.name, "host": s.host, "port": s.port, "context": engine.context,
          "drained": app.state.serving.draining}
