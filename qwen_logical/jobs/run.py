"""The run job: the model on one mesh under one rule table; sharded weights, the sharding report,
then text generation (with prompts) or a timed forward pass on a random batch; export optional."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np
from absl import logging
from ml_collections import ConfigDict

from qwen_logical.jobs.common import build
from qwen_logical.jobs.common.speculation import speculation_from
from qwen_logical.sharding import distributed
from qwen_logical.sharding.mesh import parse_mesh_shape


def devices_needed(config: ConfigDict) -> int:
  batch, model = parse_mesh_shape(config.mesh)
  return batch * model


def read_prompts(config: ConfigDict) -> list[str]:
  """--config.prompt, plus --config.prompts: a file (one prompt per line) or prompts joined by '||'."""
  prompts = [config.prompt] if config.prompt else []
  if config.prompts:
    if os.path.isfile(config.prompts):
      with open(config.prompts) as f:
        prompts += [line.rstrip("\n") for line in f if line.strip()]
    else:
      prompts += [p.strip() for p in config.prompts.split("||") if p.strip()]
  return prompts


@dataclasses.dataclass
class Request:
  """Prompts checked and encoded before any weights are built (a mistake costs no load time)."""

  prompts: list[str]
  inputs: list[list[int]]
  tokenizer: Any
  sampling: Any


def prepare_request(config: ConfigDict, prompts: list[str]) -> Request:
  """Sampling settings validated, the tokenizer opened, prompts encoded (chat template optional)."""
  from qwen_logical.checkpoints.tokenizer import Tokenizer
  from qwen_logical.inference.sampling import SamplingParams
  sampling = SamplingParams(config.temperature, config.top_k, config.top_p)
  source = config.tokenizer or config.checkpoint
  if not source:
    raise build.JobError("A text prompt needs a tokenizer: pass --config.checkpoint=DIR (with tokenizer.json) "
                         "or --config.tokenizer=DIR.")
  variables = chat_template_kwargs(config)
  tokenizer = Tokenizer.from_directory(source)
  if config.chat:
    inputs = [tokenizer.encode_chat([{"role": "user", "content": p}], **variables) for p in prompts]
  else:
    inputs = [tokenizer.encode(p) for p in prompts]
  return Request(prompts, inputs, tokenizer, sampling)


def chat_template_kwargs(config: ConfigDict) -> dict[str, Any]:
  """--config.chat_template_kwargs: variables of the chat template (with --config.chat=True), as JSON object
  text such as '{"enable_thinking": false}' (Qwen3: answer without thinking) or a mapping; "" or absent: none."""
  from qwen_logical.serving.openai_prompts import TEMPLATE_RESERVED
  value = config.get("chat_template_kwargs") or {}
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError as e:
      raise build.JobError(f"--config.chat_template_kwargs={value!r} is not JSON ({e}): pass an object, e.g. "
                           "'{\"enable_thinking\": false}'.") from None
  value = value.to_dict() if hasattr(value, "to_dict") else value
  if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
    raise build.JobError(f"--config.chat_template_kwargs={value!r}: pass a JSON object of template variables, "
                         "e.g. '{\"enable_thinking\": false}'.")
  taken = [k for k in value if k in TEMPLATE_RESERVED]
  if taken:
    raise build.JobError(f"--config.chat_template_kwargs sets `{taken[0]}`, which the chat template gets from the "
                         f"job itself (reserved: {', '.join(TEMPLATE_RESERVED)}): leave it out.")
  return value


def generate_text(config: ConfigDict, partitioner, params, request: Request) -> dict[str, Any]:
  """Generates (streaming the text when there is one prompt) and prints it; the summary fields."""
  from qwen_logical.inference.generate import generate
  say = distributed.printer()
  streamed = len(request.prompts) == 1

  def show(event):
    if streamed and event.texts and event.texts[0]:
      say(event.texts[0], end="")

  if streamed:
    say(f"\n>>> {request.prompts[0]}\n")
  s = request.sampling
  speculation = speculation_from(config, partitioner, request.tokenizer)
  result = generate(partitioner, params, request.inputs, tokenizer=request.tokenizer,
                    max_new_tokens=config.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                    top_p=s.top_p, seed=config.seed, callback=show, decode_steps=config.decode_steps or None,
                    speculation=speculation)
  if streamed:
    say()
  else:
    for prompt, text, reason in zip(request.prompts, result.texts, result.finish_reasons):
      say(f"\n>>> {prompt}\n{text}\n[{reason}]")
  t = result.timings
  say(f"\nGeneration: prefill {t.prefill_tokens_per_s:.1f} tokens/s, decode {t.decode_tokens_per_s:.1f} "
      f"tokens/s, compile {t.compile_s:.2f} s, {t.new_tokens} new tokens, {t.dispatches} decode dispatches "
      f"({t.dispatches_per_token:.3f} per token)")
  if t.speculative_rounds:
    say(f"Speculative ({config.speculative.method}, {config.speculative.num_tokens} drafted per round): acceptance "
        f"{t.acceptance_rate:.1%}, {t.tokens_per_round:.2f} tokens per round (target pass), decode "
        f"{t.decode_tokens_per_s:.1f} tokens/s")
  return {"texts": result.texts, "tokens": result.tokens, "finish_reasons": result.finish_reasons,
          "generation_timings": t.to_dict()}


def forward_sample(config: ConfigDict, partitioner, params, timings: dict[str, float]) -> dict[str, Any]:
  """The timed forward pass on a random [batch_size, seq_len] batch; prints and returns its summary."""
  cfg = partitioner.config
  tokens = np.random.RandomState(config.seed).randint(0, cfg.vocab_size, (config.batch_size, config.seq_len))
  forward = build.timed_forward(partitioner, params, tokens)
  timings.update(compile_s=forward.compile_s, run_s=forward.run_s)
  logits = forward.logits
  collectives = {k: v for k, v in forward.collectives.items() if v["count"]}
  say = distributed.printer()
  say(f"\nForward pass on a [{config.batch_size}, {config.seq_len}] batch: logits {tuple(logits.shape)} "
      f"sharded {forward.sharding}, mean {logits.mean():+.4f}, std {logits.std():.4f}")
  say(f"Collectives in the compiled forward: {collectives or 'none'}")
  return {"logits_shape": list(logits.shape), "logits_sharding": forward.sharding,
          "logits_mean": float(logits.mean()), "logits_std": float(logits.std()),
          "next_tokens": logits[:, -1].argmax(-1).tolist(), "collectives": collectives}


def export(config: ConfigDict, partitioner, params, timings: dict[str, float]) -> list[str]:
  from qwen_logical.checkpoints.export import export_checkpoint
  start = time.perf_counter()
  files = export_checkpoint(params, partitioner, config.export, copy_files_from=config.checkpoint or None)
  timings["export_s"] = time.perf_counter() - start
  logging.info("Exported %d files to %s in %.2f s", len(files), config.export, timings["export_s"])
  return files


def main(config: ConfigDict) -> dict[str, Any]:
  """Runs the job; returns the JSON report: {'ok', 'summary', 'sharding', 'layouts'}."""
  import jax
  from qwen_logical.inference.kv_cache import bytes_per_slot, cache_shape
  from qwen_logical.sharding.layout_draw import draw
  from qwen_logical.sharding.layout_view import sharding_view
  from qwen_logical.sharding.mesh import make_mesh
  from qwen_logical.sharding.report import sharding_report
  from qwen_logical.sharding.rules import get_table

  table = get_table(config.rules, config.rule_overrides)
  prompts = read_prompts(config)
  request = prepare_request(config, prompts) if prompts else None
  mesh = make_mesh(config.mesh)
  source = build.model_source(config, gathers=build.gathers_weights(table, dict(mesh.shape)))
  partitioner = build.make_partitioner(source, mesh, table)
  params, seconds = source.weights(partitioner)
  timings = {f"{source.kind}_s": seconds}
  report = sharding_report(partitioner, params)
  say = distributed.printer()
  say(report.format())
  layouts = sharding_view(partitioner, config.batch_size, config.seq_len, cache_shape(
      partitioner.config, partitioner.layout, config.batch_size, config.seq_len)).to_dict()
  if config.show_sharding:
    say("\n" + draw(layouts))

  cfg = partitioner.config
  per_slot = bytes_per_slot(cfg, partitioner.layout)
  say(f"KV cache: {per_slot:,} bytes per token slot ({cfg.kv_cache_dtype or cfg.dtype}"
      f"{', with a float16 scale per token and KV head' if cfg.kv_cache_dtype == 'int8' else ''}; "
      f"--config.model.kv_cache_dtype), all layers and devices together")
  summary: dict[str, Any] = {
      "kv_cache_bytes_per_slot": per_slot,
      "model": cfg.name, "num_layers": cfg.num_layers, "scan_layers": cfg.scan_layers, "mesh": config.mesh,
      "rules": table.name, "devices": int(mesh.devices.size), "backend": jax.default_backend(),
      "note": source.note, "head_plan": partitioner.layout.describe(), "timings": timings,
      "bytes_by_device": report.bytes_by_device, "replicated": report.replicated,
  }
  if request is not None:
    summary.update(generate_text(config, partitioner, params, request))
  else:
    summary.update(forward_sample(config, partitioner, params, timings))
  if config.export:
    summary["exported"] = export(config, partitioner, params, timings)
  say("Timings: " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in timings.items()))
  if source.note:
    say(f"NOTE: {source.note}")
  return {"ok": True, "summary": summary, "sharding": report.to_dict(), "layouts": layouts}
