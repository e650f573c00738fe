"""Conversation records for instruction fine-tuning: read JSONL, JSON or Parquet files in any of the supported
schemas into chat messages ([{'role', 'content'}, ...]), which minillm_jax.data.template.render_ids turns into
token ids and the loss mask.

Schemas, detected per file from the first record's fields:
  - `messages`: a list of {role, content}, roles system / user / assistant;
  - Alpaca (`alpaca`): `instruction`, `input` (may be empty), `output`;
  - OpenCoder opc-sft (`opc-sft`): `instruction`, `output`, no `input` field.
  Alpaca and opc-sft become [user, assistant]: user = instruction, plus '\\n\\n' + input when input is not
  empty; assistant = output. Other fields are ignored.

Packing (`pack`, used by data.prepare for data.format=chat). Training windows are block_size + 1 tokens
(inputs, and targets shifted by one). Each conversation is rendered with render_ids and followed by one
`<|endoftext|>` (mask 0); this unit is placed whole, in a seeded shuffled order, into the current window when it
fits in the space left, else into a new window; the space a unit does not fill at the end of a window is `<|pad|>`
(mask 0). So every window starts at the first token of a conversation, a window never starts mid-conversation
without its context, and no masked-in token is lost to a window's first position (a conversation starts with a
role marker, mask 0). A conversation whose unit is longer than block_size + 1 tokens is dropped, never cut
(cutting a single-turn record would keep its prompt without its reply); the prepare summary counts the dropped
conversations and their tokens, and the padding. Conversations in one window may attend to those before them in
it, as documents do in pretraining; the `<|endoftext|>` between them marks the boundary.
"""
from __future__ import annotations

import json
import os

import numpy as np
from ml_collections import ConfigDict

from minillm_jax.config import UserError

ROLES = ('system', 'user', 'assistant')


SCHEMAS = ('messages', 'alpaca', 'opc-sft')


class _Bad(Exception):
  """A bad record; read_records adds the file and the record number."""


def detect_schema(fields) -> str | None:
  """The schema a record with these field names fits, or None."""
  fields = set(fields)
  if 'messages' in fields:
    return 'messages'
  if {'instruction', 'output'} <= fields:
    return 'alpaca' if 'input' in fields else 'opc-sft'
  return None


def read_records(path: str) -> tuple[str, list[list[dict]]]:
  """(schema, conversations) of a .jsonl, .json (a list of records; JSON lines also accepted) or .parquet
  file. Raises UserError, one line: for a file that fits no schema (naming the fields it has), and for a bad
  record (naming the file and the record number, counted from 1): missing or non-string content, a role other
  than system/user/assistant, an empty conversation, no assistant turn."""
  return convert_records(_load(path), path)


def convert_records(records: list, where: str) -> tuple[str, list[list[dict]]]:
  """(schema, conversations) of records (dicts) from `where` (a file or a hub dataset): see read_records."""
  if not records:
    raise UserError(f'{where}: no records')
  first = records[0]
  if not isinstance(first, dict):
    raise UserError(f'{where}: record 1 is a {type(first).__name__}, not an object with fields')
  schema = detect_schema(first)
  if schema is None:
    has = ', '.join(sorted(map(str, first))) or 'none'
    raise UserError(f'{where}: no chat schema fits its fields ({has}); expected `messages` (a list of '
                    '{role, content}), or `instruction` + `output` (Alpaca: + `input`)')
  convert = _messages if schema == 'messages' else _instruction
  out = []
  for n, rec in enumerate(records, 1):
    try:
      if not isinstance(rec, dict):
        raise _Bad(f'is a {type(rec).__name__}, not an object with fields')
      out.append(convert(rec))
    except _Bad as e:
      raise UserError(f'{where}: record {n} ({schema} schema) {e}') from None
  return schema, out


