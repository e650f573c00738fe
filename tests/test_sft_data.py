"""Instruction data: the chat records of every schema and file format (data.chat_data), the ids and loss mask
of the chat template (data.template.render_ids), and the refusals of bad files and records."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from minillm_jax.config import UserError
from minillm_jax.data import chat_data, template
from minillm_jax.data.tokenizer import Tok, build_char, train_bpe

CONVERSATION = [
    {'role': 'system', 'content': 'You are terse.'},
    {'role': 'user', 'content': 'Add 2 and 3.'},
    {'role': 'assistant', 'content': 'def add(a, b):\n    return a + b  # 5'},
    {'role': 'user', 'content': 'And <|end|> weird ünïcode \u2603?'},
    {'role': 'assistant', 'content': 'Sure: ✓ 日本語\n\n'},
]
DOCS = [m['content'] for m in CONVERSATION] * 20 + ['the quick brown fox jumps over the lazy dog\n' * 30]


@pytest.fixture(scope='module', params=['bpe', 'char'])
def tok(request):
  return train_bpe(DOCS, 300) if request.param == 'bpe' else build_char(DOCS)


def _assistant_spans(tok, messages):
  """The expected mask, built independently: 1 on the tokens of each assistant content and its <|end|>."""
  want = []
  for m in messages:
    n = len(tok.encode(m['content']))
    want += [0] + [int(m['role'] == 'assistant')] * (n + 1)
  return want


@pytest.mark.parametrize('gen', [False, True])
def test_render_ids_is_the_template_tokenized(tok, gen):
  ids, mask = template.render_ids(tok, CONVERSATION, add_generation_prompt=gen)
  assert ids == tok.encode(template.render_template(CONVERSATION, add_generation_prompt=gen))
  assert len(mask) == len(ids)
  assert mask == _assistant_spans(tok, CONVERSATION) + ([0] if gen else [])
  # the masked-in tokens decode to exactly the assistant replies, each with its <|end|>
  end, asst = tok.token_to_id(template.END), tok.token_to_id(template.ASSISTANT)
  runs, cur = [], []
  for i, m in zip(ids, mask):
    if m:
      cur.append(i)
    elif cur:
      runs.append(cur)
      cur = []
  runs += [cur] if cur else []
  assert [tok.decode(r) for r in runs] == [m['content'] + template.END for m in CONVERSATION
                                           if m['role'] == 'assistant']
  assert all(r[-1] == end for r in runs)
  # markers are single special tokens and never masked in
  for t in (template.SYSTEM, template.USER, template.ASSISTANT):
    tid = tok.token_to_id(t)
    assert all(m == 0 for i, m in zip(ids, mask) if i == tid)
  assert ids.count(asst) == 2 + gen and ids.count(end) == len(CONVERSATION) + 1  # + the one inside user text


def test_render_ids_refuses_a_tokenizer_without_chat_tokens():
  raw = Tokenizer(models.WordLevel({'<|endoftext|>': 0, 'a': 1, '<|unk|>': 2}, unk_token='<|unk|>'))
  raw.pre_tokenizer = pre_tokenizers.Split('a', behavior='isolated')
  raw.add_special_tokens(['<|endoftext|>'])
  with pytest.raises(UserError, match=r'no <\|system\|> token'):
    template.render_ids(Tok(raw), CONVERSATION)


def _write(path, records, fmt):
  if fmt == 'jsonl':
    path.write_text(''.join(json.dumps(r) + '\n' for r in records), encoding='utf-8')
  elif fmt == 'json':
    path.write_text(json.dumps(records), encoding='utf-8')
  else:
    pq.write_table(pa.Table.from_pylist(records), str(path))
  return str(path)


MESSAGES = [{'messages': CONVERSATION}, {'messages': [{'role': 'user', 'content': 'hi'},
                                                      {'role': 'assistant', 'content': 'hello'}]}]
ALPACA = [{'instruction': 'Reverse a list.', 'input': '[1, 2, 3]', 'output': '[3, 2, 1]'},
          {'instruction': 'Say hi.', 'input': '', 'output': 'hi'}]
OPC = [{'instruction': 'Write add().', 'output': 'def add(a, b):\n    return a + b', 'tag': 'code'},
       {'instruction': 'Write neg().', 'output': 'def neg(a):\n    return -a', 'tag': 'code'}]
EXPECTED = {
    'messages': [CONVERSATION, MESSAGES[1]['messages']],
    'alpaca': [[{'role': 'user', 'content': 'Reverse a list.\n\n[1, 2, 3]'}, {'role': 'assistant', 'content': '[3, 2, 1]'}],
               [{'role': 'user', 'content': 'Say hi.'}, {'role': 'assistant', 'content': 'hi'}]],
    'opc-sft': [[{'role': 'user', 'content': 'Write add().'},
                 {'role': 'assistant', 'content': 'def add(a, b):\n    return a + b'}],
                [{'role': 'user', 'content': 'Write neg().'}, {'role': 'assistant', 'content': 'def neg(a):\n    return -a'}]],
}


@pytest.mark.parametrize('fmt', ['jsonl', 'json', 'parquet'])
@pytest.mark.parametrize('schema,records', [('messages', MESSAGES), ('alpaca', ALPACA), ('opc-sft', OPC)])
def test_read_records_every_schema_and_format(tmp_path, tok, fmt, schema, records):
  path = _write(tmp_path / f'data.{fmt}', records, fmt)
  got_schema, convs = chat_data.read_records(path)
  assert got_schema == schema
  assert convs == EXPECTED[schema]
  for conv in convs:  # the mask covers exactly the assistant spans
    ids, mask = template.render_ids(tok, conv)
    assert ids == tok.encode(template.render_template(conv, add_generation_prompt=False))
    assert mask == _assistant_spans(tok, conv)
    assert sum(mask) == sum(len(tok.encode(m['content'])) + 1 for m in conv if m['role'] == 'assistant')


def test_json_lines_in_a_json_file(tmp_path):
  path = tmp_path / 'd.json'
  path.write_text(''.join(json.dumps(r) + '\n' for r in OPC), encoding='utf-8')
  assert chat_data.read_records(str(path)) == ('opc-sft', EXPECTED['opc-sft'])


@pytest.mark.parametrize('fmt', ['jsonl', 'parquet'])
def test_a_file_that_fits_no_schema_names_its_fields(tmp_path, fmt):
  path = _write(tmp_path / f'd.{fmt}', [{'prompt': 'a', 'completion': 'b'}], fmt)
  with pytest.raises(UserError) as e:
    chat_data.read_records(path)
  msg = str(e.value)
  assert '\n' not in msg and path in msg and 'no chat schema fits its fields (completion, prompt)' in msg


@pytest.mark.parametrize('records,why', [
    ([MESSAGES[1], {'messages': [{'role': 'user'}, {'role': 'assistant', 'content': 'x'}]}],
     'record 2 (messages schema) has no content in message 1'),
    ([MESSAGES[1], MESSAGES[1], {'messages': [{'role': 'tool', 'content': 'x'}]}],
     "record 3 (messages schema) message 1 has role 'tool'; roles are system, user, assistant"),
    ([{'messages': []}], 'record 1 (messages schema) is an empty conversation'),
    ([MESSAGES[1], {'instruction': 'x', 'output': 'y'}], 'record 2 (messages schema) has no `messages`'),
    ([MESSAGES[1], ['a list']], 'record 2 (messages schema) is a list, not an object with fields'),
    ([MESSAGES[1], {'messages': [{'role': 'user', 'content': 'x'}]}], 'record 2 (messages schema) has no assistant turn'),
    ([ALPACA[0], {'instruction': 'x', 'input': '', 'output': None}], 'record 2 (alpaca schema) has no `output`'),
    ([OPC[0], {'instruction': 'x'}], 'record 2 (opc-sft schema) has no `output`'),
    ([OPC[0], {'instruction': 3, 'output': 'y'}], 'record 2 (opc-sft schema) `instruction` is a int, not a string'),
])
def test_bad_records_are_refused_with_file_and_record(tmp_path, records, why):
  path = _write(tmp_path / 'd.jsonl', records, 'jsonl')
  with pytest.raises(UserError) as e:
    chat_data.read_records(path)
  assert str(e.value) == f'{path}: {why}'


def test_unreadable_files_are_refused(tmp_path):
  bad = tmp_path / 'd.jsonl'
  bad.write_text(json.dumps(OPC[0]) + '\n{not json\n', encoding='utf-8')
  with pytest.raises(UserError, match='line 2 is not valid JSON'):
    chat_data.read_records(str(bad))
  (tmp_path / 'd.csv').write_text('a,b\n')
  with pytest.raises(UserError, match=r'must be a \.jsonl, \.json or \.parquet file'):
    chat_data.read_records(str(tmp_path / 'd.csv'))
  (tmp_path / 'e.json').write_text('{"instruction": "x", "output": "y"}')
  with pytest.raises(UserError, match='must hold a list of records, not a dict'):
    chat_data.read_records(str(tmp_path / 'e.json'))
  (tmp_path / 'f.parquet').write_text('not parquet')
  with pytest.raises(UserError, match='not a readable Parquet file'):
    chat_data.read_records(str(tmp_path / 'f.parquet'))
  (tmp_path / 'g.jsonl').write_text('\n')
  with pytest.raises(UserError, match='no records'):
    chat_data.read_records(str(tmp_path / 'g.jsonl'))
