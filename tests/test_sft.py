"""Instruction fine-tuning end to end: chat token caches (packing, the mask over exactly the assistant spans in
every schema, dropped conversations, refused records leaving nothing behind), the pipeline's mask and resume,
and a pretrain -> fine-tune run: the assistant-token validation loss falls, the run is marked instruction-tuned,
a block size change is allowed where the positions allow it, and resume is exact."""
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import run_module
from flax import nnx
from test_sft_data import _write
from test_train import args, metrics

from minillm_jax import config as config_lib
from minillm_jax.config import UserError
from minillm_jax.data import chat_data, hub, pipeline, prepare, template
from minillm_jax.data.tokenizer import CHAT, PAD
from minillm_jax.inference import load
from minillm_jax.training import checkpoint
from minillm_jax.training.step import eval_loss

WORDS = ['alpha', 'beta', 'gamma', 'delta', 'omega']


def _conversations(n: int) -> list[list[dict]]:
  """Questions whose answers follow a rule a small model learns (the next word; the number doubled), in the
  characters of test_train.TEXT, so a tokenizer built on TEXT covers them."""
  out = []
  for i in range(n):
    w, k = WORDS[i % 5], i % 13
    conv = [{'role': 'user', 'content': f'the word after {w} number {k}.'},
            {'role': 'assistant', 'content': f'{WORDS[(i + 1) % 5]} the quick brown fox {2 * k % 13}.'}]
    if i % 3 == 0:
      conv = [{'role': 'system', 'content': 'the lazy dog.'}, *conv,
              {'role': 'user', 'content': f'and after {WORDS[(i + 1) % 5]}.'},
              {'role': 'assistant', 'content': f'{WORDS[(i + 2) % 5]} jumps over.'}]
    out.append(conv)
  return out


def _records(convs, schema):
  if schema == 'messages':
    return [{'messages': c} for c in convs]
  single = [c[-2:] for c in convs]  # instruction formats are one exchange
  if schema == 'alpaca':
    return [{'instruction': u['content'], 'input': '', 'output': a['content']} for u, a in single]
  return [{'instruction': u['content'], 'output': a['content']} for u, a in single]


def _cfg(tmp, path, block=128, **data):
  cfg = config_lib.default_config()
  cfg.model.update(block_size=block, n_layer=1, n_head=2, d_model=32)
  cfg.data.update(corpus='local', format='chat', path=str(path), cache_dir=os.path.join(tmp, 'cache'), **data)
  return config_lib.validate(cfg)


def _runs(ids, mask):
  """The maximal masked-in runs of a flat file, as tuples of ids."""
  out, cur = [], []
  for i, m in zip(ids.tolist(), mask.tolist()):
    if m:
      cur.append(i)
    elif cur:
      out.append(tuple(cur))
      cur = []
  return out + ([tuple(cur)] if cur else [])


@pytest.mark.parametrize('schema,fmt', [('messages', 'jsonl'), ('alpaca', 'json'), ('opc-sft', 'parquet')])
def test_the_mask_covers_exactly_the_assistant_spans(tmp_path, schema, fmt):
  path = _write(tmp_path / f'chat.{fmt}', _records(_conversations(60), schema), fmt)
  cfg = _cfg(str(tmp_path), path)
  prep = prepare.prepare(cfg)
  tok = prep.tokenizer()
  train, val, _ = chat_data.conversations(cfg.data)
  end, markers = tok.token_to_id(template.END), {tok.token_to_id(t) for t in CHAT[:2]}
  for split, convs in (('train', train), ('val', val)):
    ids, mask = np.asarray(prep.tokens(split)), np.asarray(prep.masks(split))
    want = sorted(tuple(tok.encode(m['content']) + [end]) for c in convs for m in c if m['role'] == 'assistant')
    assert sorted(_runs(ids, mask)) == want  # every reply and its <|end|>, nothing else
    rows = ids.reshape(-1, prep.window)
    assert set(rows[:, 0].tolist()) <= markers  # every window starts at a conversation's first token
    st = prep.manifest[f'{split}_packing']
    assert st['dropped'] == 0 and st['conversations'] == len(convs) and st['assistant_tokens'] == int(mask.sum())
    assert ids.tolist().count(tok.eot_id) == len(convs)
    assert st['pad_tokens'] == ids.tolist().count(tok.token_to_id(PAD)) > 0


