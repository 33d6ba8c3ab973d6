"""HF checkpoints made with transformers' save_pretrained: load onto every mesh, export, bad input."""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import Qwen2ForCausalLM

from conftest import MESHES, mesh_of
from hf_reference import hf_logits, tiny_hf_model
from qwen_logical.checkpoints import safetensors_io
from qwen_logical.checkpoints.directory import open_checkpoint
from qwen_logical.checkpoints.export import export_checkpoint
from qwen_logical.checkpoints.loader import load_checkpoint
from qwen_logical.model.config import ConfigError
from qwen_logical.checkpoints.hf_names import CheckpointError
from qwen_logical.sharding.rules import get_table

KINDS = {  # name: (tied, torch dtype, max_shard_size or None for a single file)
    "untied-f32-sharded": (False, torch.float32, "60KB"),
    "tied-f32-single": (True, torch.float32, None),
    "untied-bf16-single": (False, torch.bfloat16, None),
    "tied-bf16-sharded": (True, torch.bfloat16, "40KB"),
}
TOKENS = np.random.RandomState(5).randint(0, 160, (8, 9))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
  """{kind: (directory, HF reference model in float32 with exactly the saved weights)}."""
  made = {}
  for kind, (tied, dtype, shard) in KINDS.items():
    directory = str(tmp_path_factory.mktemp(kind))
    model = tiny_hf_model(heads=14, kv_heads=2, hidden=112, tied=tied).to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {"max_shard_size": "1GB"}
    model.save_pretrained(directory, **kwargs)
    reference = Qwen2ForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    made[kind] = (directory, reference)
  return made


def test_checkpoint_layouts_are_what_they_claim(checkpoints):
  for kind, (directory, _) in checkpoints.items():
    files = os.listdir(directory)
    sharded = KINDS[kind][2] is not None
    assert ("model.safetensors.index.json" in files) == sharded, kind
    assert ("model.safetensors" in files) == (not sharded), kind
    assert open_checkpoint(directory).dtypes == {"float32" if "f32" in kind else "bfloat16"}


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_loaded_logits_match_transformers(checkpoints, kind, mesh):
  directory, reference = checkpoints[kind]
  params, config, part = load_checkpoint(directory, mesh_of(mesh), get_table("tensor_parallel"), progress=False)
  assert config.tie_word_embeddings == KINDS[kind][0]
  got = np.asarray(part.forward(params, TOKENS))
  np.testing.assert_allclose(got, hf_logits(reference, TOKENS), atol=1e-4, rtol=0)


def test_fsdp_and_unrolled_layers_load_too(checkpoints):
  directory, reference = checkpoints["untied-f32-sharded"]
  params, _, part = load_checkpoint(directory, mesh_of("2x4"), get_table("tp_fsdp"), scan_layers=False,
                                    progress=False)
  np.testing.assert_allclose(np.asarray(part.forward(params, TOKENS)), hf_logits(reference, TOKENS),
                             atol=1e-4, rtol=0)


def test_target_dtype_converts_on_load(checkpoints):
  directory, _ = checkpoints["untied-f32-sharded"]
  params, _, part = load_checkpoint(directory, mesh_of("1x8"), get_table("tensor_parallel"),
                                    param_dtype="bfloat16", progress=False)
  embedding = params["embed_tokens"]["embedding"]
  assert embedding.dtype == ml_dtypes.bfloat16
  source = open_checkpoint(directory).entries["model.embed_tokens.weight"].memmap()
  np.testing.assert_array_equal(np.asarray(embedding), np.asarray(source).astype(ml_dtypes.bfloat16))


def _tensors(directory):
  checkpoint = open_checkpoint(directory)
  return {name: np.asarray(entry.memmap()) for name, entry in checkpoint.entries.items()}


@pytest.mark.parametrize("kind,mesh", [("untied-f32-sharded", "1x8"), ("tied-bf16-sharded", "2x4"),
                                       ("untied-bf16-single", "4x2")])
