"""Real corpora: streaming prepare (exact ids, kill and re-run), hub datasets from local files in the hub's
layouts (validation split, subsets, streaming), the BPE sample budget and the `gpt2` tokenizer alias offline."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minillm_jax import config as config_lib
from minillm_jax.config import UserError
from minillm_jax.data import hub, prepare, stream
from minillm_jax.data import tokenizer as toklib

REPO = Path(__file__).resolve().parents[1]
WORDS = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'while', 'dogs', 'ran', 'far', 'away', 'into', 'green', 'hills',
         'and', 'came', 'back', 'home', 'at', 'night']


def _story(rng: random.Random, i: int, n: int = 60) -> str:
  return f'Story {i}. ' + ' '.join(rng.choice(WORDS) for _ in range(n)) + '.\n'


def _cfg(tmp, **data):
  cfg = config_lib.default_config()
  cfg.model.block_size = 16
  cfg.data.update(cache_dir=os.path.join(tmp, 'cache'), **data)
  return config_lib.validate(cfg)


def _ids(p: prepare.Prepared, split: str) -> list[int]:
  return p.tokens(split).tolist()


def test_streamed_tokens_are_each_document_encoded_whole(tmp_path, monkeypatch):
  """Text, JSON lines and Parquet files, cut into small pieces and read in small chunks: the token files hold
  exactly each document's ids + <|endoftext|>, split as split_mask says."""
  monkeypatch.setattr(stream, 'PIECE', 300)
  monkeypatch.setattr(stream, '_READ', 1000)
  rng = random.Random(0)
  (tmp_path / 'd').mkdir()
  texts = {f'{i}.txt': ''.join(_story(rng, i * 100 + k) for k in range(30)) for i in range(3)}
  for name, t in texts.items():
    (tmp_path / 'd' / name).write_text(t)
  rows = [_story(rng, 1000 + i) for i in range(40)]
  (tmp_path / 'd' / 'r.jsonl').write_text(''.join(json.dumps({'text': t, 'n': 1}) + '\n' for t in rows))
  pq.write_table(pa.table({'text': rows[:10] + ['']}), tmp_path / 'd' / 'p.parquet')  # '' is skipped
  docs = list(texts.values()) + rows + rows[:10]  # text files, then JSON, then Parquet
  p = prepare.prepare(_cfg(tmp_path, corpus='local', path=str(tmp_path / 'd'), tokenizer='bpe', vocab_size=300))
  tok = p.tokenizer()
  val = stream.split_mask(stream.sha256s(docs), np.array([len(d) for d in docs]), 0.1)
  want = {s: [i for d, v in zip(docs, val) if v == (s == 'val') for i in tok.encode(d) + [tok.eot_id]]
          for s in ('train', 'val')}
  assert 0 < val.sum() < len(docs)
  assert _ids(p, 'train') == want['train'] and _ids(p, 'val') == want['val']
  assert (p.manifest['n_train_docs'], p.manifest['n_val_docs']) == (len(docs) - val.sum(), val.sum())


def _prepare_cmd(path, cache) -> list[str]:
  return [sys.executable, '-m', 'minillm_jax.prepare', '--config=configs/shakespeare_char.py',
          '--config.data.corpus=local', f'--config.data.path={path}', '--config.data.tokenizer=bpe',
          '--config.data.vocab_size=300', f'--config.data.cache_dir={cache}']


