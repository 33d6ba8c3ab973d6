"""The fine-tuning job: model and data -> sharded train state -> train loop -> export.

    python main.py --config=configs/finetune.py [--config.checkpoint=DIR --config.train.data=FILE.jsonl]

Checkpointing (training/checkpointing.py) and LoRA (training/lora.py) plug in through the calls
in `_hooks`; without those modules the job trains every parameter and saves no train state.
"""

from __future__ import annotations

import functools
import importlib
import time
from typing import Any, Callable

import jax
from absl import logging
from ml_collections import ConfigDict

from qwen_logical.jobs.common import build
from qwen_logical.model.config import preset
from qwen_logical.sharding import distributed
from qwen_logical.sharding.mesh import parse_mesh_shape

_BUILTIN_VOCAB = 320  # the built-in byte tokenizer's 259 ids, rounded up so every table splits the rows


def devices_needed(config: ConfigDict) -> int:
  batch, model = parse_mesh_shape(config.mesh)
  return batch * model


def optional_module(name: str):
  """qwen_logical.training.<name>, or None when the module does not exist."""
  full = f"qwen_logical.training.{name}"
  try:
    return importlib.import_module(full)
  except ModuleNotFoundError as error:
    if error.name == full:
      return None
    raise


def open_tokenizer(config: ConfigDict):
  """--config.tokenizer, else the checkpoint's, else the built-in byte tokenizer (random model only)."""
  from qwen_logical.checkpoints.tokenizer import Tokenizer
  from qwen_logical.training.builtin_tokenizer import byte_tokenizer
  source = config.tokenizer or config.checkpoint
  return Tokenizer.from_directory(source) if source else byte_tokenizer()


def model_source(config: ConfigDict, tokenizer, gathers: bool) -> build.Source:
  """build.model_source, with the train's remat and (random model, built-in tokenizer) vocabulary."""
  config = config.copy_and_resolve_references()
  builtin = not (config.checkpoint or config.tokenizer or config.model.hf_config)
  if builtin and config.model.vocab_size is None:
    config.model.vocab_size = max(_BUILTIN_VOCAB, preset(config.model.preset).vocab_size)
  source = build.model_source(config, gathers)
  if source.config.quantization and config.train.lora_rank <= 0:
    raise build.JobError(f"--config.model.quantization={source.config.quantization} weights get no gradients, "
                         "so they cannot be fine-tuned in full; train LoRA adapters on the frozen int8 base "
                         "(--config.train.lora_rank=8), or drop the quantization.")
  if source.config.vocab_size < len(tokenizer):
    raise build.JobError(f"the model has {source.config.vocab_size} vocabulary rows but the tokenizer "
                         f"({tokenizer.source}) has {len(tokenizer)} tokens; set --config.model.vocab_size="
                         f"{len(tokenizer)} or more, or use the checkpoint's own tokenizer.")
  source.config = source.config.replace(remat=config.train.remat)
  if source.checkpoint is not None:
    source.checkpoint.config = source.config
  return source


def _hooks(config: ConfigDict, partitioner, params):
  """(trainable, frozen, combine, trainable_axes, trainable_shapes, merge) with or without LoRA."""
  if config.train.lora_rank > 0:
    lora = optional_module("lora")
    if lora is None:
      raise build.JobError("--config.train.lora_rank > 0 needs qwen_logical/training/lora.py, which this "
                           "installation lacks; set --config.train.lora_rank=0 for full fine-tuning.")
    trainable, frozen, combine, axes, shapes = lora.setup(partitioner, params, config.train)
    return trainable, frozen, combine, axes, shapes, functools.partial(lora.merge, partitioner)
  return params, None, None, None, None, lambda trainable, frozen: trainable


def _peak_flops(config: ConfigDict, mesh) -> float:
  from qwen_logical.training.loop import measure_peak_flops
  if config.train.peak_tflops > 0:
    return config.train.peak_tflops * 1e12 * mesh.devices.size
  peak = measure_peak_flops(mesh)
  logging.info("Peak FLOP/s of mesh %s measured with a float32 product: %.3g (for the MFU estimate; set "
               "--config.train.peak_tflops per device to use a data-sheet figure)", dict(mesh.shape), peak)
  return peak


def sample(config: ConfigDict, partitioner, params, tokenizer) -> str:
  """The tuned model's greedy answer to train.sample_prompt (chat template), "" when none is set."""
  if not config.train.sample_prompt:
    return ""
  from qwen_logical.inference.generate import generate
  prompt = tokenizer.encode_chat([{"role": "user", "content": config.train.sample_prompt}])
  result = generate(partitioner, params, [prompt], tokenizer=tokenizer, max_new_tokens=32)
  return result.texts[0]


