"""Tokenizers: exact round trips, JSON transport, loading, streaming, the over-segmentation report, bad specs."""
import os

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import subprocess
import sys
import time

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from minillm_jax.config import ConfigError, UserError, default_config, validate
from minillm_jax.data import corpora
from minillm_jax.data import tokenizer as tl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ADVERSARIAL = [
    'Once upon a time',
    'family: 👩‍👩‍👧‍👦, thumbs 👍🏽👍🏿, flag 🏳️‍🌈, coder 👩🏽‍💻',
    '中文分词测试，日本語のテキスト、한국어 텍스트',
    'nbsp\u00a0zwsp\u200bzwj\u200dbom\ufeffend',
    'combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937',
    'windows\r\nline\rendings\n\n\n',
    '\ttabs\t\tand  double  spaces',
    'control \x00\x01\x07\x1b[0m\x7f chars',
    '   leading and trailing spaces   ',
    '\n\n  leading newlines',
    'def f(x):\n    if x:\n        return {"a": [1, 2]}  # comment\n\treturn None\n',
    'special markers in text: <|endoftext|> <|user|>hi<|end|> <|pad|>',
    '',
    ' ',
    'é',
    '\U0010ffff\ud7ff',
]


@pytest.fixture(scope='module')
def docs():
  works = corpora.shakespeare().docs
  return [works[0][:60_000], works[5][:60_000], ADVERSARIAL[10] * 50]


@pytest.fixture(scope='module')
def bpe(docs):
  return tl.train_bpe(docs, 1000)


@pytest.fixture(scope='module')
def whitespace_bpe(docs):
  # The classic mistake: Whitespace pre-tokenizer and no decoder (decode joins tokens with spaces).
  t = Tokenizer(models.BPE(unk_token='[UNK]'))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  t.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=1000, special_tokens=[tl.EOT, '[UNK]'],
                                                  show_progress=False))
  return tl.Tok(t)


def test_bpe_trains_to_size_with_special_ids(bpe):
  assert bpe.vocab_size == 1000 and bpe.kind == 'bpe'
  assert [bpe.token_to_id(t) for t in tl.SPECIALS] == list(range(6))
  assert bpe.eot_id == 0 and bpe.pad_id == 1
  assert len(bpe.encode('Once upon a time')) <= 6  # merges learned, not bytes


@pytest.mark.parametrize('s', ADVERSARIAL)
def test_bpe_round_trip_exact(bpe, s):
  assert bpe.decode(bpe.encode(s)) == s
  assert bpe.decode(bpe.encode_batch([s, s])[1]) == s


def test_special_tokens_encode_as_one_id_and_can_be_skipped(bpe):
  ids = bpe.encode('a<|endoftext|>b<|user|>')
  assert bpe.eot_id in ids and bpe.token_to_id('<|user|>') in ids
  assert bpe.decode(ids, skip_special=True) == 'ab'


def test_char_tokenizer_round_trip_and_visible_unknowns():
  text = ''.join(ADVERSARIAL)
  tok = tl.build_char([text])
  assert tok.kind == 'char' and tok.eot_id == 0 and tok.token_to_id(tl.UNK) == 6
  for s in ADVERSARIAL:
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert tok.token_to_id(tl.UNK) not in ids
  assert len(tok.encode('abc')) == 3 and len(tok.encode('\r\n')) == 2
  small = tl.build_char(['abc'])
  ids = small.encode('abzc')
  assert ids[2] == small.token_to_id(tl.UNK)
  assert small.decode(ids) == 'ab<|unk|>c'  # an unknown character stays visible, never vanishes


def test_json_transport_keeps_tokenizer(tmp_path, bpe):
  s = ADVERSARIAL[1] + ADVERSARIAL[10]
  again = tl.Tok.from_json_str(bpe.to_json_str())
  assert again.hash == bpe.hash and again.encode(s) == bpe.encode(s)
  path = tmp_path / 'tokenizer.json'
  bpe.save(str(path))
  for spec in (str(path), str(tmp_path)):
    loaded = tl.load(spec)
    assert loaded.hash == bpe.hash and loaded.decode(loaded.encode(s)) == s
  char = tl.build_char(['hello'])
  assert tl.Tok.from_json_str(char.to_json_str()).encode('hello') == char.encode('hello')
  with pytest.raises(UserError, match='not a valid tokenizer.json'):
    tl.Tok.from_json_str('{"nope": 1}')


