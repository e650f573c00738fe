"""The one chat template of the project: what fine-tuning trains on and what chat renders, token for token."""
from __future__ import annotations

import json

from minillm_jax.config import UserError

SYSTEM, USER, ASSISTANT, END = '<|system|>', '<|user|>', '<|assistant|>', '<|end|>'
TAGS = {'system': SYSTEM, 'user': USER, 'assistant': ASSISTANT}


def render_template(messages: list[dict], add_generation_prompt: bool = True) -> str:
  """The chat template, shared with fine-tuning (train on exactly this text, loss on the assistant parts):

    <|system|>{system}<|end|>                               only when there is a system message
    <|user|>{message}<|end|><|assistant|>{reply}<|end|>     one per exchange, no newlines between markers
    <|user|>{message}<|end|><|assistant|>                   generation prompt: the model writes reply + <|end|>

  `messages`: [{'role': 'system'|'user'|'assistant', 'content': str}, ...]."""
  out = []
  for m in messages:
    if m['role'] not in TAGS:
      raise ValueError(f'unknown chat role {m["role"]!r}')
    out.append(f'{TAGS[m["role"]]}{m["content"]}{END}')
  if add_generation_prompt:
    out.append(ASSISTANT)
  return ''.join(out)


def hf_chat_template() -> str:
  """render_template as a Hugging Face Jinja `chat_template` (tokenizer_config.json), built from the same
  constants so the two cannot drift: `tokenizer.apply_chat_template(messages, add_generation_prompt=...)` renders
  the same text, hence (special tokens split out first) the same ids as render_ids. One line with no literal
  text between the tags: transformers renders with trim_blocks/lstrip_blocks, and any template whitespace would
  be output. An unknown role raises, as render_template does (`raise_exception` is transformers' helper)."""
  q = json.dumps  # a JSON string is a valid Jinja string literal (the tags hold no quotes or backslashes)
  tags = '{' + ', '.join(f'{q(r)}: {q(t)}' for r, t in TAGS.items()) + '}'
  return (f'{{%- set tags = {tags} -%}}'
          '{%- for message in messages -%}'
          '{%- if message["role"] not in tags -%}'
          '{{- raise_exception("unknown chat role \'" ~ message["role"] ~ "\'") -}}'
          '{%- endif -%}'
          f'{{{{- tags[message["role"]] ~ message["content"] ~ {q(END)} -}}}}'
          '{%- endfor -%}'
          f'{{%- if add_generation_prompt -%}}{{{{- {q(ASSISTANT)} -}}}}{{%- endif -%}}')


def render_ids(tok, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
  """render_template(messages) as token ids, and the loss mask beside them: (ids, mask), equal lengths.

  mask[i] is 1 when ids[i] is an assistant reply's token or the `<|end|>` that closes the reply, 0 for
  everything else: system and user text, every role marker (`<|assistant|>` included), the `<|end|>` of system
  and user messages, and the generation prompt. Every assistant turn of a multi-turn conversation is masked in.
  The mask is per token, not per target: a window ids[s:s+T+1] trains inputs ids[s:s+T] on targets
  ids[s+1:s+T+1] with the loss mask mask[s+1:s+T+1].

  Tokenized piecewise: each marker is its special-token id, each content is `tok.encode(content)`. Special
  tokens are split out before any pre-tokenization, so for this project's tokenizers (byte-level BPE, char)
  the pieces joined are exactly `tok.encode(render_template(messages, add_generation_prompt))`
  (tests/test_sft_data.py). A content that itself contains a marker's text encodes it as that marker, as the
  whole text would. `tok`: a minillm_jax.data.tokenizer.Tok with the chat tokens (UserError otherwise)."""
  ids_of = {}
  for t in (SYSTEM, USER, ASSISTANT, END):
    i = tok.token_to_id(t)
    if i is None:
      raise UserError(f'the tokenizer has no {t} token: the chat template needs its special tokens '
                      f'{SYSTEM} {USER} {ASSISTANT} {END} (tokenizers made by this project have them)')
    ids_of[t] = i
  for m in messages:
    if m['role'] not in TAGS:
      raise ValueError(f'unknown chat role {m["role"]!r}')
  contents = tok.encode_batch([m['content'] for m in messages]) if messages else []
  ids, mask = [], []
  for m, body in zip(messages, contents):
    keep = int(m['role'] == 'assistant')
    ids += [ids_of[TAGS[m['role']]], *body, ids_of[END]]
    mask += [0] + [keep] * (len(body) + 1)
  if add_generation_prompt:
    ids.append(ids_of[ASSISTANT])
    mask.append(0)
  return ids, mask


PLAIN_STOPS = ('\nUser:', '\nAssistant:')  # where a reply ends in render_plain's transcript


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