def test_sigkill_during_prepare_then_rerun_gives_the_identical_cache(tmp_path):
  rng = random.Random(1)
  (tmp_path / 'd').mkdir()
  for f in range(6):  # about 3 MB: the encode pass takes a few seconds
    (tmp_path / 'd' / f'{f}.txt').write_text(''.join(_story(rng, i, 80) for i in range(1500)))
  ref = subprocess.run(_prepare_cmd(tmp_path / 'd', tmp_path / 'ref'), check=False, cwd=REPO, capture_output=True,
                       text=True)
  assert ref.returncode == 0, ref.stderr
  cache = tmp_path / 'cache'
  proc = subprocess.Popen(_prepare_cmd(tmp_path / 'd', cache), cwd=REPO, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:  # kill it mid-encode: train.bin is being written
    if any(b.stat().st_size > 0 for b in cache.glob('.tmp-*/train.bin')):
      break
    time.sleep(0.005)
  assert proc.poll() is None, 'prepare finished before it could be killed'
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert [p.name for p in cache.iterdir() if not p.name.startswith('.tmp-')] == []  # nothing that looks done
  again = subprocess.run(_prepare_cmd(tmp_path / 'd', cache), check=False, cwd=REPO, capture_output=True,
                       text=True)
  assert again.returncode == 0, again.stderr
  assert 'was interrupted' in again.stderr and 'starting over' in again.stderr
  (a,), (b,) = list((tmp_path / 'ref').iterdir()), [p for p in cache.iterdir()]
  assert a.name == b.name
  for f in ('train.bin', 'val.bin', 'tokenizer.json'):
    assert (a / f).read_bytes() == (b / f).read_bytes(), f
  ma, mb = (json.loads((d / 'manifest.json').read_text()) for d in (a, b))
  assert (ma['train_blake2b'], ma['val_blake2b']) == (mb['train_blake2b'], mb['val_blake2b'])


def _hub_dir(tmp_path, fmt='parquet', val=True) -> str:
  """A dataset folder in the hub's layout (what load_dataset reads for a hub repo of data files)."""
  rng = random.Random(2)
  root = tmp_path / 'ds'
  (root / 'data').mkdir(parents=True)
  splits = {'train': [_story(rng, i) for i in range(300)], 'validation': [_story(rng, 900 + i) for i in range(30)]}
  for split, rows in splits.items():
    if split == 'validation' and not val:
      continue
    if fmt == 'parquet':
      pq.write_table(pa.table({'text': rows, 'id': list(range(len(rows)))}),
                     root / 'data' / f'{split}-00000-of-00001.parquet')
    else:
      (root / f'{split}.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in rows))
  return str(root)


@pytest.mark.parametrize('fmt', ['parquet', 'jsonl'])
def test_hub_dataset_takes_its_validation_split_and_streams_the_same_tokens(tmp_path, fmt):
  name = _hub_dir(tmp_path, fmt)
  p = prepare.prepare(_cfg(tmp_path, corpus='hub', hub_name=name))
  assert p.manifest['split'] == 'hub_split' and p.manifest['corpus_info']['val_split'] == 'validation'
  assert (p.manifest['n_train_docs'], p.manifest['n_val_docs']) == (300, 30)
  s = prepare.prepare(_cfg(tmp_path / 's', corpus='hub', hub_name=name, hub_streaming=True))
  assert _ids(s, 'train') == _ids(p, 'train') and _ids(s, 'val') == _ids(p, 'val')
  own = prepare.prepare(_cfg(tmp_path, corpus='hub', hub_name=name, hub_val_split='none'))
  assert own.manifest['split'] == 'docs' and own.manifest['n_train_docs'] + own.manifest['n_val_docs'] == 300
  capped = prepare.prepare(_cfg(tmp_path, corpus='hub', hub_name=name, max_docs=50))
  assert (capped.manifest['n_train_docs'], capped.manifest['n_val_docs']) == (50, 30)


def test_hub_dataset_without_validation_split_is_split_by_documents(tmp_path):
  p = prepare.prepare(_cfg(tmp_path, corpus='hub', hub_name=_hub_dir(tmp_path, val=False)))
  assert p.manifest['split'] == 'docs' and p.manifest['n_val_docs'] > 0


@pytest.mark.parametrize('data, msg', [
    ({'hub_split': 'test'}, r"split 'test': no such split .*set data.hub_split"),
    ({'hub_val_split': 'dev'}, r"split 'dev': no such split"),
    ({'hub_config': 'sample-10BT'}, r"data.hub_config='sample-10BT' is not one of its subsets"),
    ({'text_field': 'body'}, r"has no field 'body' \(fields: text, id\); set data.text_field"),
])
def test_hub_bad_inputs_are_one_line(tmp_path, data, msg):
  with pytest.raises(UserError, match=msg) as e:
    prepare.prepare(_cfg(tmp_path, corpus='hub', hub_name=_hub_dir(tmp_path), **data))
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('raised, msg', [
    ('Dataset \'x/y\' is a gated dataset on the Hub. You must be authenticated to access it.',
     r'is gated: accept its terms at https://huggingface.co/datasets/x/y and log in'),
    ('Dataset scripts are no longer supported, but found y.py',
     r'loading script.*data.hub_revision=refs/convert/parquet'),
    ("BuilderConfig 'sample-1T' not found. Available: ['default', 'sample-10BT']",
     r"data.hub_config='sample-1T' is not one of its subsets: .*sample-10BT"),
])
def test_hub_errors_say_what_to_do(raised, msg):
  err = hub.explain(RuntimeError(raised), 'x/y', "hub dataset 'x/y'", 'sample-1T' if 'sample' in raised else '',
                    None)
  assert type(err) is UserError and '\n' not in str(err)
  assert re.search(msg, str(err)), str(err)


def test_bpe_learns_from_a_bounded_deterministic_sample(tmp_path):
  rng = random.Random(3)
  (tmp_path / 'd').mkdir()
  for f in range(20):
    (tmp_path / 'd' / f'{f}.txt').write_text(''.join(_story(rng, f * 100 + i) for i in range(20)))
  full = prepare.prepare(_cfg(tmp_path, corpus='local', path=str(tmp_path / 'd'), tokenizer='bpe', vocab_size=400))
  kw = dict(corpus='local', path=str(tmp_path / 'd'), tokenizer='bpe', vocab_size=400, tokenizer_train_chars=20_000)
  a = prepare.prepare(_cfg(tmp_path, **kw))
  b = prepare.prepare(_cfg(tmp_path / 'b', **kw))
  assert full.manifest['bpe_sample_rate'] == 1.0
  assert 0.05 < a.manifest['bpe_sample_rate'] < 0.2  # 20k of the training characters
  assert a.manifest['tokenizer']['hash'] == b.manifest['tokenizer']['hash'] != full.manifest['tokenizer']['hash']
  assert a.dir != full.dir  # the budget is part of the cache key


def _gpt2_files(root: Path) -> toklib.Tok:
  """A GPT-2-format vocab.json + merges.txt (byte-level BPE, <|endoftext|> in the vocabulary) built here."""
  tok = toklib.train_bpe([_story(random.Random(4), i) for i in range(200)], 400)
  root.mkdir(parents=True, exist_ok=True)
  tok.tok.model.save(str(root))
  return tok


def test_gpt2_alias_resolves_offline_to_a_local_copy_or_says_how_to_get_one(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))  # no hub cache to find it in
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  with pytest.raises(UserError, match=r"gpt2: GPT-2's tokenizer is not on this machine .*HF_HUB_OFFLINE.*"
                                      r'vocab.json \+ merges.txt .*xdg/minillm_jax/gpt2/'):
    toklib.load('gpt2')
  ref = _gpt2_files(tmp_path / 'xdg' / 'minillm_jax' / 'gpt2')
  cfg = _cfg(tmp_path, corpus='shakespeare', tokenizer='gpt2', max_docs=2)
  assert cfg.data.tokenizer == 'gpt2'  # an alias, not made into a path
  p = prepare.prepare(cfg)
  tok = p.tokenizer()
  assert p.dir.name.startswith('shakespeare-gpt2-') and tok.vocab_size == ref.vocab_size
  text = 'To be, or not to be'
  assert tok.encode(text) == ref.encode(text) and tok.decode(tok.encode(text)) == text
  ids = _ids(p, 'train')
  assert ids.count(tok.eot_id) == p.manifest['n_train_docs']


def test_char_table_encodes_like_the_tokenizer():
  tok = toklib.build_char(['abc \n\t\u00e9'])
  texts = ['abc', 'a\u00e9 \U0001F600z\r\n', 'x<|endoftext|>a', '', 'cab' * 1000]
  assert [a.tolist() for a in tok.encode_batch_np(texts)] == tok.encode_batch(texts)
  assert tok.encode_batch_np(['q'])[0].tolist() == [tok.token_to_id(toklib.UNK)]  # not in the alphabet


# ---- recipes (configs/tinystories.py, shakespeare_gpt2.py, fineweb_edu.py), offline on local copies ----

def test_tinystories_recipe_takes_the_validation_split_of_a_local_copy(tmp_path):
  cfg = config_lib.preset_beside(str(REPO / 'configs' / 'x.py'), 'tinystories', 'char')
  cfg.data.update(hub_name=_hub_dir(tmp_path), cache_dir=str(tmp_path / 'cache'))
  cfg.model.block_size = 32
  p = prepare.prepare(config_lib.validate(cfg))
  assert p.manifest['split'] == 'hub_split' and p.manifest['n_val_docs'] == 30
  full = config_lib.validate(config_lib.preset_beside(str(REPO / 'configs' / 'x.py'), 'tinystories'))
  assert (full.data.tokenizer, full.model.vocab_size, full.data.hub_name) == ('gpt2', 50257, 'roneneldan/TinyStories')
  fw = config_lib.validate(config_lib.preset_beside(str(REPO / 'configs' / 'x.py'), 'fineweb_edu'))
  assert (fw.data.hub_config, fw.data.hub_streaming, fw.model.n_layer) == ('sample-10BT', True, 24)


def test_shakespeare_gpt2_nanogpt_export_carries_no_dataset_so_sample_py_uses_gpt2(tmp_path):
  torch = pytest.importorskip('torch')  # the export writes a torch file (the 3.12 lane has no torch)
  from conftest import run_module
  xdg = tmp_path / 'xdg'
  ref = _gpt2_files(xdg / 'minillm_jax' / 'gpt2')  # stands in for GPT-2's own files (same format)
  env = {'XDG_CACHE_HOME': str(xdg), 'HF_HOME': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': '1'}
  small = ['--config.model.n_layer=1', '--config.model.d_model=32', '--config.model.n_head=2',
           '--config.model.block_size=32', f'--config.model.vocab_size={ref.vocab_size}', '--config.train.steps=2',
           '--config.train.batch_size=2', '--config.train.eval_every=2', '--config.train.ckpt_every=2',
           '--config.train.eval_batches=1', '--config.data.max_docs=4', '--config.sample.max_new_tokens=4',
           f'--config.data.cache_dir={tmp_path / "cache"}']
  r = run_module('minillm_jax.train', '--config=configs/shakespeare_gpt2.py:micro', f'--workdir={tmp_path / "w"}',
                 *small, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  r = run_module('torch_compat.export', f'--workdir={tmp_path / "w"}', '--format=nanogpt',
                 f'--out={tmp_path / "ckpt.pt"}', env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  ck = torch.load(tmp_path / 'ckpt.pt', map_location='cpu', weights_only=True)
  assert 'dataset' not in ck['config']  # sample.py looks for data/<dataset>/meta.pkl, else encodes with GPT-2
  assert ck['model_args']['vocab_size'] == ref.vocab_size and ck['model_args']['block_size'] == 32
  assert toklib.Tok.from_json_str(ck['config']['minillm_tokenizer']).encode('ROMEO:') == ref.encode('ROMEO:')


def test_a_corpus_empty_after_filtering_is_refused_in_one_line(tmp_path):
  (tmp_path / 'rows.jsonl').write_text('{"text": ""}\n{"text": null}\n{"text": ""}\n')
  with pytest.raises(UserError, match=r'^corpus local is empty \(no non-empty documents\)$'):
    prepare.prepare(_cfg(tmp_path, corpus='local', path=str(tmp_path / 'rows.jsonl')))
  (tmp_path / 'val.jsonl').write_text('{"text": ""}\n')
  (tmp_path / 'ok.txt').write_text('plenty of training text here\n' * 20)
  with pytest.raises(UserError, match=r'^the validation files of corpus local hold no non-empty documents$'):
    prepare.prepare(_cfg(tmp_path, corpus='local', path=str(tmp_path / 'ok.txt'), val_path=str(tmp_path / 'val.jsonl')))


def test_evaluate_reads_the_validation_split_prepare_wrote(tmp_path):
  """evaluate's perplexity text (encode.val_docs, streamed, then tokens_and_bytes up to a limit) is the start of
  the cache's val.bin, for a split by documents, a dataset's own validation split and a one-document corpus."""
  from minillm_jax.data import encode
  from minillm_jax.evals import suites
  rng = random.Random(3)
  (tmp_path / 'd').mkdir()
  (tmp_path / 'd' / 'r.jsonl').write_text(''.join(json.dumps({'text': _story(rng, i)}) + '\n' for i in range(60)))
  (tmp_path / 'one.txt').write_text(''.join(_story(rng, i) for i in range(40)))
  for k, data in enumerate([{'corpus': 'local', 'path': str(tmp_path / 'd')},
                            {'corpus': 'hub', 'hub_name': _hub_dir(tmp_path)},
                            {'corpus': 'local', 'path': str(tmp_path / 'one.txt')}]):
    cfg = _cfg(tmp_path / str(k), tokenizer='bpe', vocab_size=300, **data)
    p = prepare.prepare(cfg)
    want, tok = _ids(p, 'val'), p.tokenizer()
    assert len(want) > 50
    assert suites.tokens_and_bytes(tok, encode.val_docs(cfg), eot=True)[0] == want, data
    assert suites.tokens_and_bytes(tok, encode.val_docs(cfg), eot=True, limit=50)[0] == want[:50]
