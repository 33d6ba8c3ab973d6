"""Tokenizer against transformers (the reference) on a real Qwen2-style tokenizer built on the spot:
encode, decode and the chat template (the directory's stop ids and errors: test_tokenizer_directory.py)."""

import unicodedata

import numpy as np
import pytest
import tokenizer_files as tf
from tokenizer_fixtures import CONVERSATIONS, edited, hf, model_dir, tok, trained, variant  # noqa: F401 (fixtures)
from transformers import AutoTokenizer

from qwen_logical.checkpoints.tokenizer import Tokenizer, TokenizerError

MIXED_TEXT = (
    "The quick brown fox — it's 2024!\n"
    "def f(x: int) -> int:\n\treturn x ** 2  # squares\r\n"
    "你好，世界！分词器很重要。こんにちは 한국어 "
    "😀🎉🚀👩‍👩‍👧 naïve cafe\u0301 Ωmega ß ﬁ "  # combining accent (NFC), ZWJ emoji, unseen letters
    "<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>"
    "   trailing spaces and\n\n\nnewlines   "
)


# ----------------------------------------------------------------------------- encode / decode


def test_fixture_is_a_real_bpe(tok, trained):
  assert 500 <= tok.vocab_size <= 1000
  ids = tok.encode("The quick brown fox", add_special_tokens=False)
  assert len(ids) < len("The quick brown fox") / 2, "merges are learnt, not byte-by-byte"
  assert tok.vocab_size == trained.get_vocab_size() and tok.token_to_id("<|im_end|>") == tok.vocab_size - 1


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tok, hf, add_special_tokens):
  ids = tok.encode(MIXED_TEXT, add_special_tokens=add_special_tokens)
  assert ids == hf.encode(MIXED_TEXT, add_special_tokens=add_special_tokens)
  assert all(type(i) is int for i in ids)
  for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
    assert ids.count(tok.token_to_id(special)) == 1, f"{special} in the text is one special token"


def test_encode_batch_matches_transformers(tok, hf):
  texts = [MIXED_TEXT, "", "short", "def g():\n  pass", "中文 😀"]
  assert tok.encode_batch(texts) == hf(texts)["input_ids"]
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_matches_transformers(tok, hf, skip_special_tokens):
  ids = tok.encode(MIXED_TEXT)
  text = tok.decode(ids, skip_special_tokens=skip_special_tokens)
  assert text == hf.decode(ids, skip_special_tokens=skip_special_tokens)
  assert tok.decode(np.asarray(ids, np.int32), skip_special_tokens=skip_special_tokens) == text
  assert tok.decode_batch([ids, ids[:3]], skip_special_tokens) == hf.batch_decode(
      [ids, ids[:3]], skip_special_tokens=skip_special_tokens)
  if not skip_special_tokens:
    assert text == unicodedata.normalize("NFC", MIXED_TEXT)


def test_decode_partial_utf8_matches_transformers(tok, hf):
  ids = tok.encode("😀", add_special_tokens=False)
  assert len(ids) > 1
  assert tok.decode(ids[:1]) == hf.decode(ids[:1]) == "\ufffd"


def test_vocabulary_and_special_tokens_match_transformers(tok, hf):
  assert tok.vocab_size == len(tok) == len(hf)
  assert tok.special_tokens == hf.special_tokens_map == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
  assert tok.special_ids == set(hf.all_special_ids)
  assert tok.eos_id == hf.eos_token_id and tok.bos_id is None is hf.bos_token_id
  assert tok.id_to_token(tok.eos_id) == "<|im_end|>"


def test_special_tokens_as_dicts_and_class_defaults(model_dir, tmp_path):
  as_dict = {"content": "<|im_end|>", "__type": "AddedToken", "lstrip": False, "normalized": False,
             "rstrip": False, "single_word": False, "special": True}
  path = variant(model_dir, tmp_path, config=edited(eos_token=as_dict, pad_token=..., unk_token=..., bos_token=...))
  hf = AutoTokenizer.from_pretrained(path)
  tok = Tokenizer.from_directory(path)
  assert tok.special_tokens == hf.special_tokens_map
  assert tok.special_tokens == {"eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
  conversation = [{"role": "user", "content": "x"}]
  template = "{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ bos_token is defined }}"
  tok.chat_template = hf.chat_template = template
  assert tok.apply_chat_template(conversation) == hf.apply_chat_template(conversation, tokenize=False)


# ----------------------------------------------------------------------------- chat template


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(tok, hf, name, add_generation_prompt):
  conversation = CONVERSATIONS[name]
  text = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
  assert text == hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
  assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
  ids = tok.encode_chat(conversation, add_generation_prompt=add_generation_prompt)
  assert ids == hf.apply_chat_template(conversation, tokenize=True, add_generation_prompt=add_generation_prompt,
                                       return_dict=False)


def test_chat_template_default_system_and_generation_prompt(tok):
  text = tok.apply_chat_template(CONVERSATIONS["user_only"])
  assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                  "<|im_end|>\n<|im_start|>user\nWrite hello world in Python.<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_helpers_match_transformers(model_dir, tmp_path):
  """chat_template.jinja wins over tokenizer_config.json, and every template helper renders alike."""
  path = variant(model_dir, tmp_path, files={"chat_template.jinja": tf.FEATURES_TEMPLATE})
  hf = AutoTokenizer.from_pretrained(path)
  tok = Tokenizer.from_directory(path)
  conversation = CONVERSATIONS["with_system"] + CONVERSATIONS["multi_turn"] + [
      {"role": "assistant", "content": "→ ✓", "reasoning_content": "think <a> & b"},
      {"role": "skip", "content": "never shown"},  # `continue`
  ] + CONVERSATIONS["user_only"]  # the 8th message: `break`
  tools = [{"type": "function", "function": {"name": "weather", "description": "Météo du jour",
                                             "parameters": {"type": "object", "properties": {}}}}]
  for kwargs in ({"add_generation_prompt": True}, {"add_generation_prompt": False, "tools": tools}):
    text = tok.apply_chat_template(conversation, **kwargs)
    assert text == hf.apply_chat_template(conversation, tokenize=False, **kwargs)
  assert "users=4" in text and "Météo" in text and "<b>bold</b>" in text and "[6]" in text
  assert "never shown" not in text and "[8]" not in text and '"name": null' not in text
  assert '"thinking": "think <a> & b"' in text


def test_chat_template_raise_exception(tok, hf):
  conversation = [{"role": "narrator", "content": "Once upon a time"}]
  with pytest.raises(Exception, match="Unexpected role narrator"):
    hf.apply_chat_template(conversation, tokenize=False)
  with pytest.raises(TokenizerError, match="rejected the conversation: Unexpected role narrator"):
    tok.apply_chat_template(conversation)


@pytest.mark.parametrize("conversation, message", [
    ([], "empty conversation"),
    (["hello"], "Message 0 of the conversation is a str"),
    ("hello", "list of message dicts"),
])
def test_chat_bad_conversations(tok, conversation, message):
  with pytest.raises(TokenizerError, match=message):
    tok.apply_chat_template(conversation)


def test_chat_template_sandboxed(tok):
  tok = Tokenizer(tok.backend, chat_template="{{ messages.__class__.__mro__ }}")
  with pytest.raises(TokenizerError, match="rejected the conversation"):
    tok.apply_chat_template(CONVERSATIONS["user_only"])
  tok.chat_template = "{% set ns = namespace() %}{% set ns._x = 1 %}"
  with pytest.raises(TokenizerError, match="underscore"):
    tok.apply_chat_template(CONVERSATIONS["user_only"])
