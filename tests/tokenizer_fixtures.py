"""The tokenizer tests' shared fixtures: a real Qwen2-style tokenizer directory built on the spot, the
transformers tokenizer on it (the reference), and edited copies of the directory."""

import json
import os
import shutil

import pytest
import tokenizer_files as tf
from transformers import AutoTokenizer

from qwen_logical.checkpoints.tokenizer import Tokenizer

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Write hello world in Python."}],
    "with_system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "你好 😀 <b>bold</b> & 'quotes'"},
    ],
    "multi_turn": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And\n  times 3?", "name": None},  # None-valued keys are dropped
    ],
    "tool_turn": [
        {"role": "system", "content": ""},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "calling"},
        {"role": "tool", "content": "{\"temp\": 21}"},
    ],
}


@pytest.fixture(scope="session")
def trained():
  return tf.train_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, trained):
  path = tmp_path_factory.mktemp("qwen_tokenizer")
  tf.write_tokenizer_dir(path, trained)
  return str(path)


@pytest.fixture(scope="session")
def tok(model_dir):
  return Tokenizer.from_directory(model_dir)


@pytest.fixture(scope="session")
def hf(model_dir):
  reference = AutoTokenizer.from_pretrained(model_dir)
  assert type(reference).__name__ == "Qwen2Tokenizer"
  return reference


def variant(model_dir, tmp_path, config=None, generation=None, drop=(), files=None):
  """A copy of `model_dir` with edited JSON (callables get and return the dict), dropped or replaced files."""
  shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
  for name, edit in (("tokenizer_config.json", config), ("generation_config.json", generation)):
    if edit is not None:
      with open(tmp_path / name, encoding="utf-8") as f:
        tf.write_json(tmp_path / name, edit(json.load(f)))
  for name in drop:
    os.remove(tmp_path / name)
  for name, text in (files or {}).items():
    (tmp_path / name).write_text(text, encoding="utf-8")
  return str(tmp_path)


def edited(**changes):
  """A config edit: set each key (a value of ... removes it)."""
  def edit(d):
    for key, value in changes.items():
      if value is ...:
        d.pop(key, None)
      else:
        d[key] = value
    return d
  return edit