def test_export_round_trip_is_bit_exact(checkpoints, tmp_path, kind, mesh):
  directory, reference = checkpoints[kind]
  params, config, part = load_checkpoint(directory, mesh_of(mesh), get_table("tensor_parallel"), progress=False)
  assert not part.layout.is_identity or mesh == "4x2"
  dtype = "float32" if "f32" in kind else "bfloat16"
  out = str(tmp_path / "export")
  files = export_checkpoint(params, part, out, dtype=dtype, max_shard_bytes=50_000, progress=False)
  assert os.path.join(out, "model.safetensors.index.json") in files
  original, exported = _tensors(directory), _tensors(out)
  assert set(original) == set(exported)
  for name in original:
    assert original[name].dtype == exported[name].dtype, name
    np.testing.assert_array_equal(original[name].view(np.uint8), exported[name].view(np.uint8), err_msg=name)
  reloaded = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
  np.testing.assert_array_equal(hf_logits(reloaded, TOKENS), hf_logits(reference, TOKENS))


# --- bad input ------------------------------------------------------------------------------------

@pytest.fixture
def broken(checkpoints, tmp_path):
  """A fresh copy of the sharded f32 checkpoint to damage."""
  target = str(tmp_path / "broken")
  shutil.copytree(checkpoints["untied-f32-sharded"][0], target)
  return target


def _index(directory):
  with open(os.path.join(directory, "model.safetensors.index.json")) as f:
    return json.load(f)


def _rewrite_shard(directory, tensor_name, change):
  """Rewrites the shard holding `tensor_name` after `change(dict_of_arrays)`; fixes the index."""
  index = _index(directory)
  file = index["weight_map"][tensor_name]
  path = os.path.join(directory, file)
  tensors = {n: np.array(e.memmap()) for n, e in safetensors_io.read_header(path).items()}
  change(tensors)
  safetensors_io.write_file(path, tensors)
  index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != file}
  index["weight_map"].update({n: file for n in tensors})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f)
  return path


def test_missing_tensor(broken):
  _rewrite_shard(broken, "model.layers.1.mlp.up_proj.weight",
                 lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) the config needs: model.layers.1.mlp.up_proj.weight"):
    open_checkpoint(broken)


