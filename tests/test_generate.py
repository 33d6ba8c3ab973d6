"""Generation: greedy tokens equal transformers' generate, on every mesh and table, batched or alone;
stop ids, sampling, streaming, the KV cache's sharding, no recompilation per step, clear errors."""

import functools

import jax
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec

from conftest import compile_events, mesh_of
from hf_reference import hf_tensors, model_config, tiny_hf_model
from qwen_logical.model import axes as ax
from qwen_logical.inference import kv_cache
from qwen_logical.inference.generate import GenerationError, Generator, generate, prompt_bucket
from qwen_logical.checkpoints.hf_names import flax_from_hf
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import get_table
from qwen_logical.inference.sampling import SamplingError, SamplingParams, sample

NEW = 32
PAD = 0
PROMPTS = [np.random.RandomState(r).randint(1, 160, n).tolist() for r, n in enumerate((5, 13, 8))]


@functools.lru_cache(maxsize=None)
def hf_model(heads=14, kv_heads=2, vocab=160):
  return tiny_hf_model(heads=heads, kv_heads=kv_heads, hidden=heads * 8, vocab=vocab)


@functools.lru_cache(maxsize=None)
def setup(mesh="1x1", table="tensor_parallel", scan=True, heads=14, kv_heads=2):
  hf = hf_model(heads, kv_heads)
  cfg = model_config(hf, scan_layers=scan)
  part = Partitioner(cfg, mesh_of(mesh), get_table(table))
  return part, part.place(flax_from_hf(hf_tensors(hf), cfg, part.layout))


def hf_generate(prompts, max_new_tokens=NEW, eos=None, hf=None):
  """transformers' greedy generate on a left-padded batch -> int[B, <= max_new_tokens]."""
  hf = hf or hf_model()
  width = max(len(p) for p in prompts)
  ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=eos, pad_token_id=PAD)
  return out[:, width:].numpy()


@functools.lru_cache(maxsize=None)
def reference():
  """HF's tokens for each prompt alone (the expected tokens of every configuration below)."""
  return [hf_generate([p])[0].tolist() for p in PROMPTS]


def test_greedy_single_prompt_matches_transformers():
  part, params = setup()
  result = Generator(part).generate(params, PROMPTS[1], max_new_tokens=NEW)
  assert len(result.tokens[0]) == NEW
  assert result.tokens == [reference()[1]]
  assert len(set(reference()[1])) > 4, "reference too repetitive to make the comparison meaningful"
  assert result.finish_reasons == ["length"]


def test_greedy_batch_matches_transformers_and_each_prompt_alone():
  part, params = setup()
  result = generate(part, params, PROMPTS, max_new_tokens=NEW)
  np.testing.assert_array_equal(result.padded(PAD), hf_generate(PROMPTS))  # HF's own left-padded batch
  assert result.tokens == reference()  # each prompt alone
  assert result.timings.batch_shape == (4, 16, 64)  # 3 rows -> 4, prompt 13 -> 16, 16 + 32 -> 64 slots


@pytest.mark.parametrize("mesh,table,scan", [
    ("1x8", "tensor_parallel", True), ("2x4", "tensor_parallel", False), ("4x2", "tp_fsdp", True),
    ("8x1", "data_parallel", True), ("2x4", "fsdp", True), ("1x8", "data_parallel", False),
])
def test_every_mesh_and_table_gives_the_same_tokens(mesh, table, scan):
  part, params = setup(mesh, table, scan)
  result = Generator(part).generate(params, PROMPTS, max_new_tokens=NEW)
  assert result.tokens == reference()


def test_each_row_stops_at_its_own_stop_id():
  part, params = setup()
  ref = reference()
  stop = ref[0][6]  # row 0 stops at step 6 (at the latest); others wherever this id first comes
  result = Generator(part).generate(params, PROMPTS, max_new_tokens=NEW, stop_ids=[stop], pad_id=PAD)
  for row, expected in zip(result.tokens, ref):
    end = expected.index(stop) + 1 if stop in expected else NEW
    assert row == expected[:end]
  assert result.finish_reasons[0] == "stop" and len(result.tokens[0]) <= 7
  assert result.finish_reasons == ["stop" if stop in e else "length" for e in ref]
  np.testing.assert_array_equal(result.padded(PAD), hf_generate(PROMPTS, eos=stop))


def test_all_rows_stopping_ends_the_loop_early():
  part, params = setup()
  ref = reference()
  stops = [ref[r][2] for r in range(3)]
  result = Generator(part).generate(params, PROMPTS, max_new_tokens=NEW, stop_ids=stops)
  assert all(len(t) <= 3 for t in result.tokens)
  assert result.timings.decode_steps <= 2


