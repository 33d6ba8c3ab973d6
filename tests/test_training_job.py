"""The fine-tuning job end to end (main.py): the default run's shape, export, and user errors."""

import json
import os
import subprocess
import sys


from qwen_logical.training import builtin_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*flags):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, os.path.join(REPO, "main.py"), "--config=configs/finetune.py", *flags],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_finetune_job_trains_evaluates_and_exports(tmp_path):
  data = tmp_path / "chats.jsonl"
  long = [{"role": "user", "content": "Write a long answer."}, {"role": "assistant", "content": "words " * 40}]
  lines = list(builtin_data.CONVERSATIONS[:12]) + [long]
  data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in lines))
  out, report = tmp_path / "tuned", tmp_path / "report.json"
  result = _main(f"--config.train.data={data}", "--config.train.steps=12", "--config.train.eval_every=6",
                 "--config.train.max_length=128", "--config.train.overlong=skip", "--config.mesh=1x2",
                 "--config.rules=fsdp", "--config.train.length_buckets=1", "--config.train.grad_accum=2", "--config.train.remat=full",
                 f"--config.train.output={out}", f"--config.report={report}")
  assert result.returncode == 0, result.stderr[-3000:]
  history, summary = (json.loads(report.read_text())[k] for k in ("history", "summary"))
  assert [r["step"] for r in history["train"]] == list(range(1, 13))
  assert [r["step"] for r in history["eval"]] == [6, 12]
  losses = [r["loss"] for r in history["train"]]
  assert losses[-1] < 0.8 * losses[0]
  assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in history["train"])
  assert summary["eval_examples"] == 1 and summary["train_examples"] == 11 and summary["steps"] == 12
  assert "1 conversation(s) longer than --config.train.max_length=128 tokens: 0 truncated, 1 skipped" in result.stderr
  assert "Fine-tuning: step 12/12" in result.stderr and "Fine-tuned 12 steps on 1x2 fsdp" in result.stdout
  for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
    assert (out / name).exists(), name
  config = json.loads((out / "config.json").read_text())
  assert config["vocab_size"] == 320 and config["num_hidden_layers"] == 2


def test_finetune_job_reports_a_bad_line_as_a_user_error(tmp_path):
  data = tmp_path / "chats.jsonl"
  data.write_text(json.dumps({"messages": builtin_data.CONVERSATIONS[0]}) + "\n{not json\n")
  result = _main(f"--config.train.data={data}", "--config.mesh=1x1")
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"error: {data}:2: not a JSON object" in result.stderr


def test_finetune_job_trains_lora_on_an_int8_base_and_keeps_the_newest_checkpoints(tmp_path):
  runs, report = tmp_path / "run", tmp_path / "report.json"
  result = _main("--config.mesh=1x1", "--config.model.quantization=int8", "--config.train.lora_rank=4",
                 "--config.train.steps=4", "--config.train.eval_every=0", "--config.train.length_buckets=1",
                 "--config.train.learning_rate=1e-2", "--config.train.warmup_steps=0", "--config.train.sample_prompt=",
                 f"--config.train.checkpoint_dir={runs}", "--config.train.checkpoint_every=1",
                 "--config.train.checkpoint_keep=2", f"--config.report={report}")
  assert result.returncode == 0, result.stderr[-3000:]
  history, summary = (json.loads(report.read_text())[k] for k in ("history", "summary"))
  losses = [r["loss"] for r in history["train"]]
  assert summary["lora_rank"] == 4 and len(losses) == 4 and losses[-1] < losses[0]
  assert sorted(name for name in os.listdir(runs) if name.isdigit()) == ["3", "4"]
  meta = json.loads((runs / "4" / "meta" / "metadata").read_text())
  assert meta["model"]["quantization"] == "int8" and meta["lora"]["rank"] == 4
  # int8 weights without LoRA get no gradients: a user error that names the fix.
  result = _main("--config.mesh=1x1", "--config.model.quantization=int8")
  assert result.returncode == 2 and "--config.train.lora_rank=8" in result.stderr, result.stderr[-2000:]
  result = _main("--config.mesh=1x1", "--config.train.checkpoint_keep=-1")
  assert result.returncode == 2 and "--config.train.checkpoint_keep=-1 must be >= 0" in result.stderr
