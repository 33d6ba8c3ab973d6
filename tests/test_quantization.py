"""Weights stored in bfloat16 or int8 (weight-only, one scale per output channel), computed in float32.

References: the float32 model holding the very values the stored weights stand for (the bf16
values widened, the int8 values dequantised), the 1x1 mesh, and HF transformers in float32 on
checkpoints written by save_pretrained.
"""

import os

import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import Qwen2ForCausalLM

from conftest import MESHES, mesh_of
from hf_reference import hf_logits, tiny_hf_model
from qwen_logical.checkpoints.directory import open_checkpoint
from qwen_logical.checkpoints.export import export_checkpoint
from qwen_logical.checkpoints.hf_names import flax_from_hf, hf_from_flax
from qwen_logical.checkpoints.loader import load_checkpoint
from qwen_logical.model.config import ConfigError, preset
from qwen_logical.model import projections
from qwen_logical.model.head_layout import PADDING, QUERY
from qwen_logical.sharding.collectives import count_collectives
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.report import sharding_report
from qwen_logical.sharding.rules import TABLES, get_table

CONFIG = preset("tiny").replace(initializer_range=0.1, scan_layers=True)
TOKENS = np.random.RandomState(7).randint(0, CONFIG.vocab_size, (8, 12))
HF_TOKENS = TOKENS % 160  # the checkpoints' vocabulary (hf_reference.tiny_hf_model)
STORAGE = {"bfloat16": dict(param_dtype="bfloat16"), "int8": dict(quantization="int8")}
KERNELS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head")
# |w - q * scale| <= scale / 2 in exact arithmetic; w / scale and q * scale each round once in float32.
ROUNDING = 2.0**-16


def _is_kernel(hf_name: str) -> bool:
  return hf_name.endswith(".weight") and any(k in hf_name for k in KERNELS)


def _relative(got, expected) -> float:
  return float(np.abs(got - expected).max() / np.abs(expected).max())


def _float32_twin(params, config, layout):
  """A float32 Partitioner on 1x1 holding exactly the values `params` stand for, and its logits."""
  tensors = {n: t.astype(np.float32) for n, t in hf_from_flax(params, config, layout).items()}
  plain = config.replace(param_dtype="float32", quantization="")
  part = Partitioner(plain, mesh_of("1x1"), get_table("tensor_parallel"))
  return np.asarray(part.forward(part.place(flax_from_hf(tensors, plain, part.layout)), TOKENS))


@pytest.mark.parametrize("tied,scan", [(False, True), (True, False)])
@pytest.mark.parametrize("storage", sorted(STORAGE))
def test_stored_model_equals_float32_model_of_its_values(storage, tied, scan):
  """int8: the model built from its dequantised weights; bf16: from its bf16 values widened."""
  config = CONFIG.replace(tie_word_embeddings=tied, scan_layers=scan, **STORAGE[storage])
  part = Partitioner(config, mesh_of("1x1"), get_table("tensor_parallel"))
  params = part.init(seed=0)
  kernel = params["layers" if scan else "layers_0"]["mlp"]["up_kernel"]
  assert kernel.dtype == (np.int8 if storage == "int8" else ml_dtypes.bfloat16)
  got = np.asarray(part.forward(params, TOKENS))
  expected = _float32_twin(params, config, part.layout)
  assert expected.std() > 0.5
  assert _relative(got, expected) <= (1e-4 if storage == "int8" else 1e-5)


# Every mesh and every table, each more than once (test_meshes runs the whole product in float32; what
# storage adds, blocks of converted rows and scales split with their rows, depends on each alone).
COVERING = [("1x8", "tensor_parallel"), ("2x4", "fsdp"), ("4x2", "tp_fsdp"), ("8x1", "data_parallel"),
            ("2x4", "tensor_parallel"), ("4x2", "fsdp"), ("1x8", "tp_fsdp")]


@pytest.mark.parametrize("mesh,table", COVERING)
@pytest.mark.parametrize("storage", sorted(STORAGE))
def test_each_mesh_and_table_gives_the_single_device_result(storage, mesh, table):
  # expert_parallel differs from tensor_parallel only in experts: test_qwen3 covers it with int8 storage.
  assert {m for m, _ in COVERING} == set(MESHES[1:]) and {t for _, t in COVERING} == set(TABLES) - {"expert_parallel"}
  config = CONFIG.replace(**STORAGE[storage])
  expected = _single_device(storage)
  part = Partitioner(config, mesh_of(mesh), get_table(table))
  got = np.asarray(part.forward(part.init(seed=0), TOKENS))
  assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


