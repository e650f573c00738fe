"""Bad input, as a user meets it: every refusal is one line on stderr (no traceback), exit status 2, and leaves
the user's files (a trained run's config.json, metrics.jsonl, run.json and checkpoints; the corpus and config
files given) exactly as they were. Issue 29 ("Hardening") items 3, 7-11 and 14 have their own tests below; the
catalogue at the end runs the whole table (slow: one process start each)."""
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, run_module
from test_train import TEXT, args

from minillm_jax.config import UserError

# a PNG header and random bytes: what a renamed image looks like to the corpus reader
PNG = b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR' + np.random.default_rng(0).integers(0, 256, 20_000, np.uint8).tobytes()


def tiny(tmp: str, run_dir: str, **over) -> list[str]:
  """A run of seconds: test_train's arguments at 4 steps, a checkpoint (and evaluation) every 2."""
  return args(tmp, run_dir, **{'train.batch_size': 4, 'train.steps': 4, 'train.eval_every': 2,
                               'train.eval_batches': 1, 'train.ckpt_every': 2, 'optim.warmup_steps': 1,
                               'optim.lr': 1e-3, 'train.cpu_devices': 1, **over})


def one_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
  """stderr of a refused command: exactly one line, no traceback, the expected exit status."""
  err = r.stderr.strip()
  assert r.returncode == code, (r.returncode, r.stderr[-3000:])
  assert 'Traceback' not in err and len(err.splitlines()) == 1, err[-3000:]
  return err


def snapshot(*paths: str) -> dict:
  """md5 of every file under `paths` (and the listing): what must not change."""
  out = {}
  for p in paths:
    files = [p] if os.path.isfile(p) else sorted(glob.glob(os.path.join(p, '**', '*'), recursive=True))
    for f in files:
      if os.path.isfile(f) and os.path.basename(f) != '.lock' and '/tb/' not in f:
        with open(f, 'rb') as fh:
          out[f] = hashlib.md5(fh.read()).hexdigest()
      else:
        out[f] = 'dir' if os.path.isdir(f) else 'other'
  return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> tuple[str, str]:
  """(tmp dir, a finished 4-step run with checkpoints 2 and 4), shared by the module: copy it to change it."""
  tmp = str(tmp_path_factory.mktemp('bad_inputs'))
  w = os.path.join(tmp, 'run')
  r = run_module('minillm_jax.train', *tiny(tmp, w))
  assert r.returncode == 0, r.stderr[-3000:]
  return tmp, w


def copy_run(trained, name: str) -> str:
  tmp, w = trained
  dst = os.path.join(tmp, name)
  shutil.rmtree(dst, ignore_errors=True)
  shutil.copytree(w, dst, ignore=shutil.ignore_patterns('.lock'))
  return dst


# ------------------------------------------------------------------------------ item 3: stale temp dirs

def _prep_cfg(tmp, path, **data):
  from configs.shakespeare_char import get_config
  c = get_config()
  c.data.update(corpus='local', path=str(path), cache_dir=os.path.join(str(tmp), 'cache'), **data)
  c.model.update(block_size=16)
  return c


def test_prepare_removes_only_its_own_dead_temp_dirs(tmp_path):
  from minillm_jax.data import prepare
  (tmp_path / 'c.txt').write_text(TEXT)
  root = tmp_path / 'cache'
  root.mkdir()
  dead = subprocess.Popen(['true'])
  dead.wait()
  old = time.time() - 7 * 3600
  dirs = {'user': root / '.tmp-my-notes', 'no_marker': root / f'.tmp-x-{dead.pid}-0123abcd',
          'alive': root / f'.tmp-x-{os.getpid()}-0123abcd', 'dead': root / f'.tmp-y-{dead.pid}-89abcdef'}
  for name, d in dirs.items():
    d.mkdir()
    (d / 'keep.txt').write_text('mine')
    if name in ('alive', 'dead'):
      pid = os.getpid() if name == 'alive' else dead.pid
      (d / '.minillm-prepare').write_text(json.dumps({'pid': pid, 'host': os.uname().nodename}))
    os.utime(d, (old, old))
  prepare.prepare(_prep_cfg(tmp_path, tmp_path / 'c.txt'))
  assert {n for n, d in dirs.items() if d.exists()} == {'user', 'no_marker', 'alive'}
  assert (dirs['user'] / 'keep.txt').read_text() == 'mine'


