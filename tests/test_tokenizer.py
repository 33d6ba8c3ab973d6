"""Tokenizer against transformers (the reference) on a real Qwen2-style tokenizer built on the spot."""

import json
import os
import shutil
import unicodedata

import numpy as np
import pytest
import tokenizer_files as tf
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


# ----------------------------------------------------------------------------- stop and pad ids


def test_stop_ids_list_form(tok, hf):
  im_end, endoftext = hf.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
  assert tok.stop_ids == (im_end, endoftext)
  assert tok.pad_id == endoftext == hf.pad_token_id


def test_stop_ids_int_form_and_pad_from_tokenizer_config(model_dir, tmp_path, tok):
  path = variant(model_dir, tmp_path, generation=edited(eos_token_id=tok.token_to_id("<|endoftext|>"),
                                                        pad_token_id=...))
  base = Tokenizer.from_directory(path)
  assert base.stop_ids == (tok.token_to_id("<|endoftext|>"),)
  assert base.pad_id == tok.token_to_id("<|endoftext|>")


def test_stop_ids_fall_back_to_eos_token(model_dir, tmp_path, tok):
  path = variant(model_dir, tmp_path, config=edited(pad_token=None), drop=["generation_config.json"])
  fallback = Tokenizer.from_directory(path)
  assert fallback.stop_ids == (tok.token_to_id("<|im_end|>"),) and fallback.pad_id == fallback.stop_ids[0]
  assert fallback.generation_config == {}


def test_pad_id_from_generation_config(model_dir, tmp_path, tok):
  path = variant(model_dir, tmp_path, generation=edited(pad_token_id=tok.token_to_id("<|im_start|>")))
  assert Tokenizer.from_directory(path).pad_id == tok.token_to_id("<|im_start|>")


# ----------------------------------------------------------------------------- errors


def test_error_missing_directory(tmp_path):
  with pytest.raises(TokenizerError, match=r"does not exist.*Qwen2.5 model directory"):
    Tokenizer.from_directory(tmp_path / "nowhere")


