"""A tokenizer directory's stop and pad ids and its errors, against transformers (the reference) on a
real Qwen2-style tokenizer built on the spot (encode, decode, chat template: test_tokenizer.py)."""

import os

import pytest
import tokenizer_files as tf
from tokenizer_fixtures import CONVERSATIONS, edited, hf, model_dir, tok, trained, variant  # noqa: F401 (fixtures)
from transformers import AutoTokenizer

from qwen_logical.checkpoints.tokenizer import Tokenizer, TokenizerError


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