# ------------------------------------------------------------------------- item 7: disk full in training

@pytest.mark.parametrize('site', ['metrics', 'checkpoint'])
def test_disk_full_during_training_is_one_line_and_keeps_the_checkpoints(trained, site):
  tmp, _ = trained
  w = copy_run(trained, f'full-{site}')
  before = sorted(os.listdir(os.path.join(w, 'checkpoints')))
  r = run_module('minillm_jax.train', *tiny(tmp, w, **{'train.steps': 8}), env={'MINILLM_FAULT': f'{site}:ENOSPC'})
  err = one_line(r)
  assert 'disk full while writing' in err and 'free space and resume with the same command' in err, err
  with open(os.path.join(w, 'run.json')) as fh:
    run = json.load(fh)
  assert run['status'] == 'failed' and 'disk full' in run['reason'], run
  assert set(before) <= set(os.listdir(os.path.join(w, 'checkpoints')))
  r = run_module('minillm_jax.train', *tiny(tmp, w, **{'train.steps': 8}))  # space freed: the same command resumes
  assert r.returncode == 0 and 'resuming from step' in r.stdout, r.stderr[-3000:]


# ---------------------------------------------------------------------------- item 8: read-only filesystem

def test_read_only_filesystem_in_train_and_plot(trained):
  tmp, w = trained
  before = snapshot(w)
  r = run_module('minillm_jax.plot', f'--workdir={w}', f'--out={tmp}/ro/curves.png', env={'MINILLM_FAULT': 'figure:EROFS'})
  assert 'read-only filesystem while writing' in one_line(r)
  w2 = copy_run(trained, 'ro')
  before2 = snapshot(w2)
  r = run_module('minillm_jax.train', *tiny(tmp, w2, **{'train.steps': 6}), env={'MINILLM_FAULT': 'run_json:EROFS'})
  assert 'read-only filesystem while writing' in one_line(r)
  assert snapshot(w) == before and snapshot(w2) == before2


# ------------------------------------------------------------------- item 9: chat on a damaged checkpoint

def damage_params(w: str, overwrite: bool = True) -> None:
  """Cuts every parameter array file of the run's checkpoints to 300 bytes (and overwrites bytes 100-199)."""
  for f in glob.glob(f'{w}/checkpoints/*/params/**/*', recursive=True):
    if os.path.isfile(f) and os.path.getsize(f) > 200:
      with open(f, 'r+b') as fh:
        if overwrite:
          fh.seek(100)
          fh.write(b'\xff' * 100)
        fh.truncate(300)


@pytest.mark.slow
def test_chat_on_damaged_checkpoint_is_always_one_line(trained):
  w = copy_run(trained, 'damaged')
  damage_params(w)
  for _ in range(8):
    err = one_line(run_module('minillm_jax.chat', f'--workdir={w}', '--prompt=hi', '--max_new_tokens=2'))
    assert 'cannot restore checkpoint' in err, err


# The race above is rare (2 of 12 runs when filed, none in 44 runs since), so this test makes its symptom happen
# every time: as the chat process exits after its one-line refusal, a thread raises the RuntimeError that
# orbax's event-loop thread raises when a failed read's callback meets the closed loop. That exact error is
# dropped; any other error of a thread still prints.
_EXIT_NOISE = """
import atexit, runpy, sys, threading
msg = sys.argv.pop()
go = threading.Event()
def _raise():
  go.wait()
  raise RuntimeError(msg)
t = threading.Thread(target=_raise, daemon=True)  # started now: Python 3.12 starts no thread at exit
t.start()
atexit.register(lambda: (go.set(), t.join()))
sys.argv = ['chat'] + sys.argv[1:]
runpy.run_module('minillm_jax.chat', run_name='__main__')
"""