def test_too_long_conversations_are_dropped_and_counted(tmp_path):
  convs = _conversations(40)
  convs[5] = [{'role': 'user', 'content': 'the word ' * 30}, {'role': 'assistant', 'content': 'alpha'}]
  cfg = _cfg(str(tmp_path), _write(tmp_path / 'chat.jsonl', _records(convs, 'messages'), 'jsonl'))
  prep = prepare.prepare(cfg)
  st = [prep.manifest[f'{s}_packing'] for s in ('train', 'val')]
  assert sum(s['dropped'] for s in st) == 1 and sum(s['dropped_tokens'] for s in st) > 129
  assert sum(s['conversations'] for s in st) == 39
  r = run_module('minillm_jax.prepare', '--config=configs/shakespeare_char.py', '--config.data.corpus=local',
                 '--config.model.block_size=128',
                 '--config.data.format=chat', f'--config.data.path={tmp_path}/chat.jsonl',
                 f'--config.data.cache_dir={tmp_path}/cache')
  assert r.returncode == 0 and 'dropped as longer than a window' in r.stdout, r.stderr[-1500:]


@pytest.mark.parametrize('record,why', [
    ({'messages': [{'role': 'bot', 'content': 'x'}]}, r"record 3 \(messages schema\) message 1 has role 'bot'"),
    ({'messages': [{'role': 'user', 'content': 'x'}]}, r'record 3 \(messages schema\) has no assistant turn'),
    ({'text': 'plain'}, r'record 3 .*is a|no chat schema|record 3'),
])
def test_bad_records_leave_nothing_in_the_cache(tmp_path, record, why):
  recs = _records(_conversations(4), 'messages')
  recs.insert(2, record)
  cfg = _cfg(str(tmp_path), _write(tmp_path / 'chat.jsonl', recs, 'jsonl'))
  with pytest.raises(UserError, match=why) as e:
    prepare.prepare(cfg)
  assert '\n' not in str(e.value) and 'chat.jsonl' in str(e.value)
  cache = tmp_path / 'cache'
  assert not cache.exists() or list(cache.iterdir()) == []


def test_the_pipeline_carries_the_mask_and_resumes_exactly(tmp_path):
  cfg = _cfg(str(tmp_path), _write(tmp_path / 'chat.jsonl', _records(_conversations(120), 'messages'), 'jsonl'))
  prep = prepare.prepare(cfg)
  ids, mask, W = np.asarray(prep.tokens('train')), np.asarray(prep.masks('train')), prep.window
  it = pipeline.train_iter(prep, 4, 128, seed=3)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  rest = [next(it) for _ in range(4)]
  for b in first + rest:
    assert b['mask'].shape == b['targets'].shape == (4, 128)
    for x, y, m in zip(b['inputs'], b['targets'], b['mask']):
      r = int(np.flatnonzero((ids.reshape(-1, W)[:, :-1] == x).all(1))[0])  # the row this window is
      assert np.array_equal(y, ids[r * W + 1:(r + 1) * W]) and np.array_equal(m, mask[r * W + 1:(r + 1) * W])
  again = pipeline.train_iter(prep, 4, 128, seed=3)
  again.set_state(state)
  for a, b in zip(rest, [next(again) for _ in range(4)]):
    assert all(np.array_equal(a[k], b[k]) for k in ('inputs', 'targets', 'mask'))
  with pytest.raises(UserError, match='packed in windows of 129 tokens, not model.block_size'):
    pipeline.train_iter(prep, 4, 64, seed=3)
  val = pipeline.val_batches(prep, 2, 128, 3)
  assert len(val) == 3 and all(v['mask'].any() for v in val)


def _base(tmp, **over):
  """A RoPE base model pretrained on test_train.TEXT at block 32."""
  a = args(tmp, 'base', **{'model.pos': 'rope', 'train.steps': 60, 'train.eval_every': 30, 'train.ckpt_every': 30,
                           **over})
  r = run_module('minillm_jax.train', *a)
  assert r.returncode == 0, r.stderr[-2000:]


def _sft_args(tmp, workdir, chat_path, **over):
  return args(tmp, workdir, **{'model.pos': 'rope', 'data.format': 'chat', 'data.path': chat_path,
                               'train.init_from': f'{tmp}/base', 'model.block_size': 128, 'train.steps': 40,
                               'train.eval_every': 10, 'train.ckpt_every': 10, 'optim.lr': 2e-3, **over})


