"""Incremental detokenisation on a real byte-level BPE (Qwen2's pipeline): the streamed deltas equal
decoding the whole row, characters split across tokens wait for their last byte, and the cost
(tokens passed to decode) grows linearly with the output."""

import pytest
import tokenizer_files as tf

from qwen_logical.checkpoints.tokenizer import Tokenizer
from qwen_logical.inference.detokenize import IncrementalDetokenizer

# CJK, emoji (a ZWJ sequence too), accents, Hangul, kana, astral-plane letters: with this small
# vocabulary many of them are split into byte pieces, some pieces spanning two characters.
TEXT = "你好，世界！😀🎉🚀 naïve café 한국어 分词器很重要。こんにちは 👩‍👩‍👧 Ωmega 𝔘𝔫𝔦\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("detok_tokenizer")
  tf.write_tokenizer_dir(path)
  return Tokenizer.from_directory(path)


def _stream(tok, ids, skip=()):
  detok = IncrementalDetokenizer(tok, skip_ids=skip)
  deltas = [detok.add(i) for i in ids]
  return deltas, deltas + [detok.finish()], detok


def test_split_characters_exist_in_the_fixture(tok):
  ids = tok.encode(TEXT)
  pieces = [tok.decode([i]) for i in ids]
  assert sum("\ufffd" in p for p in pieces) >= 10, pieces  # else the test below proves nothing
  assert tok.decode(ids) == TEXT


def test_deltas_join_to_the_whole_decode_on_a_long_row(tok):
  ids = tok.encode(TEXT * 40)
  im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
  ids = ids[:len(ids) // 2] + [im_start] + ids[len(ids) // 2:]  # a special token: decoded as ''
  assert len(ids) > 1500
  deltas, with_finish, detok = _stream(tok, ids + [im_end], skip=(im_end,))
  whole = tok.decode(ids, skip_special_tokens=True)
  assert whole == TEXT * 40
  assert "".join(with_finish) == detok.text == whole
  assert "".join(deltas) == whole  # the row ends on a complete character: nothing left for finish
  assert "\ufffd" not in "".join(deltas)  # a split character is shown only once complete
  waits = sum(d == "" for d in deltas)
  assert waits > len(ids) // 10, waits  # tokens ending inside a character wait


def test_a_row_cut_inside_a_character_ends_as_the_whole_decode(tok):
  ids = tok.encode(TEXT * 3)
  inside = 0
  for cut in range(len(ids) - 40, len(ids)):
    deltas, with_finish, _ = _stream(tok, ids[:cut])
    whole = tok.decode(ids[:cut], skip_special_tokens=True)
    joined = "".join(deltas)
    assert "".join(with_finish) == whole, cut
    assert whole.startswith(joined), cut
    assert (joined == whole) == (not whole.endswith("\ufffd")), cut  # only a split character waits
    inside += whole.endswith("\ufffd")
  assert inside >= 5  # cuts inside a character were tried


def test_cost_is_linear_in_the_output(tok):
  costs = {}
  for reps in (10, 40):
    ids = tok.encode(TEXT * reps)
    _, _, detok = _stream(tok, ids)
    costs[len(ids)] = detok.decoded_tokens
  (short, short_cost), (long, long_cost) = sorted(costs.items())
  assert long_cost <= 8 * long  # a few tokens decoded per token (whole-row decoding: long^2 / 2)
  assert long_cost / short_cost <= 1.1 * long / short