def test_event_loop_closed_at_exit_after_a_failed_read_is_dropped(trained):
  w = copy_run(trained, 'damaged_exit')
  damage_params(w, overwrite=False)
  chat = [sys.executable, '-c', _EXIT_NOISE, f'--workdir={w}', '--prompt=hi', '--max_new_tokens=2']
  r = subprocess.run([*chat, 'Event loop is closed'], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     check=False)
  assert 'cannot restore checkpoint' in one_line(r)
  r = subprocess.run([*chat, 'another error'], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 2 and 'RuntimeError: another error' in r.stderr  # only that exact noise is dropped


# ------------------------------------------------------------------------------- item 10: too big to fit

def test_model_too_big_for_memory_is_refused_before_building(tmp_path):
  w = str(tmp_path / 'big')
  r = run_module('minillm_jax.train', '--config=configs/shakespeare_char.py', f'--workdir={w}',
                 '--config.model.n_layer=48', '--config.model.d_model=4096')
  err = one_line(r)
  assert 'GiB' in err and 'MINILLM_SKIP_MEMORY_CHECK=1' in err, err
  assert not os.path.exists(w)


def test_memory_check_can_be_skipped(monkeypatch):
  from configs.shakespeare_char import get_config
  from minillm_jax.training import loop
  cfg = get_config()
  with pytest.raises(UserError, match='GiB'):
    loop.check_memory(cfg, 10 ** 13)
  monkeypatch.setenv('MINILLM_SKIP_MEMORY_CHECK', '1')
  loop.check_memory(cfg, 10 ** 13)
  monkeypatch.delenv('MINILLM_SKIP_MEMORY_CHECK')
  loop.check_memory(cfg, 10 ** 6)  # a small model passes


# ------------------------------------------------------------------------ item 11: token cache integrity

@pytest.mark.parametrize('damage', ['in_range', 'out_of_range'])
def test_damaged_token_cache_is_detected_and_rebuilt(tmp_path, caplog, damage):
  from minillm_jax.data import prepare
  (tmp_path / 'c.txt').write_text(TEXT)
  cfg = _prep_cfg(tmp_path, tmp_path / 'c.txt')
  p = prepare.prepare(cfg)
  good = p.train_path.read_bytes()
  ids = np.frombuffer(good, p.dtype).copy()
  n = int(ids.size * 0.45)
  ids[:n] = 0 if damage == 'in_range' else np.iinfo(p.dtype).max  # 0 is a valid id: only the hash tells
  p.train_path.write_bytes(ids.tobytes())
  with caplog.at_level(logging.WARNING):
    p2 = prepare.prepare(cfg)
  assert p2.train_path.read_bytes() == good
  assert any('is damaged' in r.getMessage() and 'rebuilding' in r.getMessage() for r in caplog.records)
  assert 'train_blake2b' in p2.manifest


# ----------------------------------------------------------------------------- item 14: wording, races

def test_zero_byte_jsonl_int_field_and_binary_files(tmp_path, caplog):
  from minillm_jax.data import prepare
  (tmp_path / 'empty.jsonl').write_bytes(b'')
  with pytest.raises(UserError, match='is empty'):
    prepare.prepare(_prep_cfg(tmp_path, tmp_path / 'empty.jsonl'))
  (tmp_path / 'ints.jsonl').write_text(''.join(json.dumps({'text': i}) + '\n' for i in range(50)))
  with pytest.raises(UserError, match="field 'text' of .*ints.jsonl holds int values, not text"):
    prepare.prepare(_prep_cfg(tmp_path, tmp_path / 'ints.jsonl'))
  d = tmp_path / 'mixed'
  d.mkdir()
  (d / 'image.txt').write_bytes(PNG)
  with pytest.raises(UserError, match='only 1 binary file'):
    prepare.prepare(_prep_cfg(tmp_path, d))
  (d / 'real.txt').write_text(TEXT)
  with caplog.at_level(logging.WARNING):
    p = prepare.prepare(_prep_cfg(tmp_path, d))
  assert p.vocab_size < 100  # the text's characters, not thousands of "characters" from the image's bytes
  assert any('skipped 1 binary file' in r.getMessage() for r in caplog.records)


def test_step_removed_by_retention_while_read_is_not_called_damaged(trained, monkeypatch, capsys):
  from minillm_jax.training import checkpoint
  w = copy_run(trained, 'race')
  real_meta, calls = checkpoint.Checkpointer.meta, []

  def meta_racing_retention(self, step):
    if not calls:  # a training run's retention deletes the newest step just after it was listed
      shutil.rmtree(os.path.join(self.dir, str(step)))
    calls.append(step)
    return real_meta(self, step)
  monkeypatch.setattr(checkpoint.Checkpointer, 'meta', meta_racing_retention)
  _, _, _, meta = checkpoint.load_for_inference(w, 'latest')
  assert meta['step'] == 2 and calls[0] == 4
  assert 'removed by retention' in capsys.readouterr().err
  calls.clear()
  with pytest.raises(UserError, match='step 2 .* was removed by retention'):
    checkpoint.load_for_inference(w, 2)


def test_wrong_type_in_a_config_file_names_the_file_and_line(tmp_path):
  cfg = tmp_path / 'mine.py'
  cfg.write_text('from minillm_jax.config import default_config\n\n\ndef get_config(variant=""):\n'
                 '  c = default_config()\n  c.train.steps = "many"\n  return c\n')
  before = snapshot(str(cfg))
  err = one_line(run_module('minillm_jax.train', f'--config={cfg}', f'--workdir={tmp_path}/w'))
  assert f'{cfg}:6' in err and "'steps' must be int, not str" in err, err
  assert snapshot(str(cfg)) == before


# ------------------------------------------------------------------------------------------- catalogue

def _files(tmp: str) -> dict:
  """The user's own files the catalogue's cases point at (made once)."""
  f = {k: os.path.join(tmp, 'user', k) for k in ('empty_dir', 'empty.jsonl', 'ints.jsonl', 'image.txt',
                                                 'bad_tok.json', 'a_file', 'syntax.py', 'noget.py', 'badtype.py',
                                                 'raises.py')}
  if not os.path.isdir(f['empty_dir']):
    os.makedirs(f['empty_dir'])
    for k, text in (('empty.jsonl', ''), ('ints.jsonl', '{"text": 1}\n{"text": 2}\n'), ('bad_tok.json', '{"model": 3'),
                    ('a_file', 'not a directory\n'), ('syntax.py', 'def get_config(:\n'),
                    ('noget.py', 'X = 1\n'),
                    ('badtype.py', ('from minillm_jax.config import default_config\n\n\ndef get_config(v=""):\n'
                                   '  c = default_config()\n  c.optim.lr = "fast"\n  return c\n')),
                    ('raises.py', 'def get_config(v=""):\n  raise ValueError("no such preset")\n')):
      with open(f[k], 'w') as fh:
        fh.write(text)
    with open(f['image.txt'], 'wb') as fh:
      fh.write(PNG)
  return f


def _cases():
  """(id, module, args(tmp, w, files), expected stderr text, env)."""
  def tr(**over):
    return lambda tmp, w, f: tiny(tmp, os.path.join(tmp, 'new'), **over)

  def on_w(**over):
    return lambda tmp, w, f: tiny(tmp, w, **over)
  return [
      ('missing_config', 'minillm_jax.train', lambda t, w, f: ['--config=nope.py', f'--workdir={t}/new'],
       'not found', None),
      ('config_is_dir', 'minillm_jax.train', lambda t, w, f: [f'--config={f["empty_dir"]}', f'--workdir={t}/new'],
       'is a directory', None),
      ('unknown_variant', 'minillm_jax.train',
       lambda t, w, f: ['--config=configs/shakespeare_char.py:huge', f'--workdir={t}/new'], 'variant', None),
      ('config_syntax_error', 'minillm_jax.train', lambda t, w, f: [f'--config={f["syntax.py"]}', f'--workdir={t}/new'],
       'syntax.py:1', None),
      ('config_no_get_config', 'minillm_jax.train', lambda t, w, f: [f'--config={f["noget.py"]}', f'--workdir={t}/new'],
       'get_config', None),
      ('config_raises', 'minillm_jax.train', lambda t, w, f: [f'--config={f["raises.py"]}', f'--workdir={t}/new'],
       'no such preset', None),
      ('config_wrong_type', 'minillm_jax.train', lambda t, w, f: [f'--config={f["badtype.py"]}', f'--workdir={t}/new'],
       "badtype.py:6: field 'lr' must be float, not str", None),
      ('override_bad_int', 'minillm_jax.train', tr(**{'train.steps': 'abc'}), 'steps', None),
      ('override_no_section', 'minillm_jax.train', tr(**{'nosuch.x': 1}), 'no config section', None),
      ('override_no_field', 'minillm_jax.train', tr(**{'train.nosuch': 1}), 'nosuch', None),
      ('override_workdir', 'minillm_jax.train', tr(workdir='x'), '--workdir=DIR', None),
      ('unknown_flag', 'minillm_jax.train', lambda t, w, f: tiny(t, f'{t}/new') + ['--nosuchflag'],
       'nosuchflag', None),
      ('no_workdir', 'minillm_jax.train', lambda t, w, f: ['--config=configs/shakespeare_char.py'], 'workdir', None),
      ('workdir_is_file', 'minillm_jax.train', lambda t, w, f: tiny(t, f['a_file']), 'is a file', None),
      ('resume_no_config', 'minillm_jax.train', lambda t, w, f: [f'--workdir={f["empty_dir"]}'], 'no --config given',
       None),
      ('batch_zero', 'minillm_jax.train', tr(**{'train.batch_size': 0}), 'batch_size', None),
      ('lr_negative', 'minillm_jax.train', tr(**{'optim.lr': -1.0}), 'lr', None),
      ('heads_do_not_divide', 'minillm_jax.train', tr(**{'model.n_head': 3}), 'n_head', None),
      ('val_fraction_2', 'minillm_jax.train', tr(**{'data.val_fraction': 2.0}), 'val_fraction', None),
      ('accum_zero', 'minillm_jax.train', tr(**{'optim.accum_steps': 0}), 'accum_steps', None),
      ('dropout_over_one', 'minillm_jax.train', tr(**{'model.dropout': 1.5}), 'dropout', None),
      ('keep_zero', 'minillm_jax.train', tr(**{'train.keep': 0}), 'keep', None),
      ('too_big', 'minillm_jax.train', tr(**{'model.n_layer': 48, 'model.d_model': 4096}), 'GiB', None),
      ('unknown_corpus', 'minillm_jax.train', tr(**{'data.corpus': 'nosuch'}), 'corpus', None),
      ('missing_corpus_path', 'minillm_jax.train', lambda t, w, f: tiny(t, f'{t}/new', **{'data.path': f'{t}/no.txt'}),
       'does not exist', None),
      ('empty_corpus_dir', 'minillm_jax.train',
       lambda t, w, f: tiny(t, f'{t}/new', **{'data.path': f['empty_dir']}), 'has no', None),
      ('zero_byte_jsonl', 'minillm_jax.train',
       lambda t, w, f: tiny(t, f'{t}/new', **{'data.path': f['empty.jsonl']}), 'is empty', None),
      ('int_text_field', 'minillm_jax.train',
       lambda t, w, f: tiny(t, f'{t}/new', **{'data.path': f['ints.jsonl']}), 'holds int values', None),
      ('binary_corpus', 'minillm_jax.train',
       lambda t, w, f: tiny(t, f'{t}/new', **{'data.path': f['image.txt']}), 'binary', None),
      ('corrupt_tokenizer_json', 'minillm_jax.train',
       lambda t, w, f: tiny(t, f'{t}/new', **{'data.tokenizer': f['bad_tok.json']}), 'tokenizer', None),
      ('unknown_tokenizer', 'minillm_jax.train', tr(**{'data.tokenizer': 'sentencepiece'}), 'tokenizer', None),
      ('resume_other_model', 'minillm_jax.train', on_w(**{'model.d_model': 64}), 'different model', None),
      ('resume_other_corpus', 'minillm_jax.train', on_w(**{'data.corpus': 'shakespeare'}), 'tokenizer', None),
      ('resume_past_steps', 'minillm_jax.train', on_w(**{'train.steps': 2}), 'past train.steps', None),
      ('train_read_only_fs', 'minillm_jax.train', on_w(**{'train.steps': 6}), 'read-only filesystem',
       {'MINILLM_FAULT': 'run_json:EROFS'}),
      ('generate_missing_workdir', 'minillm_jax.generate', lambda t, w, f: [f'--workdir={t}/nowhere', '--prompt=a'],
       'nowhere', None),
      ('generate_workdir_is_file', 'minillm_jax.generate', lambda t, w, f: [f'--workdir={f["a_file"]}', '--prompt=a'],
       'a_file', None),
      ('generate_no_such_step', 'minillm_jax.generate', lambda t, w, f: [f'--workdir={w}', '--step=999', '--prompt=a'],
       'no checkpoint for step 999', None),
      ('generate_bad_step', 'minillm_jax.generate', lambda t, w, f: [f'--workdir={w}', '--step=abc', '--prompt=a'],
       'best, latest or a step number', None),
      ('chat_missing_workdir', 'minillm_jax.chat', lambda t, w, f: [f'--workdir={t}/nowhere', '--prompt=hi'],
       'nowhere', None),
      ('status_missing_workdir', 'minillm_jax.status', lambda t, w, f: [f'--workdir={t}/nowhere'], 'nowhere', None),
      ('evaluate_missing_workdir', 'minillm_jax.evaluate', lambda t, w, f: [f'--workdir={t}/nowhere'], 'nowhere', None),
      ('plot_not_a_run', 'minillm_jax.plot', lambda t, w, f: [f'--workdir={f["empty_dir"]}'], 'no metrics', None),
      ('plot_bad_format', 'minillm_jax.plot', lambda t, w, f: [f'--workdir={w}', f'--out={t}/c.xyz'],
       'cannot write .xyz', None),
      ('plot_out_is_dir', 'minillm_jax.plot', lambda t, w, f: [f'--workdir={w}', f'--out={f["empty_dir"]}'],
       'is a directory', None),
      ('plot_read_only_fs', 'minillm_jax.plot', lambda t, w, f: [f'--workdir={w}', f'--out={t}/ro.png'],
       'read-only filesystem', {'MINILLM_FAULT': 'figure:EROFS'}),
      ('plot_disk_full', 'minillm_jax.plot', lambda t, w, f: [f'--workdir={w}', f'--out={t}/full.png'],
       'disk full', {'MINILLM_FAULT': 'figure:ENOSPC'}),
  ]


CASES = _cases()


@pytest.mark.slow
@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_catalogue(trained, case):
  _, module, make_args, expected, env = case
  tmp, w = trained
  f = _files(tmp)
  before = snapshot(w, os.path.join(tmp, 'user'), os.path.join(tmp, 'corpus.txt'))
  r = run_module(module, *make_args(tmp, w, f), env=env)
  err = one_line(r)
  assert expected in err, err
  assert snapshot(w, os.path.join(tmp, 'user'), os.path.join(tmp, 'corpus.txt')) == before


def test_the_catalogue_is_big_enough():
  assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
