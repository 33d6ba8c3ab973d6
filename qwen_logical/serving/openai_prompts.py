"""The prompt of an OpenAI request as token ids: chat messages (roles checked, content parts joined,
tool calls made template-ready) through the checkpoint's chat template, with the request's
`chat_template_kwargs` as template variables (e.g. Qwen3's {"enable_thinking": false}), or
completions' prompts (a string, token ids, or a list of either), each checked against the
vocabulary and the context.

    ids = chat_tokens(body, served, tools)        # RequestError naming the field on bad input
    batch = prompt_batch(body, served)            # [(ids, text or None), ...]
"""

from __future__ import annotations

from typing import Any

from qwen_logical.checkpoints.chat_template import RESERVED_NAMES
from qwen_logical.checkpoints.tokenizer_files import NAMED_SPECIAL_TOKENS
from qwen_logical.serving import completions, openai_tools
from qwen_logical.serving.completions import RequestError
from qwen_logical.serving.openai_fields import expect

ROLES = ("system", "user", "assistant", "tool")
# Template variables a request's chat_template_kwargs may not set: what the server passes the template itself.
TEMPLATE_RESERVED = (*RESERVED_NAMES, *NAMED_SPECIAL_TOKENS)


def chat_tokens(body: dict, served, tools=None) -> list[int]:
  messages = expect(body, "messages", list, required=True)
  if not messages:
    raise RequestError("`messages` is empty: send at least one message, e.g. {\"role\": \"user\", "
                       "\"content\": \"Hi\"}.", "messages")
  plain = []
  for i, message in enumerate(messages):
    where = f"messages.[{i}]"
    if not isinstance(message, dict):
      raise RequestError(f"{where} must be an object with `role` and `content`.", where)
    role = expect(message, "role", str, required=True, where=where)
    if role == "developer":  # OpenAI's newer name for the system role
      role = "system"
    if role not in ROLES:
      raise RequestError(f"{where}.role is {role!r}: use one of {', '.join(ROLES)} (or developer).",
                         f"{where}.role")
    plain.append({**message, "role": role, "content": _content(message.get("content"), f"{where}.content")})
  plain = openai_tools.plain_messages(plain)
  listed = tools.tools_for_template if tools is not None else None
  variables = template_kwargs(body)
  return _checked_ids(completions.chat_prompt(served.tokenizer, plain, listed, variables), served, "messages")


def template_kwargs(body: dict) -> dict:
  """`chat_template_kwargs`: an object whose entries reach the chat template as variables ({} if absent)."""
  kwargs = expect(body, "chat_template_kwargs", dict, default={})
  for name in kwargs:
    if not isinstance(name, str):
      raise RequestError(f"chat_template_kwargs has the key {name!r}: its keys are template variable names "
                         "(strings).", "chat_template_kwargs")
    if name in TEMPLATE_RESERVED:
      raise RequestError(f"chat_template_kwargs sets `{name}`, a variable the server gives the chat template "
                         f"itself (reserved: {', '.join(TEMPLATE_RESERVED)}): leave it out, and send messages and "
                         "tools as request fields.", "chat_template_kwargs")
  return kwargs


def _content(content: Any, where: str) -> str:
  """A message's text: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
  if content is None or isinstance(content, str):
    return content or ""
  if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in content):
    return "".join(p["text"] for p in content)
  raise RequestError(f"{where} must be a string or a list of text parts ({{\"type\": \"text\", \"text\": "
                     "...}); images and audio are not supported.", where)


def prompt_batch(body: dict, served) -> list[tuple[list[int], str | None]]:
  """(token ids, text or None) of each prompt: `prompt` is a string, a list of token ids, or a list of
  either (several prompts)."""
  prompt = body.get("prompt")
  is_ids = lambda p: isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
  if isinstance(prompt, str) or (is_ids(prompt) and prompt):
    prompt = [prompt]
  if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) or is_ids(p) for p in prompt):
    raise RequestError("`prompt` must be a string, a list of token ids (ints), or a list of either (several "
                       "prompts)." if "prompt" in body else "Missing required parameter: `prompt`.", "prompt")
  batch = []
  for i, p in enumerate(prompt):
    param = "prompt" if len(prompt) == 1 else f"prompt.[{i}]"
    ids = completions.text_prompt(served.tokenizer, p) if isinstance(p, str) else list(p)
    batch.append((_checked_ids(ids, served, param), p if isinstance(p, str) else None))
  return batch


def _checked_ids(ids: list[int], served, param: str) -> list[int]:
  if not ids:
    raise RequestError(f"The {param} is empty: the model needs at least one prompt token.", param)
  bad = [t for t in ids if not 0 <= t < served.vocab_size]
  if bad:
    raise RequestError(f"Token id(s) {bad[:5]} are outside this model's vocabulary [0, {served.vocab_size}).",
                       param)
  if len(ids) >= served.context:
    raise RequestError(f"This model's maximum context length is {served.context} tokens, but the {param} has "
                       f"{len(ids)} tokens (at least one must be left to generate); shorten it.", param)
  return ids


def echo_text(text: str | None, ids: list[int], served) -> str:
  if text is not None:
    return text
  return served.tokenizer.decode(ids) if served.tokenizer is not None else ""