def test_decode_compiles_once_per_bucket_not_per_step():
  part, params = setup("1x8", "tensor_parallel")
  gen = Generator(part)
  events, stop = compile_events()
  try:
    first = gen.generate(params, PROMPTS, max_new_tokens=NEW)
    assert first.timings.decode_steps == NEW - 1
    compiled_first = len(events)
    # Other prompt lengths in the same bucket, fewer new tokens in the same cache granule.
    again = gen.generate(params, [p[:4] for p in PROMPTS], max_new_tokens=20)
    compiled_again = len(events) - compiled_first
  finally:
    stop()
  assert first.timings.compilations == 3  # the empty cache, one prefill, one decode program
  assert 3 <= compiled_first <= 5, events  # the three programs (+ at most a tiny helper or two)
  assert first.timings.dispatches == -(-(NEW - 1) // gen.decode_steps)  # K decode steps per dispatch
  assert compiled_again == 0 and again.timings.compilations == 0 and again.timings.compile_s == 0
  assert again.timings.decode_steps == 19
  assert again.tokens == [hf_generate([p[:4]], 20)[0].tolist() for p in PROMPTS]


def test_cache_is_sharded_by_its_logical_names_and_donated():
  part, _ = setup("1x8", "tensor_parallel")
  layout = part.layout
  shapes = kv_cache.cache_shapes(part.config, layout, 8, 64)
  assert shapes["layers"]["k"].shape == (part.config.num_layers, 8, layout.layout_num_kv_heads, 64, 8)
  sharding = kv_cache.cache_shardings(part, 8, 64)["layers"]["k"]
  assert sharding.spec == PartitionSpec(None, "batch", "model", None, None)  # 8 layout KV heads over model
  assert sharding.shard_shape(shapes["layers"]["k"].shape)[2] == 1
  hlo = Generator(part).programs(8, 64).decode(8).as_text()
  assert "input_output_alias" in hlo  # the donated cache is updated in place
  assert kv_cache.cache_logical_axes(part.config)["layers"]["v"] == (
      ax.LAYERS, ax.CACHE_BATCH, ax.CACHE_KV_HEADS, ax.CACHE_SEQUENCE, ax.CACHE_HEAD_DIM)


def test_streaming_yields_each_step_and_the_result():
  part, params = setup()
  seen = []
  result = Generator(part).generate(params, PROMPTS[:2], max_new_tokens=8, callback=seen.append)
  assert [e.step for e in seen] == list(range(8))
  assert [[e.tokens[r] for e in seen] for r in range(2)] == result.tokens
  stream = Generator(part).stream(params, PROMPTS[:2], max_new_tokens=8)
  events = list(stream)
  assert [e.tokens for e in events] == [e.tokens for e in seen]
  assert stream.result.tokens == result.tokens
  t = result.timings
  assert t.prefill_s > 0 and t.decode_s > 0 and t.prompt_tokens == 18 and t.new_tokens == 16
  assert t.decode_steps == 7 and t.decode_tokens == 14 and t.to_dict()["decode_tokens_per_s"] > 0


def test_text_prompts_and_streamed_text(tmp_path):
  import tokenizer_files
  from qwen_logical.checkpoints.tokenizer import Tokenizer
  tokenizer_files.write_tokenizer_dir(tmp_path)
  tok = Tokenizer.from_directory(tmp_path)
  hf = tiny_hf_model(heads=4, kv_heads=2, hidden=32, vocab=768, seed=3)
  cfg = model_config(hf)
  part = Partitioner(cfg, mesh_of("1x1"), get_table("tensor_parallel"))
  params = part.place(flax_from_hf(hf_tensors(hf), cfg, part.layout))
  texts = ["Hello world", "The quick brown fox"]
  stream = Generator(part).stream(params, texts, tokenizer=tok, max_new_tokens=12, stop_ids=[])
  deltas = ["", ""]
  for event in stream:
    for r, piece in enumerate(event.texts):
      deltas[r] += piece or ""
  result = stream.result
  assert result.prompt_tokens == [tok.encode(t) for t in texts]
  assert result.texts == [tok.decode(t, skip_special_tokens=True) for t in result.tokens]
  assert deltas == result.texts
  assert result.tokens == [hf_generate([tok.encode(t)], 12, hf=hf)[0].tolist() for t in texts]
  # The tokenizer's stop ids (<|im_end|>, <|endoftext|>) apply by default.
  default = Generator(part).generate(params, texts, tokenizer=tok, max_new_tokens=12)
  for row, full in zip(default.tokens, result.tokens):
    ends = [i for i, t in enumerate(full) if t in tok.stop_ids]
    assert row == (full[:ends[0] + 1] if ends else full)


def test_sampling_settings():
  part, params = setup()
  gen = Generator(part)
  greedy = reference()
  assert gen.generate(params, PROMPTS, max_new_tokens=NEW, temperature=1.0, top_k=1).tokens == greedy
  assert gen.generate(params, PROMPTS, max_new_tokens=NEW, temperature=0.8, top_p=1e-6).tokens == greedy
  a = gen.generate(params, PROMPTS, max_new_tokens=16, temperature=1.5, seed=7).tokens
  b = gen.generate(params, PROMPTS, max_new_tokens=16, temperature=1.5, seed=7).tokens
  c = gen.generate(params, PROMPTS, max_new_tokens=16, temperature=1.5, seed=8).tokens
  assert a == b and a != c and a != [g[:16] for g in greedy]
  # Row r draws from (seed, r, step): the first prompt alone samples what it samples in the batch.
  assert gen.generate(params, PROMPTS[:1], max_new_tokens=16, temperature=1.5, seed=7).tokens[0] == a[0]


def test_sampler_distribution_top_k_and_top_p():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)).repeat(4000, 0)
  keys = jax.random.split(jax.random.key(0), 4000)

  def freq(params):
    return np.bincount(np.asarray(sample(logits, keys, params)), minlength=4) / 4000

  np.testing.assert_allclose(freq(SamplingParams(1.0)), [0.5, 0.3, 0.15, 0.05], atol=0.03)
  np.testing.assert_allclose(freq(SamplingParams(1.0, top_k=2)), [0.625, 0.375, 0, 0], atol=0.03)
  np.testing.assert_allclose(freq(SamplingParams(1.0, top_p=0.7)), [0.625, 0.375, 0, 0], atol=0.03)
  np.testing.assert_allclose(freq(SamplingParams(1.0, top_p=0.85)), [0.5 / .95, 0.3 / .95, 0.15 / .95, 0],
                             atol=0.03)
  assert freq(SamplingParams(0.0))[0] == 1.0
  cold = freq(SamplingParams(0.25))  # p^4, renormalised
  np.testing.assert_allclose(cold[:2], np.array([0.5, 0.3]) ** 4 / (0.5 ** 4 + 0.3 ** 4 + 0.15 ** 4 + 0.05 ** 4),
                             atol=0.03)


