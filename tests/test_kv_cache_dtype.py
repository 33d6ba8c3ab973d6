"""The KV cache's storage: int8 (a float16 scale per token and KV head) and bfloat16 caches take their
share of float32's bytes, int8 gives the same tokens on sharded meshes, and both predict what the float cache predicts
(teacher-forced, on a model whose logits look real); speculative checks read them as decode does."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import mesh_of
from hf_reference import hf_tensors, model_config, varied_text_model
from qwen_logical.checkpoints.hf_names import flax_from_hf
from qwen_logical.inference import kv_cache
from qwen_logical.inference.generate import Generator
from qwen_logical.inference.speculative import Speculation
from qwen_logical.model.config import ConfigError
from qwen_logical.model.model import Mode
from qwen_logical.sharding.device_memory import device_memory
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import get_table

PROMPTS = [np.random.RandomState(r).randint(1, 256, n).tolist() for r, n in enumerate((5, 13, 8, 30))]
NEW = 48


@functools.lru_cache(maxsize=None)
def model(kv_dtype, mesh="1x1", table="tensor_parallel"):
  hf = varied_text_model(seed=3)
  cfg = model_config(hf, kv_cache_dtype=kv_dtype, scan_layers=table == "fsdp")
  part = Partitioner(cfg, mesh_of(mesh), get_table(table))
  return part, part.place(flax_from_hf(hf_tensors(hf), cfg, part.layout))


@functools.lru_cache(maxsize=None)
def greedy(kv_dtype, mesh="1x1", table="tensor_parallel"):
  part, params = model(kv_dtype, mesh, table)
  return Generator(part, decode_steps=8).generate(params, PROMPTS, max_new_tokens=NEW).tokens


def test_cache_bytes_and_arrays():
  part, _ = model("int8")
  cfg, layout = part.config, part.layout
  shapes = kv_cache.cache_shapes(cfg, layout, 4, 64)["layers_0"]
  assert {k: str(v.dtype) for k, v in shapes.items()} == {"k": "int8", "v": "int8", "k_scale": "float16",
                                                          "v_scale": "float16"}
  assert shapes["k_scale"].shape == shapes["k"].shape[:-1]
  per_slot = {d: kv_cache.bytes_per_slot(model(d)[0].config, layout) for d in ("", "bfloat16", "int8")}
  d = cfg.head_dim
  assert per_slot[""] == 2 * cfg.num_layers * layout.layout_num_kv_heads * d * 4
  assert per_slot["bfloat16"] * 2 == per_slot[""]
  assert per_slot["int8"] * 4 * d == per_slot[""] * (d + 2)  # int8 plus a 2-byte scale per head_dim values
  # the per-device memory report counts the same bytes
  part8, _ = model("int8", "2x4", "tp_fsdp")
  shape = kv_cache.cache_shape(part8.config, part8.layout, 4, 64)
  memory, _ = device_memory(part8, 4, 64, shape)
  assert sum(m.kv_cache for m in memory) == kv_cache.cache_bytes(part8.config, part8.layout, 4, 64)


@pytest.mark.parametrize("mesh,table", [("2x4", "tp_fsdp"), ("4x2", "fsdp")])
def test_sharded_int8_caches_give_the_single_device_tokens(mesh, table):
  """Heads split over 'model' with the scales beside them (2x4), rows over 'batch' and scanned layers (4x2)."""
  assert greedy("int8", mesh, table) == greedy("int8")


def test_int8_cache_predicts_what_the_float_cache_predicts():
  """Teacher-forced on the float cache's greedy text: each next token from an int8 cache (the prompt
  prefilled, then all 48 tokens decoded at once, reading the quantized keys and values)."""
  float_tokens = greedy("")
  assert np.mean([a == b for x, y in zip(float_tokens, greedy("bfloat16")) for a, b in zip(x, y)]) >= 0.95
  part, params = model("int8")
  slots = 128
  ones = jnp.ones((1, slots), jnp.int32)

  def next_tokens(params, prompt, new):
    cache = kv_cache.zeros_in_jit(part, 1, slots)
    _, cache = part.model.apply({"params": params}, prompt, ones, mode=Mode.PREFILL, cache=cache)
    feed = jnp.concatenate([prompt[:, -1:], new[:, :-1]], axis=1)
    logits, _ = part.model.apply({"params": params}, feed, ones, mode=Mode.DECODE, cache=cache,
                                 cache_index=prompt.shape[1] - 1)
    return jnp.argmax(logits[0], axis=-1)

  program = part.program(next_tokens, name="teacher_forced")
  agree = []
  for prompt, new in zip(PROMPTS, float_tokens):
    agree += list(np.asarray(program(params, jnp.array([prompt]), jnp.array([new]))) == np.array(new))
  assert np.mean(agree) >= 0.95, np.mean(agree)


def test_speculative_checks_read_an_int8_cache_as_decode_does():
  part, params = model("int8")
  prompts = [p * 3 for p in PROMPTS[:2]]
  plain = Generator(part, decode_steps=4).generate(params, prompts, max_new_tokens=24).tokens
  spec = Generator(part, decode_steps=4, speculation=Speculation("prompt_lookup", 3, 1)).generate(
      params, prompts, max_new_tokens=24)
  assert spec.tokens == plain and spec.timings.drafted > 0


def test_unknown_cache_dtype_is_named():
  with pytest.raises(ConfigError, match="kv_cache_dtype='int4'.*'int8'"):
    model_config(varied_text_model(seed=3), kv_cache_dtype="int4")


def test_serving_fits_its_slots_in_the_free_memory(monkeypatch):
  from ml_collections import ConfigDict
  from qwen_logical.jobs import serve
  from qwen_logical.jobs.common.build import JobError
  part, _ = model("int8")
  per_request = kv_cache.bytes_per_slot(part.config, part.layout) * 64
  monkeypatch.setattr(serve, "free_bytes_per_device", lambda p: int(per_request * 3.5 / 0.9))
  config = ConfigDict({"serve": {"slots": 0}, "host_memory_fraction": 0.9})
  assert serve.fit_slots(config, part, 64) == 3
  config.serve.slots = 8
  with pytest.raises(JobError, match=r"slots=8 needs .* of KV cache \(80 bytes per token slot in int8.*3 requests fit.*"
                                     r"kv_cache_dtype=int8"):
    serve.fit_slots(config, part, 64)