def test_extra_tensor(broken):
  _rewrite_shard(broken, "model.norm.weight", lambda t: t.update({"model.vision.proj": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match=r"1 tensor\(s\) this Qwen2 model does not use: model.vision.proj"):
    open_checkpoint(broken)


def test_wrong_shape(broken):
  _rewrite_shard(broken, "model.layers.0.self_attn.k_proj.bias",
                 lambda t: t.update({"model.layers.0.self_attn.k_proj.bias": np.zeros(5, np.float32)}))
  with pytest.raises(CheckpointError, match=r"tensor model.layers.0.self_attn.k_proj.bias in model-\d+-of-\d+"
                     r".safetensors has shape \(5,\), expected \(16,\)"):
    open_checkpoint(broken)


def test_config_that_does_not_match_the_tensors(broken):
  config_path = os.path.join(broken, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  config["intermediate_size"] = 256
  with open(config_path, "w") as f:
    json.dump(config, f)
  with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight .* has shape \(224, 112\), expected \(256, 112\)"):
    open_checkpoint(broken)


def test_truncated_file(broken):
  file = _index(broken)["weight_map"]["model.embed_tokens.weight"]
  path = os.path.join(broken, file)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(CheckpointError, match=rf"{file} is truncated: tensor model.embed_tokens.weight ends at byte"):
    open_checkpoint(broken)


def test_corrupt_header(broken):
  file = _index(broken)["weight_map"]["model.norm.weight"]
  with open(os.path.join(broken, file), "r+b") as f:
    f.seek(8)
    f.write(b"\x00garbage")
  with pytest.raises(CheckpointError, match=rf"{file} is corrupt: its header is not valid JSON"):
    open_checkpoint(broken)


def test_index_names_a_missing_shard(broken):
  file = _index(broken)["weight_map"]["lm_head.weight"]
  os.remove(os.path.join(broken, file))
  with pytest.raises(CheckpointError, match=rf"names shard {file}, which is missing"):
    open_checkpoint(broken)


def test_index_places_tensor_in_wrong_file(broken):
  index = _index(broken)
  files = sorted(set(index["weight_map"].values()))
  index["weight_map"]["model.norm.weight"] = files[0] if index["weight_map"]["model.norm.weight"] != files[0] else files[1]
  with open(os.path.join(broken, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f)
  with pytest.raises(CheckpointError, match="places tensor model.norm.weight in"):
    open_checkpoint(broken)


def test_not_a_qwen2_config(broken):
  config_path = os.path.join(broken, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  config.update(model_type="llama", architectures=["LlamaForCausalLM"])
  with open(config_path, "w") as f:
    json.dump(config, f)
  with pytest.raises(ConfigError, match="model_type='llama'"):
    open_checkpoint(broken)


def test_directory_without_weights(tmp_path, broken):
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(os.path.join(broken, "config.json"), empty / "config.json")
  with pytest.raises(CheckpointError, match="has neither model.safetensors nor model.safetensors.index.json"):
    open_checkpoint(str(empty))
  with pytest.raises(CheckpointError, match="does not exist"):
    open_checkpoint(str(tmp_path / "nowhere"))


def test_float16_files_load_into_float32(checkpoints, tmp_path):
  directory, reference = checkpoints["untied-f32-sharded"]
  params, _, part = load_checkpoint(directory, mesh_of("1x8"), get_table("tensor_parallel"), progress=False)
  half = str(tmp_path / "f16")
  export_checkpoint(params, part, half, dtype="float16", progress=False)
  assert open_checkpoint(half).dtypes == {"float16"}
  again, _, part16 = load_checkpoint(half, mesh_of("2x4"), get_table("tp_fsdp"), progress=False)
  original = _tensors(directory)
  for name, value in _tensors(half).items():
    np.testing.assert_array_equal(value, original[name].astype(np.float16), err_msg=name)
  np.testing.assert_array_equal(np.asarray(again["lm_head"]),
                                np.asarray(params["lm_head"]).astype(np.float16).astype(np.float32))
  np.testing.assert_allclose(np.asarray(part16.forward(again, TOKENS)), hf_logits(reference, TOKENS), atol=2e-2)


def test_progress_bar_counts_tensors_and_bytes():
  import io
  from qwen_logical.common.progress import Progress

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  stream = Terminal()
  bar = Progress("Loading x", total_items=3, total_bytes=3 * 2**20, stream=stream)
  for _ in range(3):
    bar.update(1, 2**20)
  bar.close()
  text = stream.getvalue()
  assert "1/3 tensors, 1/3 MiB" in text and "3/3 tensors, 3/3 MiB" in text
  assert "[" + "#" * 30 + "]" in text and text.endswith("\n")


@pytest.mark.parametrize("file_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shards", [1, 2, 8])
def test_slice_reads_are_bit_exact(file_dtype, shards):
  """Every shard slice the loader reads equals slicing the whole converted, head-planned tensor."""
  from qwen_logical.model.config import preset
  from qwen_logical.model.head_layout import PADDING, plan_heads
  from qwen_logical.checkpoints.hf_names import tensor_specs

  config = preset("tiny")
  layout = plan_heads(config.num_heads, config.num_kv_heads, shards)
  np_dtype = safetensors_io.DTYPES[{"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[file_dtype]]
  rng = np.random.default_rng(shards)
  specs = [s for s in tensor_specs(config) if s.layer in (None, 0)]
  for spec in specs:
    hf = rng.standard_normal(spec.hf_shape).astype(np_dtype)
    whole = spec.view(hf)
    if spec.head_axis is not None:  # the plan by definition: layout head j holds source[j], or zeros
      source = layout.source(spec.head_kind)
      whole = np.take(whole, np.maximum(source, 0), axis=spec.head_axis)
      whole[(slice(None),) * spec.head_axis + (source == PADDING,)] = 0
    for target in (np.float32, ml_dtypes.bfloat16):
      expected = np.ascontiguousarray(whole.astype(target))
      axis = spec.head_axis if spec.head_axis is not None else 0
      size = expected.shape[axis] // (shards if expected.shape[axis] % shards == 0 else 1)
      for start in range(0, expected.shape[axis], size):
        index = (slice(None),) * axis + (slice(start, start + size),)
        got = spec.read(hf, layout, index, target)
        np.testing.assert_array_equal(got.view(np.uint8), np.ascontiguousarray(expected[index]).view(np.uint8),
                                      err_msg=f"{spec.hf_name} {index}")


def test_bfloat16_to_float32_is_bit_exact():
  """All 2**16 bfloat16 bit patterns (NaN payloads, infinities, subnormals) widen exactly."""
  from qwen_logical.checkpoints.hf_names import convert_into

  bits = np.arange(2**16, dtype=np.uint32)
  out = np.empty(bits.size, np.float32)
  convert_into(out, bits.astype(np.uint16).view(ml_dtypes.bfloat16))
  np.testing.assert_array_equal(out.view(np.uint32), bits << 16)
