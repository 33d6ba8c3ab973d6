"""Qwen3 and Qwen3-MoE: HF checkpoints load into shards, give transformers' logits and greedy tokens on every
mesh and rule table (expert-parallel ones included), and export back bit-exact."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import MESHES, mesh_of
from qwen3_reference import FAMILIES, checkpoint, checkpoint_tensors, hf_greedy, hf_logits, hf_model
from qwen_logical.checkpoints.export import export_checkpoint
from qwen_logical.checkpoints.hf_names import flax_from_hf
from qwen_logical.checkpoints.loader import load_checkpoint
from qwen_logical.inference.generate import generate
from qwen_logical.model.config import preset
from qwen_logical.model.hf_config import from_hf_config, to_hf_config
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import TABLES, RuleError, get_table

TOLERANCE = 1e-4
TOKENS = np.random.RandomState(5).randint(1, 256, (8, 12))
PROMPTS = [np.random.RandomState(10 + r).randint(1, 256, n).tolist() for r, n in enumerate((5, 9, 3, 12))]
NEW = 8
_HF: dict = {}


def _reference(family):
  """(transformers' logits for TOKENS, its greedy tokens for PROMPTS), once per family."""
  if family not in _HF:
    _, model = checkpoint(family)
    _HF[family] = hf_logits(model, TOKENS), hf_greedy(model, PROMPTS, NEW)
  return _HF[family]


def test_the_reference_models_look_real():
  for family in FAMILIES:
    logits, _ = _reference(family)
    assert logits.std() >= 3 and np.abs(logits).max() >= 25, family


# Every mesh and every table, the expert layouts more than once: experts over every device, over 'model'
# only, over 'batch' with each expert's hidden dimension over 'model', and inside tensor parallelism.
# (For the dense model expert_parallel is tensor_parallel; 2x4 expert_parallel runs in the serving and
# speculative tests below.)
COMBINATIONS = [
    ("qwen3", "1x1", "tensor_parallel", ""), ("qwen3", "1x8", "tensor_parallel", ""), ("qwen3", "2x4", "tp_fsdp", ""),
    ("qwen3", "4x2", "fsdp", ""), ("qwen3", "8x1", "data_parallel", ""),
    ("qwen3_moe", "1x1", "tensor_parallel", ""), ("qwen3_moe", "1x8", "expert_parallel", ""),
    ("qwen3_moe", "4x2", "expert_parallel", ""),
    ("qwen3_moe", "8x1", "expert_parallel", ""), ("qwen3_moe", "2x4", "tensor_parallel", ""),
    ("qwen3_moe", "4x2", "tp_fsdp", ""), ("qwen3_moe", "1x8", "fsdp", ""), ("qwen3_moe", "8x1", "data_parallel", ""),
    ("qwen3_moe", "2x4", "expert_parallel", "expert=model"),
    ("qwen3_moe", "4x2", "expert_parallel", "expert=batch,expert_mlp=model"),
]


# Greedy generation (prefill and cached decode) on a covering subset: every mesh and every table per family,
# and each expert layout; the serving and speculative tests below add 2x4 expert_parallel, and the
# verification suite on a Qwen3-MoE checkpoint runs the whole grid (docs/verification.md).
GREEDY = {("qwen3", "1x8", "tensor_parallel", ""), ("qwen3", "2x4", "tp_fsdp", ""), ("qwen3", "4x2", "fsdp", ""),
          ("qwen3", "8x1", "data_parallel", ""), ("qwen3_moe", "1x1", "tensor_parallel", ""),
          ("qwen3_moe", "1x8", "fsdp", ""), ("qwen3_moe", "4x2", "tp_fsdp", ""),
          ("qwen3_moe", "8x1", "expert_parallel", ""), ("qwen3_moe", "8x1", "data_parallel", ""),
          ("qwen3_moe", "2x4", "expert_parallel", "expert=model"),
          ("qwen3_moe", "4x2", "expert_parallel", "expert=batch,expert_mlp=model")}


@pytest.mark.parametrize("family,mesh,table,overrides", COMBINATIONS)
def test_logits_and_greedy_tokens_equal_transformers(family, mesh, table, overrides):
  directory, _ = checkpoint(family)
  rules = get_table(table, overrides)
  params, cfg, part = load_checkpoint(directory, mesh_of(mesh), rules, scan_layers=mesh in ("2x4", "8x1"),
                                      progress=False)
  assert cfg.model_type == family
  expected_logits, expected_tokens = _reference(family)
  np.testing.assert_allclose(np.asarray(part.forward(params, TOKENS)), expected_logits, atol=TOLERANCE, rtol=0)
  if (family, mesh, table, overrides) in GREEDY:
    assert generate(part, params, PROMPTS, max_new_tokens=NEW).tokens == expected_tokens


def test_greedy_runs_cover_every_mesh_and_table():
  for family in FAMILIES:  # (a dense model's expert_parallel is tensor_parallel)
    runs = [c for c in GREEDY if c[0] == family]
    assert {mesh for _, mesh, _, _ in runs} >= set(MESHES) - {"1x1"}
    assert {table for _, _, table, _ in runs} == set(TABLES) - ({"expert_parallel"} if family == "qwen3" else set())
  assert GREEDY <= set(COMBINATIONS)


def _expert_shards(params, mesh_devices: int):
  kernel = params["layers_0"]["mlp"]["gate_kernel"]
  return {shard.data.shape[0] for shard in kernel.addressable_shards}, kernel.shape[0] // mesh_devices


@pytest.mark.parametrize("overrides,split", [("", 8), ("expert=model", 4), ("expert=batch,expert_mlp=model", 2)])
def test_experts_are_really_split(overrides, split):
  directory, _ = checkpoint("qwen3_moe")
  params, cfg, part = load_checkpoint(directory, mesh_of("2x4"), get_table("expert_parallel", overrides),
                                      progress=False)
  gate = params["layers_0"]["mlp"]["gate_kernel"]  # (expert, expert_mlp, embed)
  shapes = {shard.data.shape for shard in gate.addressable_shards}
  hidden = cfg.moe_intermediate_size // (4 if "expert_mlp=model" in overrides else 1)
  assert shapes == {(cfg.num_experts // split, hidden, cfg.hidden_size)}


def test_an_expert_count_the_shards_do_not_divide_is_a_clear_error():
  six = preset("tiny-qwen3-moe").replace(num_experts=6)
  with pytest.raises(RuleError, match=r"\(expert\) has size 6, not divisible by the 8 devices"):
    Partitioner(six, mesh_of("1x8"), get_table("expert_parallel"))
  with pytest.raises(RuleError, match="mesh axis 'model' is used twice"):
    Partitioner(preset("tiny-qwen3-moe"), mesh_of("2x4"), get_table("expert_parallel", "expert=model,expert_mlp=model"))


@pytest.mark.parametrize("family,mesh,table", [("qwen3", "1x8", "tensor_parallel"),
                                                ("qwen3_moe", "2x4", "expert_parallel")])
def test_export_round_trips_bit_exact_and_transformers_loads_it(family, mesh, table, tmp_path):
  from transformers import AutoModelForCausalLM
  directory, _ = checkpoint(family)
  params, cfg, part = load_checkpoint(directory, mesh_of(mesh), get_table(table), scan_layers=True, progress=False)
  export_checkpoint(params, part, str(tmp_path), progress=False)
  original = load_file(os.path.join(directory, "model.safetensors"))
  exported = load_file(tmp_path / "model.safetensors")
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["model_type"] == family
  model = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  with torch.no_grad():
    np.testing.assert_array_equal(model(torch.tensor(TOKENS)).logits.numpy(), _reference(family)[0])


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1e6}


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_yarn_logits_equal_transformers_beyond_the_original_context(family):
  """Positions up to 3x past original_max_position_embeddings; the plain rotary embedding would be far off."""
  model = hf_model(family, rope_parameters=YARN, max_position_embeddings=128)
  cfg = from_hf_config(model.config.to_dict())
  assert dict(cfg.rope_scaling)["factor"] == 4.0
  assert from_hf_config(to_hf_config(cfg)).rope_scaling == cfg.rope_scaling  # export keeps it
  tokens = np.random.RandomState(7).randint(1, 256, (2, 100))
  expected = hf_logits(model, tokens)
  tensors = checkpoint_tensors(model)
  for mesh, table, scaling in (("1x1", "tensor_parallel", cfg.rope_scaling), ("2x4", "tp_fsdp", cfg.rope_scaling),
                               ("1x1", "tensor_parallel", ())):
    config = cfg.replace(rope_scaling=scaling)
    part = Partitioner(config, mesh_of(mesh), get_table(table))
    got = np.asarray(part.forward(part.place(flax_from_hf(tensors, config, part.layout)), tokens))
    error = np.abs(got[:, 32:] - expected[:, 32:]).max()
    assert error <= TOLERANCE if scaling else error > 1.0, (mesh, scaling, error)


def test_unnormalised_expert_weights_equal_transformers():
  """norm_topk_prob false (transformers' default): the chosen experts weigh their softmax probabilities."""
  model = hf_model("qwen3_moe", norm_topk_prob=False, num_experts_per_tok=3)
  cfg = from_hf_config(model.config.to_dict())
  assert not cfg.norm_topk_prob and cfg.num_experts_per_tok == 3
  expected = hf_logits(model, TOKENS)
  for mesh in ("1x1", "2x4"):
    part = Partitioner(cfg, mesh_of(mesh), get_table("expert_parallel"))
    got = np.asarray(part.forward(part.place(flax_from_hf(checkpoint_tensors(model), cfg, part.layout)), TOKENS))
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_int8_experts_on_every_expert_layout_give_the_single_device_result(tmp_path):
  directory, _ = checkpoint("qwen3_moe")
  single, _, part = load_checkpoint(directory, mesh_of("1x1"), get_table("tensor_parallel"), quantization="int8",
                                    progress=False)
  assert single["layers_0"]["mlp"]["gate_kernel"].dtype == np.int8
  expected = np.asarray(part.forward(single, TOKENS))
  # int8 rounding moves a token near a routing tie to another expert: compare predictions, not every logit.
  float32 = _reference("qwen3_moe")[0]
  assert (expected.argmax(-1) == float32.argmax(-1)).mean() >= 0.9
  for mesh, overrides in (("1x8", ""), ("4x2", "expert=batch,expert_mlp=model")):
    params, _, split = load_checkpoint(directory, mesh_of(mesh), get_table("expert_parallel", overrides),
                                       quantization="int8", progress=False)
    got = np.asarray(split.forward(params, TOKENS))
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max(), (mesh, overrides)
  export_checkpoint(params, split, str(tmp_path), progress=False)  # dequantised: within half a scale per row
  original = load_file(os.path.join(directory, "model.safetensors"))
  exported = load_file(tmp_path / "model.safetensors")
  for name in (n for n in original if ".experts." in n):
    half_scale = np.abs(original[name]).max(axis=1, keepdims=True) / 127 / 2
    assert np.all(np.abs(exported[name] - original[name]) <= half_scale * (1 + 1e-5)), name


def test_the_30b_a3b_shape_splits_its_experts_8_ways_without_weights():
  """Abstract shapes only: the sharding report and per-device bytes of Qwen3-30B-A3B on 1x8 expert_parallel."""
  from qwen_logical.sharding.device_memory import device_memory
  from qwen_logical.sharding.report import sharding_report
  cfg = preset("qwen3-30b-a3b").replace(param_dtype="bfloat16")
  assert abs(cfg.num_parameters - 30.53e9) < 0.01e9  # transformers' count for Qwen3-30B-A3B
  assert abs(cfg.active_parameters - 3.35e9) < 0.01e9  # "A3B": 8 of 128 experts per token
  part = Partitioner(cfg, mesh_of("1x8"), get_table("expert_parallel"))
  rows = {row.path: row for row in sharding_report(part).rows}
  for kernel, shard in (("gate_kernel", (16, 768, 2048)), ("up_kernel", (16, 768, 2048)),
                        ("down_kernel", (16, 2048, 768))):
    assert rows[f"layers_47/mlp/{kernel}"].shard_shape == shard
  memory, _ = device_memory(part, 8, 16)
  experts = 48 * 3 * 128 * 768 * 2048 * 2  # bf16 bytes of every expert kernel
  assert len({m.params for m in memory}) == 1 and memory[0].params > experts / 8
  assert memory[0].params < (cfg.num_parameters * 2 - experts) + experts / 8  # the experts' share is 1/8


def test_main_runs_a_qwen3_moe_preset_under_expert_parallelism(tmp_path):
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  report = tmp_path / "report.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "main.py", "--config=configs/tp8.py", "--config.mesh=2x4",
                           "--config.model.preset=tiny-qwen3-moe", "--config.rules=ep", f"--config.report={report}"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  params = {p["path"]: p for p in json.loads(report.read_text())["sharding"]["params"]}
  gate = params["layers_0/mlp/gate_kernel"]
  assert gate["logical"] == ["expert", "expert_mlp", "embed"] and gate["mesh_axes"] == [["batch", "model"], None, None]
  assert gate["shard_shape"] == [1, 32, 64]
  assert "router: layers_*/mlp/router_kernel" in result.stdout and "Forward pass" in result.stdout


def test_the_serving_engine_gives_transformers_greedy_tokens_for_qwen3_moe():
  """Continuous batching (four prompts on two slots) under expert parallelism, with prompt-lookup speculation:
  rows asking log-probabilities take plain steps, the others speculative rounds."""
  from qwen_logical.inference.speculative import Speculation
  from qwen_logical.serving.engine import Engine
  from qwen_logical.serving.requests import EngineRequest
  from test_serving_engine import submit_all
  directory, _ = checkpoint("qwen3_moe")
  params, _, part = load_checkpoint(directory, mesh_of("2x4"), get_table("expert_parallel"), progress=False)
  engine = Engine(part, params, slots=2, context=64, queue_size=len(PROMPTS),
                  speculation=Speculation("prompt_lookup", 4, 2))
  requests = [EngineRequest(tuple(p), NEW, logprobs=2 if i % 2 else None) for i, p in enumerate(PROMPTS)]
  collector, rids = submit_all(engine, requests)
  engine.start()
  try:
    assert collector.wait(rids) == _reference("qwen3_moe")[1]
  finally:
    engine.stop(5)


def test_speculative_decoding_with_a_draft_model_gives_the_plain_greedy_tokens_for_qwen3_moe():
  """A draft model (the same checkpoint under tensor_parallel: every draft accepted) under expert parallelism;
  prompt lookup runs in the serving engine's test above."""
  from qwen_logical.inference.speculative import DraftModel, Speculation
  directory, _ = checkpoint("qwen3_moe")
  params, _, part = load_checkpoint(directory, mesh_of("2x4"), get_table("expert_parallel"), progress=False)
  draft_params, _, draft_part = load_checkpoint(directory, mesh_of("2x4"), get_table("tensor_parallel"),
                                                progress=False)
  expected = _reference("qwen3_moe")[1]  # transformers' greedy tokens
  speculation = Speculation("draft", 3, draft=DraftModel(draft_part, draft_params))
  assert generate(part, params, PROMPTS, max_new_tokens=NEW, speculation=speculation).tokens == expected
