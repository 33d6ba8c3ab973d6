"""The batch planner (pure numpy): buckets, left padding, slot masks, stop ids, prompt forms, errors."""

import ast
import pathlib

import numpy as np
import pytest

from qwen_logical.inference.batch_plan import (BatchPlanner, prompt_bucket, prompt_ids, round_up,
                                               stop_and_pad_ids)
from qwen_logical.inference.results import GenerationError

PLANNER = BatchPlanner(max_length=128, vocab_size=160)


def test_left_padded_tokens_and_slot_mask():
  plan = PLANNER.plan([[1, 2, 3], [4, 5, 6, 7, 8], [9]], max_new_tokens=10, stop_ids=(9,), pad_id=0)
  assert plan.shape == (4, 16, 64)  # 3 rows -> 4; longest 5 -> bucket 16; 16 + 10 -> 64 slots
  assert plan.real == 3 and plan.prompt_tokens == 9 and plan.max_new_tokens == 10
  expected_tokens = np.zeros((4, 16), np.int32)
  expected_tokens[0, 13:] = [1, 2, 3]
  expected_tokens[1, 11:] = [4, 5, 6, 7, 8]
  expected_tokens[2, 15] = 9
  np.testing.assert_array_equal(plan.tokens, expected_tokens)
  assert plan.tokens.dtype == np.int32 and plan.slot_mask.dtype == np.int32
  expected_mask = np.zeros((4, 64), np.int32)
  expected_mask[:, 16:] = 1  # every new-token slot
  expected_mask[0, 13:16] = expected_mask[1, 11:16] = expected_mask[2, 15] = 1  # the real prompt slots
  expected_mask[3, 15] = 1  # the padding row keeps one real slot
  np.testing.assert_array_equal(plan.slot_mask, expected_mask)
  np.testing.assert_array_equal(plan.stops, [9, -1, -1, -1, -1, -1, -1, -1])
  assert plan.stop_ids == (9,) and plan.pad_id == 0


def test_shapes_follow_the_mesh_multiples_and_the_context():
  wide = BatchPlanner(max_length=4096, vocab_size=160, batch_multiple=8, slot_multiple=128)
  plan = wide.plan([[1] * 600, [2] * 3, [3]], max_new_tokens=33)
  assert plan.shape == (8, 1024, 1152)  # 3 rows -> 4 -> 8; 600 -> 1024; 1024 + 33 -> 1152 (of 128)
  assert wide.plan([[1]] * 9, 1).batch == 16
  # The bucket never exceeds the context rounded to 16: a 90-token prompt in a 100-token context.
  assert BatchPlanner(100, 160).plan([[1] * 90], 10).shape == (1, 112, 128)
  assert len(PLANNER.plan([[1]], 1, stop_ids=tuple(range(9))).stops) == 16  # stop slots in eights
  # Equal buckets for prompts of other lengths and nearby max_new_tokens: one compiled program.
  assert PLANNER.plan([[1] * 4], 20).shape == PLANNER.plan([[1] * 13], 30).shape == (1, 16, 64)


def test_buckets_and_rounding():
  assert [prompt_bucket(n) for n in (1, 16, 17, 100, 512, 513, 1025)] == [16, 16, 32, 128, 512, 1024, 1536]
  assert [round_up(v, 64) for v in (1, 64, 65)] == [64, 64, 128]


def test_prompt_forms():
  class Encoder:
    def encode(self, text):
      return [ord(c) % 160 for c in text]

  assert prompt_ids("ab", Encoder()) == [[97, 98]]
  assert prompt_ids(["a", "bc"], Encoder()) == [[97], [98, 99]]
  assert prompt_ids([5, 6]) == [[5, 6]]
  assert prompt_ids([[5], (6, np.int64(7))]) == [[5], [6, 7]]
  array = np.array([[0, 0, 5, 6], [1, 2, 3, 4]])
  assert prompt_ids(array, attention_mask=np.array([[0, 0, 1, 1], [1, 1, 1, 1]])) == [[5, 6], [1, 2, 3, 4]]
  assert prompt_ids(np.array([7, 8])) == [[7, 8]]
  with pytest.raises(GenerationError, match="Text prompts need a tokenizer"):
    prompt_ids("hello")
  with pytest.raises(GenerationError, match=r"int\[B, L\] or int\[L\]; got shape \(1, 1, 2\)"):
    prompt_ids(np.zeros((1, 1, 2), int))
  with pytest.raises(GenerationError, match="No prompts given"):
    prompt_ids([])
  with pytest.raises(GenerationError, match="Cannot generate from a dict"):
    prompt_ids({"a": 1})


def test_stop_and_pad_ids():
  class Tok:
    stop_ids, pad_id = (151645, 151643), 151643

  assert stop_and_pad_ids(Tok()) == ((151645, 151643), 151643)
  assert stop_and_pad_ids(Tok(), stop_ids=[7], pad_id=3) == ((7,), 3)
  assert stop_and_pad_ids(None, stop_ids=np.array([4, 5])) == ((4, 5), 4)  # pad: the first stop id
  assert stop_and_pad_ids(None, stop_ids=9) == ((9,), 9)
  assert stop_and_pad_ids(None) == ((), 0)


def test_errors_name_the_prompt_and_the_fix():
  with pytest.raises(GenerationError, match=r"Prompt 1 has 130 tokens, longer than the context of 128"):
    PLANNER.plan([[1, 2], [3] * 130], 1)
  with pytest.raises(GenerationError, match=r"plus max_new_tokens=40 is 140 tokens.*max_new_tokens <= 28"):
    PLANNER.plan([[3] * 100], 40)
  with pytest.raises(GenerationError, match=r"Prompt 0 is empty"):
    PLANNER.plan([[], [1]], 1)
  with pytest.raises(GenerationError, match=r"token id\(s\) \[999, -1\] outside \[0, 160\)"):
    PLANNER.plan([[1, 999, -1]], 1)
  for bad in (0, -3, 1.5, True, "4"):
    with pytest.raises(GenerationError, match="must be a positive integer"):
      PLANNER.plan([[1]], bad)


def test_the_planner_imports_no_jax():
  """The planner and the result types it raises with run on numpy alone."""
  root = pathlib.Path(__file__).resolve().parent.parent / "qwen_logical"
  for module in ("inference/batch_plan.py", "inference/results.py", "common/errors.py"):
    tree = ast.parse((root / module).read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {n for n in names if n.split(".")[0] in ("jax", "flax")}, module
    assert names <= {"__future__", "dataclasses", "numbers", "typing", "numpy", "qwen_logical.inference.results",
                     "qwen_logical.common.errors"}, (module, names)