def test_gpt2_vocab_merges_dir(tmp_path, bpe):
  bpe.tok.model.save(str(tmp_path))  # writes vocab.json + merges.txt
  assert sorted(os.listdir(tmp_path)) == ['merges.txt', 'vocab.json']
  loaded = tl.load(str(tmp_path))
  for s in ADVERSARIAL:
    assert loaded.encode(s) == bpe.encode(s)
    assert loaded.decode(loaded.encode(s)) == s
  assert loaded.eot_id == 0 and loaded.kind == 'bpe'


@pytest.mark.parametrize('kind', ['bpe', 'char'])
def test_stream_decoder_prints_whole_characters(bpe, kind):
  s = ADVERSARIAL[1] + ' ' + ADVERSARIAL[2] + ' <|endoftext|> end'
  tok = bpe if kind == 'bpe' else tl.build_char([s])
  st = tok.stream()
  chunks = [st.step(i) for i in tok.encode(s)]
  assert ''.join(chunks) == s
  assert all('\ufffd' not in c for c in chunks)  # partial UTF-8 is held back, not printed as U+FFFD


def test_report_flags_whitespace_bpe_not_byte_level(bpe, whitespace_bpe, docs):
  text = docs[0][:20_000]
  bad = tl.report(whitespace_bpe, text)
  assert bad['over_segmented'] and not bad['roundtrip']
  assert bad['word_split_ratio'] > 1.2
  good = tl.report(bpe, text)
  assert not good['over_segmented'] and good['roundtrip'] and not good['warnings']
  assert good['chars_per_token'] > 2
  char = tl.report(tl.build_char(docs), text)
  assert char['chars_per_token'] == 1 and not char['warnings']
  assert any('by design' in n for n in char['notes'])


def test_report_flags_byte_level_without_merges(docs):
  bytes_only = tl.train_bpe(docs, tl.BPE_MIN_VOCAB)  # 256 bytes + specials: no merges at all
  r = tl.report(bytes_only, docs[0][:5000])
  assert r['over_segmented'] and r['roundtrip']


def test_report_cli(tmp_path, whitespace_bpe, bpe, docs):
  (tmp_path / 'ws.json').write_text(whitespace_bpe.to_json_str())
  (tmp_path / 'bl.json').write_text(bpe.to_json_str())
  (tmp_path / 'text.txt').write_text(docs[0][:5000])

  def run(tok):
    return subprocess.run([sys.executable, '-m', 'minillm_jax.tokenizer', 'report', f'--tokenizer={tmp_path / tok}',
                           f'--text={tmp_path / "text.txt"}'], check=False, capture_output=True, text=True,
                          cwd=REPO)
  ws, bl = run('ws.json'), run('bl.json')
  assert ws.returncode == 0 and 'WARNING: over-segmented' in ws.stdout
  assert bl.returncode == 0 and 'WARNING' not in bl.stdout and 'round trip: exact' in bl.stdout
  missing = run('missing.json')
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines() == [f"error: tokenizer file '{tmp_path / 'missing.json'}' does not exist"]


def test_bad_specs():
  with pytest.raises(UserError, match='unknown tokenizer'):
    tl.load('wordpiece')
  with pytest.raises(UserError, match='does not exist'):
    tl.load('/no/such/tokenizer.json')
  with pytest.raises(UserError, match='built from a corpus'):
    tl.load('bpe')
  with pytest.raises(UserError, match='outside'):
    tl.train_bpe(['abc'], 100)


def test_hub_offline_fails_at_once(monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  t0 = time.time()
  with pytest.raises(UserError, match='not in the local HF cache.*HF_HUB_OFFLINE'):
    tl.load('hub:someone/surely-not-cached-tokenizer')
  assert time.time() - t0 < 2


def test_dtype_for_vocab():
  assert tl.dtype_for(91) == np.uint16 and tl.dtype_for(2**16) == np.uint16
  assert tl.dtype_for(2**16 + 1) == np.uint32 and tl.dtype_for(2**32) == np.uint32
  with pytest.raises(UserError, match='does not fit'):
    tl.dtype_for(2**32 + 1)


def test_config_rejects_bad_bpe_vocab():
  c = default_config()
  c.data.tokenizer, c.data.vocab_size = 'bpe', 10**7
  with pytest.raises(ConfigError, match='outside'):
    validate(c)
  c.data.vocab_size = None
  with pytest.raises(ConfigError, match='needs a vocabulary size'):
    validate(c)
