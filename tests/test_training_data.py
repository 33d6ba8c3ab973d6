"""Fine-tuning data: the loss mask from the chat template equals one built by hand from transformers'
apply_chat_template pieces; bad lines name file:line; over-long conversations are counted; batches
have fixed shapes; a batch that does not split over the mesh is an error naming the setting."""

import json

import numpy as np
import pytest
from absl import logging
from transformers import AutoTokenizer

import tokenizer_files as tf
from conftest import mesh_of
from qwen_logical.checkpoints.tokenizer import Tokenizer
from qwen_logical.model.config import preset
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import get_table
from qwen_logical.training import builtin_data
from qwen_logical.training.batching import bucket_lengths, fit_length, split_indices
from qwen_logical.training.builtin_tokenizer import byte_tokenizer
from qwen_logical.training.data import DataError, read_conversations, tokenize_conversation
from qwen_logical.training.inputs import make_datasets
from qwen_logical.training.state import TrainingError
from qwen_logical.training.step import check_batch_size, data_shard

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What's 2 + 2? Answer, please."},
    {"role": "assistant", "content": "It's 4 — naïve café!"},
    {"role": "user", "content": "And\nin words?"},
    {"role": "assistant", "content": "def four():\n    return 'four'"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("chat_tokenizer")
  tf.write_tokenizer_dir(path)
  return str(path)


def _by_hand(hf, messages):
  """(tokens, trained) from transformers' pieces: each assistant turn's content ids and <|im_end|> are
  trained; the text before it (rendered with the generation prompt) and the newline after are not."""
  tokens, trained = [], []
  im_end = hf.convert_tokens_to_ids("<|im_end|>")
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    prefix = hf.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prefix[:len(tokens)] == tokens
    trained += [0] * (len(prefix) - len(tokens))
    content = hf(message["content"], add_special_tokens=False)["input_ids"] + [im_end]
    newline = hf("\n", add_special_tokens=False)["input_ids"]
    tokens = prefix + content + newline
    trained += [1] * len(content) + [0] * len(newline)
  assert tokens == hf.apply_chat_template(messages, tokenize=True, return_dict=False)  # the pieces are the whole
  return np.array(tokens), np.array(trained, np.float32)


def test_loss_mask_equals_the_one_built_by_hand_from_transformers(model_dir):
  hf = AutoTokenizer.from_pretrained(model_dir)
  example = tokenize_conversation(Tokenizer.from_directory(model_dir), CONVERSATION)
  tokens, trained = _by_hand(hf, CONVERSATION)
  np.testing.assert_array_equal(example.tokens, tokens)
  np.testing.assert_array_equal(example.loss_mask, np.append(trained[1:], 0.0))  # the NEXT token's
  assert 0 < example.loss_mask.sum() < len(tokens) / 2


def test_builtin_tokenizer_masks_the_assistant_text_only():
  tok = byte_tokenizer()
  example = tokenize_conversation(tok, builtin_data.CONVERSATIONS[0])
  trained = [int(t) for t, m in zip(example.tokens[1:], example.loss_mask) if m]
  assert tok.decode(trained) == "Paris.<|im_end|>"


def _write(tmp_path, lines):
  path = tmp_path / "chats.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


@pytest.mark.parametrize("line,message", [
    ('{"messages": [{"role": "user", "content": "hi"}', "chats.jsonl:3: not a JSON object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "chats.jsonl:3: the conversation has no assistant turn"),
    ('{"text": "hi"}', 'chats.jsonl:3: expected {"messages": [...]}'),
    ('{"messages": [{"role": "user"}]}', "chats.jsonl:3: message 0 must be an object with string 'role' and 'content'"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
  good = json.dumps({"messages": builtin_data.CONVERSATIONS[0]})
  path = _write(tmp_path, [good, "", line, good])
  with pytest.raises(DataError, match=message.replace("[", r"\[").replace("{", r"\{")):
    read_conversations(path)
  assert len(read_conversations(path, lines=[0, 2])) == 2  # the bad line is the third non-blank one


def test_missing_file_names_the_setting(tmp_path):
  with pytest.raises(DataError, match="--config.train.data=.*no such file"):
    read_conversations(str(tmp_path / "none.jsonl"))


@pytest.mark.parametrize("overlong", ["truncate", "skip"])
def test_overlong_conversations_are_counted_and_logged(overlong, monkeypatch):
  tok = byte_tokenizer()
  examples = [tokenize_conversation(tok, c) for c in builtin_data.CONVERSATIONS[:6]]
  limit = sorted(len(e) for e in examples)[2]  # three fit, three do not
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
  kept = fit_length(examples, limit, overlong, "test")
  longer = sum(len(e) > limit for e in examples)
  assert longer == 3 and len(warnings) == 1 and f"{longer} conversation(s) longer" in warnings[0]
  assert all(len(e) <= limit for e in kept)
  # Truncation keeps a conversation while any trained token is left (the answers come last).
  survives = [len(e) <= limit or (overlong == "truncate" and e.loss_mask[:limit - 1].any()) for e in examples]
  assert [len(e) for e in kept] == [min(len(e), limit) for e, s in zip(examples, survives) if s]
  assert all(e.loss_mask[-1] == 0 for e in kept)
  with pytest.raises(DataError, match="overlong"):
    fit_length(examples, limit, "drop", "test")


def test_batches_have_bucketed_fixed_shapes_and_a_held_out_split():
  tok = byte_tokenizer()
  train, held_out = make_datasets(tok, data="", max_length=128, eval_fraction=0.1, seed=0)
  assert bucket_lengths(128) == (32, 64, 128) and train.buckets == (32, 64, 128)
  assert len(train) + len(held_out) == len(builtin_data.CONVERSATIONS) and len(held_out) == 3
  train_idx, eval_idx = split_indices(len(builtin_data.CONVERSATIONS), 0.1, 0)
  assert not set(train_idx) & set(eval_idx)
  groups = train.epochs(4, seed=0)
  shapes = set()
  for _ in range(20):  # across epoch boundaries
    batch = train.collate(next(groups), 4)
    shapes.add(batch["tokens"].shape)
    assert batch["loss_mask"].sum() > 0 and (batch["loss_mask"] <= batch["attention_mask"]).all()
  assert shapes <= {(4, 32), (4, 64), (4, 128)}
  eval_batches = held_out.eval_groups(2, count=3)
  assert [len(g) for g in eval_batches] == [2, 1, 0]
  empty = held_out.collate([], 2)
  assert empty["attention_mask"].sum() == 0 and empty["tokens"].shape == (2, 32)
  # Processes read disjoint parts.
  part0, _ = make_datasets(tok, data="", max_length=128, eval_fraction=0.1, seed=0, shard=(0, 2))
  part1, _ = make_datasets(tok, data="", max_length=128, eval_fraction=0.1, seed=0, shard=(1, 2))
  assert len(part0) + len(part1) == len(train)


def test_a_batch_that_does_not_split_names_the_setting():
  part = Partitioner(preset("tiny"), mesh_of("4x2"), get_table("fsdp"))  # batch over all 8 devices
  check_batch_size(part, 16, 2)
  with pytest.raises(TrainingError, match=r"--config.train.batch_size=12 .* multiple of 16"):
    check_batch_size(part, 12, 2)
  assert data_shard(part) == (0, 1)