def _load(path: str) -> list:
  ext = os.path.basename(path).lower().rsplit('.', 1)[-1]
  if ext == 'parquet':
    import pyarrow.parquet as pq  # through `datasets`; only chat data read from Parquet needs it
    try:
      return pq.read_table(path).to_pylist()
    except OSError as e:
      raise UserError(f'cannot read {path}: {e}') from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid for a file that is not Parquet
      raise UserError(f'{path}: not a readable Parquet file ({" ".join(str(e).split())[:200]})') from None
  if ext not in ('jsonl', 'json'):
    raise UserError(f'{path}: chat data must be a .jsonl, .json or .parquet file')
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except OSError as e:
    raise UserError(f'cannot read {path}: {e.strerror}') from None
  except UnicodeDecodeError:
    raise UserError(f'{path}: not UTF-8 text') from None
  if ext == 'json':
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      if e.msg != 'Extra data':  # 'Extra data': JSON lines in a .json file, read below
        raise UserError(f'{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}') from None
    else:
      if not isinstance(data, list):
        raise UserError(f'{path}: a .json chat file must hold a list of records, not a {type(data).__name__}')
      return data
  records = []
  for i, line in enumerate(text.splitlines(), 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise UserError(f'{path}: line {i} is not valid JSON: {e.msg}') from None
  return records


def _text(rec: dict, field: str, what: str) -> str:
  v = rec.get(field)
  if v is None:
    raise _Bad(f'has no {what}')
  if not isinstance(v, str):
    raise _Bad(f'{what} is a {type(v).__name__}, not a string')
  return v


def _messages(rec: dict) -> list[dict]:
  msgs = rec.get('messages')
  if msgs is None:
    raise _Bad('has no `messages`')
  if isinstance(msgs, list) and not msgs:
    raise _Bad('is an empty conversation')
  if not isinstance(msgs, list):
    raise _Bad(f'`messages` is a {type(msgs).__name__}, not a list of {{role, content}}')
  out = []
  for j, m in enumerate(msgs, 1):
    if not isinstance(m, dict):
      raise _Bad(f'message {j} is a {type(m).__name__}, not a {{role, content}} object')
    role = m.get('role')
    if role not in ROLES:
      raise _Bad(f'message {j} has role {role!r}; roles are system, user, assistant')
    out.append({'role': role, 'content': _text(m, 'content', f'content in message {j}')})
  if not any(m['role'] == 'assistant' for m in out):
    raise _Bad('has no assistant turn')
  return out


def _instruction(rec: dict) -> list[dict]:
  instruction, output = _text(rec, 'instruction', '`instruction`'), _text(rec, 'output', '`output`')
  if not instruction.strip():
    raise _Bad('has an empty `instruction`')
  if not output.strip():
    raise _Bad('has an empty `output` (no assistant turn)')
  extra = rec.get('input')
  if extra is not None and not isinstance(extra, str):
    raise _Bad(f'`input` is a {type(extra).__name__}, not a string')
  user = f'{instruction}\n\n{extra}' if extra else instruction
  return [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': output}]


# ------------------------------------------------------------------------------------- corpora and packing

def conversations(d: ConfigDict) -> tuple[list[list[dict]], list[list[dict]], dict]:
  """(train, val, info) conversations of data.corpus for data.format=chat: python_instruct (its own split by
  source file), or local files / a hub dataset split like text documents (by content hash, see
  corpora.split_docs: identical conversations on one side). data.max_docs keeps the first N records. With
  data.val_path, its chat files are the validation set and every conversation of the corpus trains."""
  train, val, info = _split_conversations(d)
  if d.get('val_path'):
    from minillm_jax.data import corpora
    train, val = train + val, [c for f in corpora.local_files(d.val_path, 'data.val_path') for c in read_records(f)[1]]
    info = {**info, 'val_path': d.val_path}
  return train, val, info


def _split_conversations(d: ConfigDict) -> tuple[list[list[dict]], list[list[dict]], dict]:
  from minillm_jax.data import corpora, hub, instruct
  if d.corpus == 'python_instruct':
    train, val, info = instruct.build(d.val_fraction)
    if d.max_docs:  # the first N of each side, in proportion
      k = max(1, round(d.max_docs * len(val) / (len(train) + len(val))))
      train, val = train[:max(1, d.max_docs - k)], val[:k]
    return train, val, {'corpus': 'python_instruct', **info}
  if d.corpus == 'local':
    convs, schemas = [], {}
    for f in corpora.local_files(d.path):
      schema, got = read_records(f)
      schemas[f] = schema
      convs += got
  elif d.corpus == 'hub':
    where = f'hub dataset {d.hub_name}' + (f' subset {d.hub_config}' if d.hub_config else '')
    schema, convs = convert_records(hub.dataset_records(d.hub_name, d.hub_split, d.max_docs, d.hub_config,
                                                        d.hub_revision), where)
    schemas = {where: schema}
  else:
    raise UserError(f'data.format=chat cannot read data.corpus={d.corpus}; use python_instruct, local or hub')
  if d.max_docs:
    convs = convs[:d.max_docs]
  if len(convs) < 2:
    raise UserError(f'data.corpus={d.corpus} has {len(convs)} conversation(s); a train and a val split need 2 or '
                    'more')
  keyed = [json.dumps(c, ensure_ascii=False, sort_keys=True) for c in convs]
  train, val, _ = corpora.split_docs(keyed, d.val_fraction)
  return ([json.loads(c) for c in train], [json.loads(c) for c in val],
          {'corpus': d.corpus, 'schemas': schemas, 'conversations': len(convs)})


def pack(units: list[tuple[list[int], list[int]]], window: int, pad_id: int, seed: int = 0
         ) -> tuple[np.ndarray, np.ndarray, dict]:
  """Packs (ids, mask) units into rows of `window` tokens by the rule in this module's docstring: returns flat
  ids [rows * window] (int64), mask [rows * window] (uint8) and counts (rows, kept, dropped and their tokens,
  pad tokens, masked-in tokens). The order is a seeded permutation, so packing is deterministic."""
  order = np.random.default_rng([seed, 0xC4A7]).permutation(len(units))
  rows_ids, rows_mask, cur_ids, cur_mask = [], [], [], []
  dropped = dropped_tokens = 0

  def close():
    pad = window - len(cur_ids)
    rows_ids.append(cur_ids + [pad_id] * pad)
    rows_mask.append(cur_mask + [0] * pad)

  for i in order:
    ids, mask = units[i]
    if len(ids) > window:
      dropped += 1
      dropped_tokens += len(ids)
      continue
    if len(cur_ids) + len(ids) > window:
      close()
      cur_ids, cur_mask = [], []
    cur_ids, cur_mask = cur_ids + list(ids), cur_mask + list(mask)
  if cur_ids:
    close()
  ids = np.asarray(rows_ids, np.int64).reshape(-1)
  mask = np.asarray(rows_mask, np.uint8).reshape(-1)
  n_pad = len(ids) - sum(len(units[i][0]) for i in order if len(units[i][0]) <= window)
  return ids, mask, {'rows': len(rows_ids), 'conversations': len(units) - dropped, 'dropped': dropped,
                     'dropped_tokens': dropped_tokens, 'pad_tokens': n_pad, 'tokens': len(ids),
                     'assistant_tokens': int(mask.sum()),
                     'pad_fraction': round(n_pad / max(1, len(ids)), 4)}