def test_pretrain_then_fine_tune_lowers_the_assistant_loss(tmp_path):
  tmp = str(tmp_path)
  chat_path = _write(tmp_path / 'chat.jsonl', _records(_conversations(300), 'messages'), 'jsonl')
  _base(tmp)
  r = run_module('minillm_jax.train', *_sft_args(tmp, 'sft', chat_path))  # block 32 -> 128: RoPE allows it
  assert r.returncode == 0, r.stderr[-2000:]
  rows = metrics(tmp, 'sft')
  assert all(row['loss_over'] == 'assistant_tokens' for row in rows)
  after = min(row['val_loss'] for row in rows if 'val_loss' in row)
  # the base model's loss on the same validation batches (its tokenizer is the fine-tune's)
  with open(f'{tmp}/sft/config.json') as f:
    cfg = config_lib.from_plain(json.load(f))
  prep = prepare.prepare(cfg)
  val = pipeline.val_batches(prep, cfg.train.batch_size, 128, cfg.train.eval_batches)
  _, model, _, _ = checkpoint.load_for_inference(f'{tmp}/base', 'best')
  gdef, params = nnx.split(model)
  before = float(jax.jit(functools.partial(eval_loss, gdef=gdef))(
      params, {k: np.stack([b[k] for b in val]) for k in val[0]}))
  assert after < before - 0.3, (before, after)
  be = load.load(workdir=f'{tmp}/sft')
  assert be.instruction_tuned and be.context == 128
  assert not load.load(workdir=f'{tmp}/base').instruction_tuned
  # evaluate compares both on the fine-tune's held-out conversations (the chat suite is on by default for it)
  r = run_module('minillm_jax.evaluate', f'--workdir={tmp}/base', f'--workdir={tmp}/sft', '--suites=ppl,chat',
                 '--max_new_tokens=8', '--max_eval_tokens=200', f'--out={tmp}/cmp.json')
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'asst-ppl' in r.stdout and os.path.getsize(f'{tmp}/cmp.png') > 10000
  with open(f'{tmp}/cmp.json') as f:
    b, s = (run['chat'] for run in json.load(f)['runs'])
  assert b['assistant']['data'] == s['assistant']['data'] == 'local val'
  assert b['assistant']['tokens'] == s['assistant']['tokens'] > 0
  assert s['assistant']['nll'] < b['assistant']['nll'] - 0.3
  assert (b['execution']['template'], s['execution']['template']) == ('plain', 'chat')
  assert 0 <= s['execution']['pass_rate'] <= 1 and len(s['execution']['details']) == 6
  # generate: an instruction-tuned model answers the prompt as a user message and stops at <|end|>
  ask = 'the word after beta number 4.'
  r = run_module('minillm_jax.generate', f'--workdir={tmp}/sft', f'--prompt={ask}', '--temperature=0',
                 '--max_new_tokens=40')
  assert r.returncode == 0 and r.stdout.startswith(f'{ask}\n'), r.stderr[-1500:]
  reply = r.stdout[len(ask) + 1:].strip()
  assert reply and '<|' not in reply
  r = run_module('minillm_jax.chat', f'--workdir={tmp}/sft', f'--prompt={ask}', '--temperature=0',
                 '--max_new_tokens=40')  # chat uses the template without flags: the same greedy reply
  assert r.returncode == 0 and r.stdout.strip() == reply, (r.stdout, reply, r.stderr[-1500:])
  r = run_module('minillm_jax.generate', f'--workdir={tmp}/base', '--prompt=alpha', '--template=on')
  assert r.returncode == 2 and 'this model is not instruction-tuned' in r.stderr
  # resume: the last checkpoint lost (as when a run is killed just after step 30's save) gives the same losses
  shutil.copytree(f'{tmp}/sft', f'{tmp}/cut')
  shutil.rmtree(f'{tmp}/cut/checkpoints/40')
  r = run_module('minillm_jax.train', *_sft_args(tmp, 'cut', chat_path))
  assert r.returncode == 0 and 'resuming from step 30' in r.stdout, r.stderr[-2000:]
  loss = lambda w: [(row['step'], row['train_loss']) for row in metrics(tmp, w) if 'train_loss' in row]
  assert loss('cut') == loss('sft')  # bitwise, the mask included