_REFERENCE: dict = {}


def _single_device(storage: str, tied: bool = False) -> np.ndarray:
  """The 1x1 logits (the vocab projection in one block: tiny's is far below projections._BLOCK_BYTES)."""
  if (storage, tied) not in _REFERENCE:
    config = CONFIG.replace(tie_word_embeddings=tied, **STORAGE[storage])
    part = Partitioner(config, mesh_of("1x1"), get_table("tensor_parallel"))
    _REFERENCE[storage, tied] = np.asarray(part.forward(part.init(seed=0), TOKENS))
  return _REFERENCE[storage, tied]


@pytest.mark.parametrize("mesh,table,tied", [("1x8", "tensor_parallel", True), ("4x2", "tp_fsdp", False)])
@pytest.mark.parametrize("storage", sorted(STORAGE))
def test_conversion_in_blocks_gives_the_whole_result(monkeypatch, storage, mesh, table, tied):
  """Stored bf16 / int8 kernels are converted in blocks of each device's rows (projections.dense);
  with blocks forced small (tiny's fit in one) the logits stay the 1x1 ones."""
  expected = _single_device(storage, tied)
  counts = []
  original = projections._num_blocks
  monkeypatch.setattr(projections, "_BLOCK_BYTES", 4096)
  monkeypatch.setattr(projections, "_MAX_BLOCKS", 8)  # each block is a dot to compile
  monkeypatch.setattr(projections, "_num_blocks", lambda *a: counts.append(original(*a)) or counts[-1])
  part = Partitioner(CONFIG.replace(tie_word_embeddings=tied, **STORAGE[storage]), mesh_of(mesh), get_table(table))
  got = np.asarray(part.forward(part.init(seed=0), TOKENS))
  assert max(counts) >= 8 and np.mean(np.array(counts) > 1) > 0.5  # most kernels in several blocks
  assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
  if table == "tensor_parallel":  # blocks are rows of each device's shard: nothing but all-reduces
    collectives = count_collectives(part.lower_forward(8, 12).compile().as_text())
    assert [kind for kind, c in collectives.items() if c["count"] and kind != "all-reduce"] == []


