"""A small but real Qwen2-style tokenizer directory, built on the spot (nothing is downloaded).

`write_tokenizer_dir(path)` trains a byte-level BPE with Qwen2's pipeline (NFC normalizer,
Qwen2's pre-tokenizer regex split then byte-level, byte-level decoder), adds Qwen's special
tokens after the learnt vocabulary as the real tokenizer does, and writes the three files of a
Hugging Face Qwen2.5-Instruct directory: tokenizer.json, tokenizer_config.json (with a
ChatML chat template in the Qwen2.5-Instruct style) and generation_config.json.
"""

from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Qwen2's pre-tokenizer split (the same regex its tokenizer.json carries).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# A ChatML template in the style of Qwen2.5-Instruct's: a default system message when the
# conversation has none, `<|im_start|>role\ncontent<|im_end|>\n` per message, and
# `<|im_start|>assistant\n` as the generation prompt.
CHATML_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if loop.first and message['role'] == 'system' %}
        {%- continue %}
    {%- endif %}
    {%- if message['role'] not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('Unexpected role ' + message['role'] + ': use system (first only), user, assistant or tool.') }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# A template that touches every helper transformers gives templates: tojson (non-ASCII and <>&
# kept, indent, sort_keys), namespace, dict, both loop controls, strftime_now, the special-token
# variables, tools and documents, `{% generation %}`. Its blocks are plain (no `-`) and indented,
# so it renders right only under trim_blocks + lstrip_blocks.
FEATURES_TEMPLATE = """\
{% set ns = namespace(users=0, last='') %}
{% set meta = dict(eos=eos_token, pad=pad_token) %}
{% for message in messages %}
  {% if message['role'] == 'user' %}
    {% set ns.users = ns.users + 1 %}
  {% endif %}
  {% if message['role'] == 'skip' %}
    {% continue %}
  {% endif %}
  {% if loop.index > 6 %}
    {% break %}
  {% endif %}
[{{ loop.index }}] {{ message | tojson }}
  {% if message['role'] == 'assistant' %}
    {% generation %}
{{ message['content'] | tojson(indent=2) }}
    {% endgeneration %}
  {% else %}
{{ message | tojson(indent=1, sort_keys=true) }}
  {% endif %}
  {% set ns.last = message['role'] %}
{% endfor %}
users={{ ns.users }} last={{ ns.last }} meta={{ meta | tojson }} year={{ strftime_now('%Y') }}
bos={{ bos_token is defined }} unk={{ unk_token | default('-') }} tools={{ tools | tojson }} documents={{ documents is none }}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's a sunny day; we'll walk to the river.\n",
    "Tokenizers split text into pieces: words, sub-words, bytes. Isn't that neat? I'm sure you've seen it.\n",
    "def greet(name: str) -> str:\n    return f\"Hello, {name}!\"\n\nfor i in range(10):\n    print(greet(str(i)))\n",
    "class Model:\n    def __init__(self, layers=28, heads=28):\n        self.layers = layers  # decoder layers\n",
    "import numpy as np\nx = np.arange(12).reshape(3, 4)\nassert x.sum() == 66\n",
    "你好，世界！我们今天学习分词器。中文文本没有空格，所以分词很重要。\n",
    "日本語のテキストも少し入れます。こんにちは、世界。\n",
    "한국어 문장도 있습니다. 안녕하세요!\n",
    "Emoji time 😀🎉🚀 — naïve café, résumé, Ünïcödé déjà vu.\n",
    "Numbers 1234567890 and symbols {}[]()<>=+-*/%&|^~ @#$ \t tabs\t\tand   spaces.\r\n",
)


def train_tokenizer(vocab_size: int = 800) -> Tokenizer:
  """A byte-level BPE with Qwen2's normalizer, pre-tokenizer, decoder and post-processor."""
  tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  return tok


def tokenizer_config(tok: Tokenizer, chat_template: str | None = CHATML_TEMPLATE) -> dict:
  """A Qwen2.5-Instruct-style tokenizer_config.json for `tok`."""
  decoder = {
      str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": True}
      for t in SPECIAL_TOKENS
  }
  config = {
      "add_bos_token": False,
      "add_prefix_space": False,
      "added_tokens_decoder": decoder,
      "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
      "bos_token": None,
      "clean_up_tokenization_spaces": False,
      "eos_token": "<|im_end|>",
      "errors": "replace",
      "model_max_length": 131072,
      "pad_token": "<|endoftext|>",
      "split_special_tokens": False,
      "tokenizer_class": "Qwen2Tokenizer",
      "unk_token": None,
  }
  if chat_template is not None:
    config["chat_template"] = chat_template
  return config


def generation_config(tok: Tokenizer) -> dict:
  """Qwen2.5-Instruct's generation_config.json: stop on <|im_end|> or <|endoftext|>."""
  return {
      "bos_token_id": tok.token_to_id("<|endoftext|>"),
      "pad_token_id": tok.token_to_id("<|endoftext|>"),
      "do_sample": True,
      "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
      "repetition_penalty": 1.05,
      "temperature": 0.7,
      "top_p": 0.8,
      "top_k": 20,
  }


def write_json(path: str | os.PathLike, data) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, ensure_ascii=False, indent=2)


def write_tokenizer_dir(path: str | os.PathLike, tok: Tokenizer | None = None) -> Tokenizer:
  """Writes tokenizer.json, tokenizer_config.json and generation_config.json into `path`."""
  tok = tok or train_tokenizer()
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  write_json(os.path.join(path, "tokenizer_config.json"), tokenizer_config(tok))
  write_json(os.path.join(path, "generation_config.json"), generation_config(tok))
  return tok