def test_block_size_changes_only_where_the_positions_allow(tmp_path):
  tmp = str(tmp_path)
  chat_path = _write(tmp_path / 'chat.jsonl', _records(_conversations(100), 'messages'), 'jsonl')
  _base(tmp, **{'model.pos': 'learned', 'train.steps': 4, 'train.eval_every': 4, 'train.ckpt_every': 4})
  learned = {'model.pos': 'learned', 'train.steps': 2, 'train.eval_every': 2, 'train.ckpt_every': 2}
  r = run_module('minillm_jax.train', *_sft_args(tmp, 'big', chat_path, **learned))
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
      'has learned positions for 32 tokens; model.block_size=128 exceeds them: fine-tune with model.block_size <= 32'
      ' (a RoPE model can change its block size freely)'), r.stderr[-1500:]
  short = _write(tmp_path / 'short.jsonl', [{'messages': [{'role': 'user', 'content': 'alpha.'},
                                                          {'role': 'assistant', 'content': 'beta.'}]}] * 40, 'jsonl')
  r = run_module('minillm_jax.train', *_sft_args(tmp, 'small', short, **learned, **{'model.block_size': 16}))
  assert r.returncode == 0, r.stderr[-1500:]
  assert load.load(workdir=f'{tmp}/small').context == 16  # the table keeps its 32 rows; the context is 16
  with open(f'{tmp}/small/config.json') as f:
    assert json.load(f)['model']['max_positions'] == 32


def test_chat_format_config_errors():
  cfg = config_lib.default_config()
  cfg.data.format = 'chat'
  with pytest.raises(config_lib.ConfigError, match='data.format=chat reads conversations: data.corpus=shakespeare'):
    config_lib.validate(cfg)
  cfg = config_lib.default_config()
  cfg.data.corpus = 'python_instruct'
  with pytest.raises(config_lib.ConfigError, match='python_instruct holds conversations: set data.format=chat'):
    config_lib.validate(cfg)


def test_hub_chat_records_pass_subset_and_revision(monkeypatch):
  calls = []

  class Rows(list):
    def to_list(self):
      return list(self)

  def load_dataset(path, split=None, streaming=False, **kw):  # datasets.load_dataset(path, name=subset, ...)
    calls.append((path, split, streaming, kw))
    return Rows(_records(_conversations(10), 'opc-sft'))

  monkeypatch.setattr(hub, 'offline_reason', lambda: None)
  monkeypatch.setattr(hub, 'datasets_module', lambda offline: type('D', (), {'load_dataset': staticmethod(load_dataset)}))
  cfg = config_lib.default_config()
  cfg.data.update(corpus='hub', format='chat', hub_name='OpenCoder-LLM/opc-sft-stage2',
                  hub_config='educational_instruct', hub_revision='v1')
  train, val, info = chat_data.conversations(config_lib.validate(cfg).data)
  assert calls == [('OpenCoder-LLM/opc-sft-stage2', 'train', False, {'name': 'educational_instruct', 'revision': 'v1'})]
  assert len(train) + len(val) == 10 and all(c[-1]['role'] == 'assistant' for c in train + val)
  assert list(info['schemas'].values()) == ['opc-sft']
  cfg.data.hub_revision = 'v2'  # another revision is another cache
  other = config_lib.validate(cfg)
  assert prepare.cache_key(other)[0] != prepare.cache_key(config_lib.validate(config_lib.from_plain(
      {**cfg.to_dict(), 'data': {**cfg.data.to_dict(), 'hub_revision': 'v1'}})))[0]


def test_val_path_gives_the_chat_validation_set(tmp_path):
  convs = _conversations(50)
  train_file = _write(tmp_path / 'train.jsonl', _records(convs[:40], 'messages'), 'jsonl')
  val_file = _write(tmp_path / 'val.json', _records(convs[40:], 'alpaca'), 'json')
  cfg = _cfg(str(tmp_path), train_file, val_path=val_file)
  train, val, _ = chat_data.conversations(cfg.data)
  assert len(train) == 40 and val == [c[-2:] for c in convs[40:]]
  prep = prepare.prepare(cfg)
  assert prep.manifest['val_packing']['conversations'] == 10