def test_int8_scales_are_sharded_like_their_rows_and_padded_heads_are_zero():
  part = Partitioner(CONFIG.replace(quantization="int8"), mesh_of("1x8"), get_table("tensor_parallel"))
  attention = part.init(seed=0)["layers"]["attention"]
  heads = part.layout.layout_num_heads
  # q scales (layers, heads, head_dim): 1/8 of the heads per device, like q's rows; o's (layers, embed) whole.
  assert {s.data.shape for s in attention["q_kernel_scale"].addressable_shards} == {(2, heads // 8, 8)}
  assert {s.data.shape for s in attention["o_kernel_scale"].addressable_shards} == {(2, CONFIG.hidden_size)}
  padded = part.layout.source(QUERY) == PADDING
  assert padded.any()
  q, scale = np.asarray(attention["q_kernel"]), np.asarray(attention["q_kernel_scale"])
  assert np.all(q[:, padded] == 0) and np.all(scale[:, padded] == 1)
  assert np.abs(q[:, ~padded]).max(axis=-1).min() == 127  # every real row uses the full int8 range


def test_report_counts_int8_bytes():
  config = CONFIG.replace(quantization="int8", param_dtype="bfloat16")
  report = sharding_report(Partitioner(config, mesh_of("1x1"), get_table("tensor_parallel")))
  rows = {r.path: r for r in report.rows}
  assert rows["lm_head"].bytes_total == CONFIG.vocab_size * CONFIG.hidden_size
  assert rows["lm_head_scale"].bytes_total == CONFIG.vocab_size * 4
  assert rows["layers/attention/q_bias"].bytes_total == 2 * CONFIG.num_layers * CONFIG.num_heads * CONFIG.head_dim
  assert report.total_bytes == report.canonical_bytes  # 1x1: the layout is the HF model's


def test_unknown_quantization_names_the_field_and_choices():
  with pytest.raises(ConfigError, match=r"ModelConfig.quantization='int4' is not supported; use one of \('', 'int8'\)"):
    CONFIG.replace(quantization="int4")


# --- real checkpoints ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{file dtype: (directory, HF model in float32 with exactly the saved weights)}; 14/2 heads."""
  made = {}
  for name, dtype, tied in (("float32", torch.float32, False), ("bfloat16", torch.bfloat16, True)):
    directory = str(tmp_path_factory.mktemp(name))
    tiny_hf_model(heads=14, kv_heads=2, hidden=112, tied=tied).to(dtype).save_pretrained(directory)
    made[name] = (directory, Qwen2ForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              attn_implementation="eager").eval())
  return made


def _files(directory) -> dict:
  return {n: np.asarray(e.memmap()) for n, e in open_checkpoint(directory).entries.items()}


@pytest.mark.parametrize("file_dtype,mesh,table", [("float32", "1x8", "tensor_parallel"),
                                                   ("bfloat16", "2x4", "tp_fsdp")])
def test_int8_load_error_is_at_most_half_a_scale(checkpoints, file_dtype, mesh, table):
  directory, _ = checkpoints[file_dtype]
  params, config, part = load_checkpoint(directory, mesh_of(mesh), get_table(table), quantization="int8",
                                         scan_layers=False, progress=False)
  assert not part.layout.is_identity
  loaded = hf_from_flax(params, config, part.layout)  # dequantised, head layout undone
  kernels = 0
  for name, original in _files(directory).items():
    w = original.astype(np.float32)
    if not _is_kernel(name):
      np.testing.assert_array_equal(loaded[name], w, err_msg=name)
      continue
    kernels += 1
    scale = np.abs(w).max(axis=1, keepdims=True) / np.float32(127)
    error = np.abs(loaded[name] - w)
    assert np.all(error <= scale * (0.5 + ROUNDING)), name
    assert (error / scale).max() > 0.4, name  # really rounded to a grid of scale
    np.testing.assert_allclose(loaded[name] / scale, np.round(loaded[name] / scale), atol=1e-4, err_msg=name)
  assert kernels == 2 * 7 + (1 if config.tie_word_embeddings else 2)
  head = params["embed_tokens"]["embedding_scale"] if config.tie_word_embeddings else params["lm_head_scale"]
  head_name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
  w = _files(directory)[head_name].astype(np.float32)
  np.testing.assert_array_equal(np.asarray(head), np.abs(w).max(axis=1) / np.float32(127))


@pytest.mark.parametrize("file_dtype", ["float32", "bfloat16"])
def test_int8_load_export_is_the_dequantised_model(checkpoints, tmp_path, file_dtype):
  """Export writes q * scale in float32; transformers on that checkpoint gives the int8 model's logits."""
  directory, _ = checkpoints[file_dtype]
  params, config, part = load_checkpoint(directory, mesh_of("1x8"), get_table("tensor_parallel"),
                                         quantization="int8", progress=False)
  out = str(tmp_path / "export")
  export_checkpoint(params, part, out, progress=False)
  assert open_checkpoint(out).dtypes == {"float32"}
  exported, loaded = _files(out), hf_from_flax(params, config, part.layout)
  assert set(exported) == set(loaded)
  for name, value in exported.items():
    np.testing.assert_array_equal(value, loaded[name], err_msg=name)
  dequantised = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
  got = np.asarray(part.forward(params, HF_TOKENS))
  expected = hf_logits(dequantised, HF_TOKENS)
  assert _relative(got, expected) <= 1e-4
  again, _, part2 = load_checkpoint(out, mesh_of("2x4"), get_table("fsdp"), quantization="int8", progress=False)
  for name, value in hf_from_flax(again, config, part2.layout).items():  # re-quantising q * scale changes nothing
    np.testing.assert_array_equal(value, loaded[name], err_msg=name)


@pytest.mark.parametrize("mesh", ["1x8", "4x2"])
def test_bfloat16_load_export_round_trip_is_bit_exact(checkpoints, tmp_path, mesh):
  directory, reference = checkpoints["bfloat16"]
  params, config, part = load_checkpoint(directory, mesh_of(mesh), get_table("tensor_parallel"),
                                         param_dtype="bfloat16", progress=False)
  assert params["embed_tokens"]["embedding"].dtype == ml_dtypes.bfloat16
  out = str(tmp_path / "export")
  export_checkpoint(params, part, out, progress=False)  # default dtype: the params' own
  original, exported = _files(directory), _files(out)
  assert set(original) == set(exported)
  for name, value in original.items():
    assert exported[name].dtype == ml_dtypes.bfloat16, name
    np.testing.assert_array_equal(exported[name].view(np.uint16), value.view(np.uint16), err_msg=name)
  got = np.asarray(part.forward(params, HF_TOKENS))
  assert _relative(got, hf_logits(reference, HF_TOKENS)) <= 1e-5
  with open(os.path.join(out, "config.json")) as f:
    text = f.read()
  assert '"torch_dtype": "bfloat16"' in text and "quantization" not in text