def test_error_missing_tokenizer_json(model_dir, tmp_path):
  path = variant(model_dir, tmp_path, drop=["tokenizer.json"])
  with pytest.raises(TokenizerError, match=r"No tokenizer.json in .*huggingface-cli download"):
    Tokenizer.from_directory(path)
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(TokenizerError, match=r"has vocab.json only.*save_pretrained"):
    Tokenizer.from_directory(path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_error_corrupt_json(model_dir, tmp_path, name):
  path = variant(model_dir, tmp_path)
  with open(os.path.join(path, name), encoding="utf-8") as f:
    text = f.read()
  with open(os.path.join(path, name), "w", encoding="utf-8") as f:
    f.write(text[: len(text) // 2])
  with pytest.raises(TokenizerError, match=rf"{name} is not valid JSON .*truncated or corrupt"):
    Tokenizer.from_directory(path)


def test_error_json_not_a_tokenizer(model_dir, tmp_path):
  path = variant(model_dir, tmp_path, files={"tokenizer.json": '{"model": {"type": "Nope"}}'})
  with pytest.raises(TokenizerError, match=r"tokenizer.json is not a tokenizer the `tokenizers` library can load"):
    Tokenizer.from_directory(path)
  path = variant(model_dir, tmp_path, files={"generation_config.json": "[1, 2]"})
  with pytest.raises(TokenizerError, match=r"generation_config.json holds a JSON list, not an object"):
    Tokenizer.from_directory(path)


def test_error_no_chat_template(model_dir, tmp_path):
  path = variant(model_dir, tmp_path, config=edited(chat_template=...))
  tok = Tokenizer.from_directory(path)  # encoding still works for base models
  assert tok.encode("hi") and tok.chat_template is None
  with pytest.raises(TokenizerError, match=r"tokenizer_config.json has no chat_template .*base model"):
    tok.apply_chat_template(CONVERSATIONS["user_only"])


def test_named_chat_templates(model_dir, tmp_path):
  named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": tf.CHATML_TEMPLATE}]
  path = variant(model_dir, tmp_path, config=edited(chat_template=named))
  hf = AutoTokenizer.from_pretrained(path)
  conversation = CONVERSATIONS["with_system"]
  assert Tokenizer.from_directory(path).apply_chat_template(conversation) == hf.apply_chat_template(
      conversation, tokenize=False, add_generation_prompt=True)
  path = variant(model_dir, tmp_path, config=edited(chat_template=named[:1]))
  with pytest.raises(TokenizerError, match=r"templates \['tool_use'\] and none named \"default\""):
    Tokenizer.from_directory(path)


def test_error_template_syntax(model_dir, tmp_path):
  path = variant(model_dir, tmp_path, config=edited(chat_template="{% for m in messages %}{{ m }}"))
  tok = Tokenizer.from_directory(path)
  with pytest.raises(TokenizerError, match=r"tokenizer_config.json does not compile \(line 1: .*endfor"):
    tok.apply_chat_template(CONVERSATIONS["user_only"])


@pytest.mark.parametrize("changes, message", [
    (dict(eos_token="<|im_stop|>"), r"eos_token '<\|im_stop\|>' is not a token of .*tokenizer.json"),
    (dict(pad_token=["<|endoftext|>"]), r"pad_token=\['<\|endoftext\|>'\] is neither a string nor a dict"),
    (dict(added_tokens_decoder={"5": {"content": "<|im_end|>", "special": True}}),
     r"added_tokens_decoder gives '<\|im_end\|>' id 5, but tokenizer.json gives it id \d+"),
])
def test_error_tokenizer_config(model_dir, tmp_path, changes, message):
  path = variant(model_dir, tmp_path, config=edited(**changes))
  with pytest.raises(TokenizerError, match=message):
    Tokenizer.from_directory(path)


def test_added_token_missing_from_tokenizer_json_is_added(model_dir, tmp_path, tok, trained):
  extra = {str(tok.vocab_size): {"content": "<tool_call>", "special": False, "normalized": False}}
  decoder = {**tf.tokenizer_config(trained)["added_tokens_decoder"], **extra}
  path = variant(model_dir, tmp_path, config=edited(added_tokens_decoder=decoder))
  grown = Tokenizer.from_directory(path)
  reference = AutoTokenizer.from_pretrained(path)
  assert grown.token_to_id("<tool_call>") == tok.vocab_size == reference.convert_tokens_to_ids("<tool_call>")
  assert grown.encode("a<tool_call>b") == reference.encode("a<tool_call>b")


@pytest.mark.parametrize("value, message", [
    ("151645", r"eos_token_id='151645' must be a token id or a non-empty list"),
    ([], r"eos_token_id=\[\] must be a token id"),
    ([True], r"eos_token_id=\[True\] must be a token id"),
    ([151645, 151643], r"eos_token_id holds id\(s\) \[151645, 151643\] outside the tokenizer's \d+ tokens"),
])
def test_error_generation_config(model_dir, tmp_path, value, message):
  path = variant(model_dir, tmp_path, generation=edited(eos_token_id=value))
  with pytest.raises(TokenizerError, match=rf"generation_config.json: {message}"):
    Tokenizer.from_directory(path)


def test_error_no_stop_token(model_dir, tmp_path):
  path = variant(model_dir, tmp_path, config=edited(eos_token=None), generation=edited(eos_token_id=...))
  with pytest.raises(TokenizerError, match=r"No stop token: .*add \"eos_token_id\""):
    Tokenizer.from_directory(path)


def test_error_bad_inputs(tok):
  with pytest.raises(TokenizerError, match="encode takes a str"):
    tok.encode(["a", "b"])
  with pytest.raises(TokenizerError, match="encode_batch takes a list of str"):
    tok.encode_batch("abc")
  with pytest.raises(TokenizerError, match="use decode_batch"):
    tok.decode([[1, 2], [3, 4]])
