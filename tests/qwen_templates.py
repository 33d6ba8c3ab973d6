"""Chat templates for the tests, written for them (nothing is downloaded).

    from qwen_templates import QWEN25_TEMPLATE
    text = ChatTemplate(QWEN25_TEMPLATE).render(messages, add_generation_prompt=True, tools=tools)

QWEN25_TEMPLATE renders a conversation in Qwen2.5-Instruct's format, tools included:

- the system turn holds the first message when it is a system message, else "You are Qwen, created
  by Alibaba Cloud. You are a helpful assistant."; with `tools` it goes on with a "# Tools" section
  that lists each tool as JSON, one a line, inside <tools></tools>, and tells the model to answer
  `<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>`;
- an assistant message with `tool_calls` writes its content (if any), then one such block per call
  (`arguments` through tojson when it is a mapping, as written when it is text);
- `tool` messages answer inside a user turn, each as `<tool_response>\\n...\\n</tool_response>`, and
  consecutive ones share that turn;
- every other message is `<|im_start|>role\\ncontent<|im_end|>\\n`; the generation prompt is
  `<|im_start|>assistant\\n`.

QWEN3_TEMPLATE renders a conversation as Qwen3's templates do (written for these tests, not copied):

- a system turn only when the first message is a system message or there are tools (the same "# Tools"
  section as above after the system text and a blank line); no default system text;
- assistant turns hold their reasoning apart: `reasoning_content` when the message has it, else the text
  before `</think>` in its content (after any `<think>`), the content being what follows; turns after the
  last user message write `<think>\n{reasoning}\n</think>\n\n{content}`, earlier ones the content only;
  tool calls, tool responses and other turns as above;
- the generation prompt is `<|im_start|>assistant\n`, followed by an empty `<think>\n\n</think>\n\n`
  block when the variable `enable_thinking` is defined and false (the model then answers directly).

WEATHER and TIME are example tools (OpenAI's shape); tool_call_block(name, arguments) is a call as
Qwen2.5 writes it.
"""

import json

# The pieces Qwen2.5's and Qwen3's templates share: the tools' signatures in the system message, and a past
# call's arguments (a mapping as JSON, a string as it is). Jinja's "-" trims make indentation irrelevant.
_TOOL_SIGNATURES = r"""
  {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
  {%- for tool in tools %}
    {{- '\n' + (tool | tojson) }}
  {%- endfor %}
  {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within ' }}
  {{- '<tool_call></tool_call> XML tags:\n<tool_call>\n' }}
  {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' }}
"""
_CALL_ARGUMENTS = r"""
      {%- if fn['arguments'] is mapping %}
        {{- fn['arguments'] | tojson }}
      {%- else %}
        {{- fn['arguments'] }}
      {%- endif %}
      {{- '}\n</tool_call>' }}
"""

QWEN25_TEMPLATE = r"""{%- set first_is_system = messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\n' }}
{%- if first_is_system %}
  {{- messages[0]['content'] }}
{%- else %}
  {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
{%- endif %}
{%- if tools %}
  {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
""" + _TOOL_SIGNATURES + r"""{%- endif %}
{{- '<|im_end|>\n' }}
{%- for message in messages %}
  {%- if loop.first and first_is_system %}
    {%- continue %}
  {%- endif %}
  {%- if message['role'] == 'tool' %}
    {%- if loop.previtem is not defined or loop.previtem['role'] != 'tool' %}
      {{- '<|im_start|>user' }}
    {%- endif %}
    {{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}
    {%- if loop.nextitem is not defined or loop.nextitem['role'] != 'tool' %}
      {{- '<|im_end|>\n' }}
    {%- endif %}
  {%- elif message['role'] == 'assistant' and message['tool_calls'] %}
    {{- '<|im_start|>assistant' }}
    {%- if message['content'] %}
      {{- '\n' + message['content'] }}
    {%- endif %}
    {%- for call in message['tool_calls'] %}
      {%- set fn = call['function'] if call['function'] is defined else call %}
      {{- '\n<tool_call>\n{"name": "' + fn['name'] + '", "arguments": ' }}
""" + _CALL_ARGUMENTS + r"""    {%- endfor %}
    {{- '<|im_end|>\n' }}
  {%- else %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = r"""{%- if tools or messages[0]['role'] == 'system' %}
  {{- '<|im_start|>system\n' }}
  {%- if messages[0]['role'] == 'system' %}
    {{- messages[0]['content'] }}
    {%- if tools %}
      {{- '\n\n' }}
    {%- endif %}
  {%- endif %}
  {%- if tools %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
""" + _TOOL_SIGNATURES + r"""  {%- endif %}
  {{- '<|im_end|>\n' }}
{%- endif %}
{%- set state = namespace(last_user=-1) %}
{%- for message in messages %}
  {%- if message['role'] == 'user' %}
    {%- set state.last_user = loop.index0 %}
  {%- endif %}
{%- endfor %}
{%- for message in messages %}
  {%- set text = message['content'] if message['content'] is string else '' %}
  {%- if loop.first and message['role'] == 'system' %}
    {%- continue %}
  {%- elif message['role'] == 'tool' %}
    {%- if loop.previtem is not defined or loop.previtem['role'] != 'tool' %}
      {{- '<|im_start|>user' }}
    {%- endif %}
    {{- '\n<tool_response>\n' + text + '\n</tool_response>' }}
    {%- if loop.nextitem is not defined or loop.nextitem['role'] != 'tool' %}
      {{- '<|im_end|>\n' }}
    {%- endif %}
  {%- elif message['role'] == 'assistant' %}
    {%- set thought = '' %}
    {%- if message['reasoning_content'] is string %}
      {%- set thought = message['reasoning_content'] %}
    {%- elif '</think>' in text %}
      {%- set thought = text.split('</think>')[0].split('<think>')[-1].strip('\n') %}
      {%- set text = text.split('</think>')[-1].lstrip('\n') %}
    {%- endif %}
    {{- '<|im_start|>assistant\n' }}
    {%- if loop.index0 > state.last_user and thought %}
      {{- '<think>\n' + thought + '\n</think>\n\n' }}
    {%- endif %}
    {{- text }}
    {%- for call in message['tool_calls'] or [] %}
      {%- set fn = call['function'] if call['function'] is defined else call %}
      {%- if text or not loop.first %}
        {{- '\n' }}
      {%- endif %}
      {{- '<tool_call>\n{"name": "' + fn['name'] + '", "arguments": ' }}
""" + _CALL_ARGUMENTS + r"""    {%- endfor %}
    {{- '<|im_end|>\n' }}
  {%- else %}
    {{- '<|im_start|>' + message['role'] + '\n' + text + '<|im_end|>\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|im_start|>assistant\n' }}
  {%- if enable_thinking is defined and enable_thinking is false %}
    {{- '<think>\n\n</think>\n\n' }}
  {%- endif %}
{%- endif %}
"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def tool_call_block(name: str, arguments) -> str:
  """`<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`, the JSON as the template's tojson writes it."""
  return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"