def export(config: ConfigDict, partitioner, params) -> list[str]:
  from qwen_logical.checkpoints.export import export_checkpoint
  from qwen_logical.training.builtin_tokenizer import write_directory
  files = export_checkpoint(params, partitioner, config.train.output,
                            copy_files_from=config.tokenizer or config.checkpoint or None)
  if not (config.tokenizer or config.checkpoint) and distributed.is_main_process():
    files += write_directory(config.train.output)
  logging.info("Exported %d files to %s", len(files), config.train.output)
  return files


def _train(config: ConfigDict, partitioner, params, data) -> tuple[Any, Any, dict, float, Callable]:
  """(state after the loop, frozen, history, seconds, merge): the state built, restored, trained, saved."""
  from qwen_logical.training import loop, optimizer as opt, state as st, step as steps
  train = config.train
  settings = opt.OptimizerSettings.from_config(train)
  trainable, frozen, combine, axes, shapes, merge = _hooks(config, partitioner, params)
  optimizer = opt.make_optimizer(settings)
  fns = steps.make_train_step(partitioner, optimizer, combine=combine, grad_accum=train.grad_accum,
                              clip_norm=train.clip_norm, trainable_axes=axes, trainable_shapes=shapes)
  state = st.init_state(partitioner, optimizer, trainable, axes)
  del trainable
  checkpointing = optional_module("checkpointing") if train.checkpoint_dir else None
  hook_args = {"partitioner": partitioner, "trainable_axes": axes}
  if checkpointing is not None:
    state = checkpointing.maybe_restore(train, state, **hook_args)
  rows = train.batch_size // steps.data_shard(partitioner)[1]
  loop_settings = loop.LoopSettings(
      steps=train.steps, batch_size=train.batch_size, rows=rows, eval_every=train.eval_every, seed=train.seed,
      peak_flops=_peak_flops(config, partitioner.mesh), num_parameters=partitioner.config.active_parameters)
  start = time.perf_counter()
  state, history = loop.train_loop(
      fns, state, frozen, *data, loop_settings, learning_rate=opt.learning_rate_schedule(settings),
      after_step=(lambda s: checkpointing.save(train, s, **hook_args)) if checkpointing is not None else None)
  seconds = time.perf_counter() - start
  if checkpointing is not None:
    checkpointing.save(train, state, force=True, **hook_args)
  return state, frozen, history, seconds, merge


def main(config: ConfigDict) -> dict[str, Any]:
  """Runs the job; returns the JSON report {'ok', 'summary', 'history'}."""
  from qwen_logical.sharding.mesh import make_mesh
  from qwen_logical.sharding.rules import get_table
  from qwen_logical.training import inputs, optimizer as opt, step as steps

  train = config.train
  opt.OptimizerSettings.from_config(train)  # a bad setting fails before anything is built
  if train.get("checkpoint_keep", 3) < 0:
    raise build.JobError(f"--config.train.checkpoint_keep={train.checkpoint_keep} must be >= 0 (the newest "
                         "train-state checkpoints kept; 0 keeps all).")
  table = get_table(config.rules, config.rule_overrides)
  mesh = make_mesh(config.mesh)
  tokenizer = open_tokenizer(config)
  source = model_source(config, tokenizer, build.gathers_weights(table, dict(mesh.shape)))
  partitioner = build.make_partitioner(source, mesh, table)
  steps.check_batch_size(partitioner, train.batch_size, train.grad_accum)
  data = inputs.make_datasets(
      tokenizer, data=train.data, max_length=train.max_length, eval_fraction=train.eval_fraction,
      seed=train.seed, overlong=train.overlong, shard=steps.data_shard(partitioner), num_buckets=train.length_buckets)
  params, load_s = source.weights(partitioner)
  state, frozen, history, train_s, merge = _train(config, partitioner, params, data)
  del params
  tuned = merge(state.trainable, frozen)
  answer = sample(config, partitioner, tuned, tokenizer)
  last = history["train"][-1] if history["train"] else {}
  final_eval = history["eval"][-1]["eval_loss"] if history["eval"] else float("nan")
  say = distributed.printer()
  say(f"\nFine-tuned {train.steps} steps on {partitioner.name}: train loss {last.get('loss', float('nan')):.4f}, "
      f"eval loss {final_eval:.4f}, {train_s:.1f} s")
  if answer:
    say(f">>> {train.sample_prompt}\n{answer}")
  summary: dict[str, Any] = {
      "model": source.config.name, "mesh": config.mesh, "rules": table.name, "devices": int(mesh.devices.size),
      "backend": jax.default_backend(), "steps": int(jax.device_get(state.step)), "load_s": load_s,
      "train_s": train_s, "train_examples": len(data[0]), "eval_examples": len(data[1]),
      "final_train_loss": last.get("loss"), "final_eval_loss": final_eval, "sample": answer,
      "lora_rank": train.lora_rank, "head_plan": partitioner.layout.describe()}
  if train.output:
    summary["exported"] = export(config, partitioner, tuned)
  return {"ok": True, "summary": summary, "history": history}
