"""The main job end to end: configs load, overrides apply, the run reports what it did."""

import json
import os
import subprocess
import sys

import pytest
from ml_collections import config_flags  # noqa: F401  (configs are plain modules)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"tp8": ("1x8", "tensor_parallel"), "tp4_dp2": ("2x4", "tensor_parallel"),
           "tp2_dp4": ("4x2", "tensor_parallel"), "dp8": ("8x1", "data_parallel"),
           "single": ("1x1", "tensor_parallel")}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_files(name):
  sys.path.insert(0, REPO)
  try:
    import importlib
    module = importlib.import_module(f"configs.{name}")
  finally:
    sys.path.remove(REPO)
  config = module.get_config()
  assert (config.mesh, config.rules) == CONFIGS[name]
  assert config.model.preset == "qwen2.5-7b"


def _main(tmp_path, *flags):
  report = tmp_path / "report.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *flags, f"--config.report={report}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result, json.loads(report.read_text())


def test_main_runs_tiny_model_with_overrides(tmp_path):
  result, report = _main(tmp_path, "--config=configs/tp8.py", "--config.mesh=2x4",
                         "--config.model.preset=tiny", "--config.rules=tp_fsdp",
                         "--config.rule_overrides=mlp=None,activation_mlp=None")
  summary = report["summary"]
  assert summary["mesh"] == "2x4" and summary["devices"] == 8
  assert summary["rules"] == "tp_fsdp+overrides"
  assert summary["logits_shape"] == [8, 16, 256]
  assert "padded 7 -> 8" in summary["head_plan"]
  assert summary["scan_layers"] is True  # FSDP gathers weights: scanned on CPU too (one layer's at a time)
  mlp = [p for p in report["sharding"]["params"] if p["path"] == "layers/mlp/gate_kernel"][0]
  assert mlp["mesh_axes"] == [None, None, "batch"]  # (layers, mlp, embed): embed over batch (FSDP), mlp unsharded
  for phrase in ("Sharding of 2x4 tp_fsdp+overrides", "Per-device MiB", "Timings: init"):
    assert phrase in result.stdout
  assert "all-gather" in summary["collectives"]  # FSDP over 'batch' gathers weights


def test_main_says_when_it_runs_a_reduced_model(tmp_path):
  result, report = _main(tmp_path, "--config=configs/single.py", "--config.model.preset=qwen2.5-0.5b",
                         "--config.host_memory_fraction=0.00005", "--config.batch_size=1",
                         "--config.seq_len=4")
  assert report["summary"]["num_layers"] == 1
  assert "RUNNING A REDUCED VARIANT: 1 of 24 layers" in result.stdout


def test_the_layer_form_defaults_to_the_fast_one_per_platform():
  from qwen_logical.jobs.common.build import gathers_weights, scan_layers_for
  from qwen_logical.sharding.rules import get_table
  assert scan_layers_for(None, "cpu") is False  # XLA:CPU: scanned layers decode ~4x slower
  assert scan_layers_for(None, "gpu") is False  # H100, 7B bf16 decode: 2.6x slower scanned
  assert scan_layers_for(None, "tpu") is True
  assert scan_layers_for(True, "cpu") is True and scan_layers_for(False, "gpu") is False  # as asked
  # Under FSDP, unrolled layers on XLA:CPU hold every layer's gathered weights at once: scanned.
  assert scan_layers_for(None, "cpu", gathers=True) is True
  assert gathers_weights(get_table("fsdp")) and gathers_weights(get_table("tp_fsdp"), {"batch": 2, "model": 4})
  assert not gathers_weights(get_table("tp_fsdp"), {"batch": 1, "model": 8})  # embed over batch, of size 1
  assert not gathers_weights(get_table("tensor_parallel")) and not gathers_weights(get_table("data_parallel"))
  sys.path.insert(0, REPO)
  try:
    from configs import base
  finally:
    sys.path.remove(REPO)
  assert base.get_config().model.scan_layers is None


