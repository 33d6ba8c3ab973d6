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

WEATHER and TIME are example tools (OpenAI's shape); tool_call_block(name, arguments) is a call as
Qwen2.5 writes it.
"""

import json

QWEN25_TEMPLATE = r"""{%- set first_is_system = messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\n' }}
{%- if first_is_system %}
  {{- messages[0]['content'] }}
{%- else %}
  {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
{%- endif %}
{%- if tools %}
  {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
  {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
  {%- for tool in tools %}
    {{- '\n' + (tool | tojson) }}
  {%- endfor %}
  {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within ' }}
  {{- '<tool_call></tool_call> XML tags:\n<tool_call>\n' }}
  {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' }}
{%- endif %}
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
      {%- if fn['arguments'] is mapping %}
        {{- fn['arguments'] | tojson }}
      {%- else %}
        {{- fn['arguments'] }}
      {%- endif %}
      {{- '}\n</tool_call>' }}
    {%- endfor %}
    {{- '<|im_end|>\n' }}
  {%- else %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|im_start|>assistant\n' }}
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