def test_clear_errors():
  part, params = setup()
  gen = Generator(part)  # context: the HF config's max_position_embeddings = 128
  with pytest.raises(GenerationError, match=r"Prompt 1 has 130 tokens, longer than the context of 128"):
    gen.generate(params, [[1, 2], [3] * 130])
  with pytest.raises(GenerationError, match=r"plus max_new_tokens=40 is 140 tokens.*max_new_tokens <= 28"):
    gen.generate(params, [[3] * 100], max_new_tokens=40)
  with pytest.raises(GenerationError, match=r"Prompt 0 is empty"):
    gen.generate(params, [[], [1, 2]])
  with pytest.raises(GenerationError, match=r"outside \[0, 160\)"):
    gen.generate(params, [[1, 999]])
  with pytest.raises(GenerationError, match=r"max_new_tokens=0 must be a positive integer"):
    gen.generate(params, [[1, 2]], max_new_tokens=0)
  with pytest.raises(GenerationError, match=r"Text prompts need a tokenizer"):
    gen.generate(params, "hello")
  for kwargs, message in [(dict(top_p=0.0), r"top_p=0.0 is invalid: it must be in \(0, 1\]"),
                          (dict(top_p=1.5), r"top_p=1.5 is invalid"),
                          (dict(temperature=-0.5), r"temperature=-0.5 is invalid"),
                          (dict(temperature=float("nan")), r"temperature=nan is invalid"),
                          (dict(top_k=-1), r"top_k=-1 is invalid"),
                          (dict(top_k=1000, temperature=1.0), r"top_k=1000 exceeds the vocabulary size 160")]:
    with pytest.raises(SamplingError, match=message):
      gen.generate(params, [[1, 2]], **kwargs)
  assert gen.compilations == 0  # every error comes before anything compiles


def test_prompt_buckets():
  assert [prompt_bucket(n) for n in (1, 16, 17, 100, 512, 513, 1025)] == [16, 16, 32, 128, 512, 1024, 1536]
