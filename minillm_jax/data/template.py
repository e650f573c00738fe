"""The one chat template of the project: what fine-tuning trains on and what chat renders, token for token."""
from __future__ import annotations

SYSTEM, USER, ASSISTANT, END = '<|system|>', '<|user|>', '<|assistant|>', '<|end|>'


def render_template(messages: list[dict], add_generation_prompt: bool = True) -> str:
  """The chat template, shared with fine-tuning (train on exactly this text, loss on the assistant parts):

    <|system|>{system}<|end|>                               only when there is a system message
    <|user|>{message}<|end|><|assistant|>{reply}<|end|>     one per exchange, no newlines between markers
    <|user|>{message}<|end|><|assistant|>                   generation prompt: the model writes reply + <|end|>

  `messages`: [{'role': 'system'|'user'|'assistant', 'content': str}, ...]."""
  tags = {'system': SYSTEM, 'user': USER, 'assistant': ASSISTANT}
  out = []
  for m in messages:
    if m['role'] not in tags:
      raise ValueError(f'unknown chat role {m["role"]!r}')
    out.append(f'{tags[m["role"]]}{m["content"]}{END}')
  if add_generation_prompt:
    out.append(ASSISTANT)
  return ''.join(out)


def render_plain(messages: list[dict], add_generation_prompt: bool = True) -> str:
  """Plain transcript for models without the template: 'User: ...\\nAssistant: ...\\n' per exchange."""
  out = []
  for m in messages:
    if m['role'] == 'system':
      out.append(f'{m["content"]}\n\n')
    else:
      out.append(f'{"User" if m["role"] == "user" else "Assistant"}: {m["content"]}\n')
  if add_generation_prompt:
    out.append('Assistant:')
  return ''.join(out)