def test_main_device_mismatch_error(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "main.py", "--config=configs/tp8.py", "--config.model.preset=tiny",
                           "--config.num_cpu_devices=4"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode != 0
  assert "Mesh 1x8 needs 8 devices but JAX sees 4" in result.stderr


def test_main_loads_a_checkpoint_and_exports_it(tmp_path):
  from hf_reference import tiny_hf_model
  source = tmp_path / "hf"
  tiny_hf_model(heads=14, kv_heads=2, hidden=112).save_pretrained(source, max_shard_size="60KB")
  exported = tmp_path / "exported"
  result, report = _main(tmp_path, "--config=configs/tp8.py", f"--config.checkpoint={source}",
                         f"--config.export={exported}")
  summary = report["summary"]
  assert summary["num_layers"] == 2 and "load_s" in summary["timings"]
  assert summary["scan_layers"] is False  # the default on CPU: unrolled layers decode faster there
  assert (exported / "model.safetensors").exists() and (exported / "config.json").exists()
  assert "Timings: load" in result.stdout
  from qwen_logical.checkpoints.directory import open_checkpoint
  original, again = open_checkpoint(str(source)), open_checkpoint(str(exported))
  for name, entry in original.entries.items():
    assert (entry.memmap() == again.entries[name].memmap()).all(), name


def test_main_rejects_architecture_overrides_with_a_checkpoint(tmp_path):
  from hf_reference import tiny_hf_model
  source = tmp_path / "hf"
  tiny_hf_model().save_pretrained(source)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "main.py", "--config=configs/single.py", f"--config.checkpoint={source}",
                           "--config.model.num_layers=1"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0
  assert "--config.model.num_layers cannot change a checkpoint's architecture" in result.stderr


@pytest.fixture(scope="module")
def instruct_checkpoint(tmp_path_factory):
  """A tiny HF checkpoint with a real (trained on the spot) Qwen-style tokenizer beside it."""
  from hf_reference import tiny_hf_model
  from tokenizer_files import write_tokenizer_dir
  directory = tmp_path_factory.mktemp("instruct")
  write_tokenizer_dir(directory)
  model = tiny_hf_model(heads=14, kv_heads=2, hidden=112, vocab=896)
  model.save_pretrained(directory)
  write_tokenizer_dir(directory)  # save_pretrained rewrote generation_config.json
  return directory, model


def _hf_greedy(model, ids, new_tokens):
  import torch
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
  return out[0, len(ids):].tolist()


@pytest.mark.parametrize("chat", [False, True])
def test_main_generates_text_from_a_checkpoint(tmp_path, instruct_checkpoint, chat):
  from transformers import AutoTokenizer
  directory, model = instruct_checkpoint
  prompt = "def add(a, b): return a + b  # 你好 🙂"
  result, report = _main(tmp_path, "--config=configs/tp4_dp2.py", f"--config.checkpoint={directory}",
                         f"--config.prompt={prompt}", f"--config.chat={chat}", "--config.max_new_tokens=12")
  hf_tokenizer = AutoTokenizer.from_pretrained(directory)
  if chat:
    ids = hf_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
  else:
    ids = hf_tokenizer(prompt)["input_ids"]
  summary = report["summary"]
  expected = _hf_greedy(model, list(ids), 12)
  got = summary["tokens"][0]
  stops = {hf_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
  if summary["finish_reasons"][0] == "stop":  # stopped on a stop id: HF (no eos) continues past it
    expected = expected[:len(got)]
    assert got[-1] in stops
  assert got == expected
  assert summary["texts"][0] == hf_tokenizer.decode([t for t in got if t not in stops], skip_special_tokens=True)
  assert summary["texts"][0] in result.stdout and "Generation: prefill" in result.stdout


def test_main_batches_prompts(tmp_path, instruct_checkpoint):
  """Three prompts at once, drafting by prompt lookup: HF's greedy tokens."""
  directory, model = instruct_checkpoint
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("Hello world\nprint('x')\n東京\n")
  result, report = _main(tmp_path, "--config=configs/tp8.py", f"--config.checkpoint={directory}",
                         f"--config.prompts={prompts}", "--config.max_new_tokens=12",
                         "--config.speculative.method=prompt_lookup", "--config.speculative.ngram=1")
  assert "Speculative (prompt_lookup, 7 drafted per round): acceptance" in result.stdout
  assert report["summary"]["generation_timings"]["drafted"] > 0
  from qwen_logical.checkpoints.tokenizer import Tokenizer
  tokenizer = Tokenizer.from_directory(directory)
  for text, got in zip(["Hello world", "print('x')", "東京"], report["summary"]["tokens"]):
    expected = _hf_greedy(model, tokenizer.encode(text), 12)
    assert got == expected[:len(got)]


def _mistake(*flags):
  """Runs main.py with a user mistake; the result after checking it is one message, exit code 2."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "main.py", *flags], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  return result


@pytest.mark.parametrize("flags, message", [
    (["--config.rules=bogus"], "error: Unknown rule table 'bogus'; known tables: tensor_parallel"),
    (["--config.checkpoint=/nonexistent/qwen"], "error: checkpoint directory /nonexistent/qwen does not exist"),
    (["--config.model.preset=tiny", "--config.mesh=3x3"], "error: 2 KV heads"),
    (["--config.prompt=Hello", "--config.top_p=1.5"], "error: top_p=1.5 is invalid: it must be in (0, 1]"),
    (["--config.prompt=Hello", "--config.max_new_tokens=500"], "more than the context of 128"),
], ids=["rules", "checkpoint", "mesh", "top_p", "context"])
def test_a_user_mistake_prints_one_message_and_exits_2(instruct_checkpoint, flags, message):
  if any(f.startswith("--config.prompt=") for f in flags):
    flags = flags + [f"--config.checkpoint={instruct_checkpoint[0]}"]
  result = _mistake(*flags)
  assert message in result.stderr, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, errors


@pytest.mark.parametrize("flag", ["--traceback", "-v=1"])
def test_the_traceback_of_a_user_mistake_on_request(flag):
  result = _mistake("--config.rules=bogus", flag)
  assert "Traceback (most recent call last)" in result.stderr and "RuleError" in result.stderr
  assert "error: Unknown rule table 'bogus'" in result.stderr


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
  from qwen_logical.jobs import entry
  from qwen_logical.jobs.common.build import JobError

  def bug(config):
    raise RuntimeError("not a user mistake")

  def mistake(config):
    raise JobError("--config.something: use another value.")

  monkeypatch.setattr(entry, "run_job", bug)
  with pytest.raises(RuntimeError, match="not a user mistake"):
    entry.exit_status(None)
  monkeypatch.setattr(entry, "run_job", mistake)
  assert entry.exit_status(None) == 2
  assert capsys.readouterr().err == "error: --config.something: use another value.\n"


def test_a_draft_model_with_another_tokenizer_is_refused(tmp_path, instruct_checkpoint):
  from tokenizer_files import train_tokenizer, write_tokenizer_dir
  directory = instruct_checkpoint[0]
  other = tmp_path / "draft"
  write_tokenizer_dir(other, train_tokenizer(vocab_size=700))
  result = _mistake("--config=configs/single.py", f"--config.checkpoint={directory}", "--config.prompt=Hi",
                    "--config.speculative.method=draft", f"--config.speculative.draft_checkpoint={other}")
  assert f"the draft model's tokenizer ({other}" in result.stderr and f"not the target's ({directory}" in result.stderr
