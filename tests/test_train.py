"""Training loop behaviour: learning, exact resume after SIGKILL, SIGTERM, NaN, corrupt checkpoints, devices,
accumulation, weight-decay mask, monitoring outputs."""
import glob
import itertools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_module
from flax import nnx

from minillm_jax import train as train_cli
from minillm_jax.config import default_config
from minillm_jax.training import step as train

TEXT = ''.join(f'{w} the quick brown fox {i % 7} jumps over the lazy dog number {i % 13}.\n'
               for i, w in enumerate(['alpha', 'beta', 'gamma', 'delta', 'omega'] * 200))


def args(tmp, workdir='run', **over) -> list[str]:
  corpus = os.path.join(tmp, 'corpus.txt')
  if not os.path.exists(corpus):
    with open(corpus, 'w') as f:
      f.write(TEXT)
  base = {'data.corpus': 'local', 'data.path': corpus, 'data.cache_dir': os.path.join(tmp, 'cache'),
          'model.n_layer': 1, 'model.n_head': 2, 'model.d_model': 32, 'model.block_size': 32,
          'train.batch_size': 8, 'train.steps': 40, 'train.eval_every': 20, 'train.eval_batches': 2,
          'train.ckpt_every': 20, 'train.log_every': 1, 'optim.warmup_steps': 5, 'optim.lr': 3e-3,
          'train.peak_flops': 1e11, **over}
  return ['--config=configs/shakespeare_char.py', f'--workdir={os.path.join(tmp, workdir)}', '--nosample',
          *[f'--config.{k}={v}' for k, v in base.items()]]


def metrics(tmp, workdir='run') -> list[dict]:
  with open(os.path.join(tmp, workdir, 'metrics.jsonl')) as f:
    return [json.loads(ln) for ln in f]


def losses(tmp, workdir='run') -> dict[int, float]:
  return {r['step']: r['train_loss'] for r in metrics(tmp, workdir) if 'train_loss' in r}


def test_loss_decreases_and_outputs_are_written(tmp_path):
  tmp = str(tmp_path)
  t0 = time.time()
  p = subprocess.Popen([sys.executable, '-m', 'minillm_jax.train', *args(tmp, **{'train.steps': 60})], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  while not os.path.exists(os.path.join(tmp, 'run', 'run.json')) and p.poll() is None:
    time.sleep(0.05)
  # status --watch refreshes until the run ends, then says so and exits
  w = run_module('minillm_jax.status', f'--workdir={tmp}/run', '--watch=0.2')
  out, err = p.communicate(timeout=300)
  r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
  assert r.returncode == 0, r.stderr[-2000:]
  assert w.returncode == 0 and w.stdout.count('progress   step') >= 2, w.stdout[-2000:]
  assert w.stdout.rstrip().split('\n\n')[-1].splitlines()[1] == 'status     finished'
  if len(os.sched_getaffinity(0)) >= 2:  # auto: the batch of 8 spread over one CPU device per core
    assert 'CPU: 2 devices' in r.stdout or 'CPU: 4 devices' in r.stdout or 'CPU: 8 devices' in r.stdout
  ls = losses(tmp)
  assert np.mean([ls[s] for s in range(51, 61)]) < 0.6 * np.mean([ls[s] for s in range(1, 6)])
  rows = metrics(tmp)
  keys = {'step', 'train_loss', 'lr', 'grad_norm', 'tokens_seen', 'tokens_per_s', 'time', 'wall_time'}
  assert keys <= set(rows[-2]) and {'val_loss', 'val_ppl', 'wall_time'} <= set(rows[-1])
  walls = [row['wall_time'] for row in rows]
  assert t0 < walls[0] and walls == sorted(walls) and walls[-1] < time.time()
  o = default_config().optim  # the row's lr is the one its step's update used (schedule at step - 1)
  o.update(warmup_steps=5, lr=3e-3, min_lr=1e-4)
  sched = train.lr_schedule(o, 60)
  lrs = {r['step']: r['lr'] for r in rows if 'train_loss' in r}
  np.testing.assert_allclose([lrs[s] for s in (1, 5, 6, 30, 60)], [float(sched(s - 1)) for s in (1, 5, 6, 30, 60)],
                             rtol=1e-6)
  assert glob.glob(os.path.join(tmp, 'run', 'tb', 'events.out.tfevents.*'))
  assert sorted(os.listdir(os.path.join(tmp, 'run', 'checkpoints'))) == ['20', '40', '60']
  s = run_module('minillm_jax.status', f'--workdir={tmp}/run', '--json')
  st = json.loads(s.stdout)
  assert st['step'] == 60 and st['status'] == 'finished' and st['checkpoints'] == [20, 40, 60]
  os.makedirs(os.path.join(tmp, 'run', 'checkpoints', '80'))  # an empty step directory is not a checkpoint
  assert json.loads(run_module('minillm_jax.status', f'--workdir={tmp}/run', '--json').stdout)['checkpoints'] == [
      20, 40, 60]
  both = run_module('minillm_jax.status', f'--workdir={tmp}/run', f'--workdir={tmp}/run', '--json')
  assert [x['step'] for x in json.loads(both.stdout)] == [60, 60]  # every --workdir given, not the last only
  assert st['best_val_loss'] == min(r['val_loss'] for r in rows if 'val_loss' in r)
  p = run_module('minillm_jax.plot', f'--workdir={tmp}/run', f'--workdir={tmp}/run', f'--out={tmp}/c.png')
  assert p.returncode == 0 and os.path.getsize(f'{tmp}/c.png') > 10_000
  p = run_module('minillm_jax.plot', f'--workdir={tmp}/run', f'--out={tmp}/curves')
  assert p.returncode == 0 and p.stdout.strip() == f'{tmp}/curves.png' and os.path.getsize(f'{tmp}/curves.png')
  p = run_module('minillm_jax.plot', f'--workdir={tmp}/run', f'--out={tmp}/c.xyz')
  assert p.returncode == 2 and 'matplotlib cannot write .xyz' in p.stderr and len(p.stderr.splitlines()) == 1


def test_rows_are_written_when_their_step_finishes(tmp_path):
  # One step per call, a row every 2 steps: each row is timed after its own step, not batched with the next
  # row at a later flush (both rows then carried the later time and speed).
  tmp = str(tmp_path)
  r = run_module('minillm_jax.train', *args(tmp, **{'train.steps': 12, 'train.log_every': 2, 'train.eval_every': 12,
                                                    'train.ckpt_every': 12, 'train.steps_per_call': 1}))
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [r for r in metrics(tmp) if 'train_loss' in r]
  assert [r['step'] for r in rows] == [2, 4, 6, 8, 10, 12]
  times = [r['time'] for r in rows]
  assert all(a < b for a, b in itertools.pairwise(times)), times
  speeds = [r['tokens_per_s'] for r in rows[1:]]
  assert all(s > 0 for s in speeds) and len(set(speeds)) == len(speeds), speeds


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
  tmp = str(tmp_path)
  a = args(tmp, 'ref', **{'train.steps': 400, 'train.ckpt_every': 50, 'train.eval_every': 100})
  r_ref = run_module('minillm_jax.train', *a)
  assert r_ref.returncode == 0
  b = args(tmp, 'killed', **{'train.steps': 400, 'train.ckpt_every': 50, 'train.eval_every': 100})
  p = subprocess.Popen([sys.executable, '-m', 'minillm_jax.train', *b], cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  mpath = os.path.join(tmp, 'killed', 'metrics.jsonl')
  deadline = time.time() + 120
  while time.time() < deadline and p.poll() is None:
    if os.path.exists(mpath) and os.path.getsize(mpath) and max(losses(tmp, 'killed')) >= 130:
      break
    time.sleep(0.02)
  assert p.poll() is None, 'the run finished before it could be killed'
  p.send_signal(signal.SIGKILL)
  p.wait()
  killed_at = max(losses(tmp, 'killed'))
  assert 130 <= killed_at < 400
  with open(mpath, 'ab') as f:  # a row cut off mid-write by the kill, with damaged (non-UTF-8) bytes
    f.write(b'{"step": 131, "train_l\xa9\xff')
  r = run_module('minillm_jax.train', *b)
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'resuming from step' in r.stdout
  ref, res = losses(tmp, 'ref'), losses(tmp, 'killed')
  assert sorted(res) == list(range(1, 401))
  assert [ref[s] for s in range(1, 401)] == [res[s] for s in range(1, 401)]  # bitwise
  # the evaluation lines after the resume (checkpoints every 50 steps, evaluations every 100) report the same
  # train loss, the mean since the previous evaluation, as the uninterrupted run's
  evals = lambda out: [ln for ln in out.splitlines() if ln.startswith('step ') and ': train loss' in ln]
  resumed = evals(r.stdout)
  assert resumed and resumed == evals(r_ref.stdout)[-len(resumed):], (resumed, evals(r_ref.stdout))


def test_sigterm_saves_and_exits_143(tmp_path):
  tmp = str(tmp_path)
  b = args(tmp, **{'train.steps': 100000, 'train.ckpt_every': 100000, 'train.eval_every': 100000})
  p = subprocess.Popen([sys.executable, '-m', 'minillm_jax.train', *b], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  mpath = os.path.join(tmp, 'run', 'metrics.jsonl')
  while not (os.path.exists(mpath) and os.path.getsize(mpath) > 0):
    assert p.poll() is None, p.stderr.read()
    time.sleep(0.05)
  r = run_module('minillm_jax.train', *b)  # a second run on the same workdir is refused while the first lives
  assert r.returncode == 2 and 'is being trained by' in r.stderr, r.stderr[-2000:]
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 128 + signal.SIGTERM, err  # saved, but not finished
  assert 'SIGTERM: saved step' in out and 'Resume with: python -m minillm_jax.train' in out
  steps = [int(d) for d in os.listdir(os.path.join(tmp, 'run', 'checkpoints'))]
  assert len(steps) == 1 and steps[0] >= 1
  r = run_module('minillm_jax.status', f'--workdir={tmp}/run', '--json')
  assert json.loads(r.stdout)['status'] == 'interrupted'


def test_nan_stops_without_replacing_good_checkpoint(tmp_path):
  tmp = str(tmp_path)
  assert run_module('minillm_jax.train', *args(tmp, **{'train.steps': 20})).returncode == 0
  r = run_module('minillm_jax.train', *args(tmp, **{'train.steps': 60, 'optim.lr': 1e30, 'optim.min_lr': 1e30,
                                                     'optim.grad_clip': 0.0, 'train.ckpt_every': 1}))
  assert r.returncode == 2
  assert 'error: loss is' in r.stderr and 'the last good checkpoint (step' in r.stderr
  steps = sorted(int(d) for d in os.listdir(f'{tmp}/run/checkpoints'))
  bad_step = int(r.stderr.split(' at step ')[1].split(';')[0])
  assert 20 < max(steps) < bad_step  # saved while finite, nothing at or after the non-finite step
  r = run_module('minillm_jax.status', f'--workdir={tmp}/run', '--json')  # a deliberate stop, not a crash
  assert json.loads(r.stdout)['status'] == 'stopped_nonfinite'
  from minillm_jax.training import checkpoint
  _, model, _, meta = checkpoint.load_for_inference(f'{tmp}/run', 'latest')
  assert meta['step'] == max(steps)
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(nnx.state(model)))


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
  tmp = str(tmp_path)
  assert run_module('minillm_jax.train', *args(tmp, **{'train.steps': 40})).returncode == 0
  for f in glob.glob(f'{tmp}/run/checkpoints/40/params/**/*', recursive=True):
    if os.path.isfile(f):
      with open(f, 'wb') as fh:
        fh.write(b'garbage')
  r = run_module('minillm_jax.train', *args(tmp, **{'train.steps': 60}))
  assert r.returncode == 0, r.stderr[-2000:]
  if len(os.sched_getaffinity(0)) >= 2:  # auto: the batch of 8 spread over one CPU device per core
    assert 'CPU: 2 devices' in r.stdout or 'CPU: 4 devices' in r.stdout or 'CPU: 8 devices' in r.stdout
  assert 'resuming from step 20' in r.stdout
  warn = [ln for ln in r.stderr.splitlines() if 'checkpoint step 40 is unreadable' in ln]
  assert len(warn) == 1 and warn[0].startswith('warning: ') and 'UserWarning' not in r.stderr, r.stderr
  assert os.path.isdir(glob.glob(f'{tmp}/run/corrupt_checkpoints/40-*')[0])
  assert 60 in [int(d) for d in os.listdir(f'{tmp}/run/checkpoints')]
  # every checkpoint unreadable: refused, and the run's history is not rewritten by a fresh start
  for d in glob.glob(f'{tmp}/run/checkpoints/*/params'):
    shutil.rmtree(d)
  before = pathlib.Path(f'{tmp}/run/metrics.jsonl').read_text()
  for _ in range(2):  # the second attempt finds the checkpoints dir empty
    r = run_module('minillm_jax.train', *args(tmp, **{'train.steps': 80}))
    assert r.returncode == 2 and 'error: no readable checkpoint is left' in r.stderr, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr, r.stderr[-2000:]  # Orbax's cleanup thread ended before the exit
  assert pathlib.Path(f'{tmp}/run/metrics.jsonl').read_text() == before


def test_refused_resume_leaves_the_workdir_as_it_was(tmp_path):
  tmp = str(tmp_path)
  assert run_module('minillm_jax.train', *args(tmp, **{'train.steps': 20})).returncode == 0
  files = {n: pathlib.Path(tmp, 'run', n).read_text() for n in ('config.json', 'config.py', 'run.json', 'metrics.jsonl')}
  r = run_module('minillm_jax.train', *args(tmp, **{'train.steps': 40, 'model.n_layer': 2}))
  assert r.returncode == 2 and 'was trained with a different model (n_layer: checkpoint 1 vs config 2)' in r.stderr
  r = run_module('minillm_jax.train', *args(tmp, **{'train.steps': 40, 'data.path': f'{tmp}/missing.txt'}))
  assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'missing.txt' in r.stderr, r.stderr
  r = run_module('minillm_jax.train', *args(tmp, **{'train.steps': 40, 'train.batch_size': 4}))  # other data order
  assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr[-2000:]
  assert 'saved with batch_size=8 but this pipeline has batch_size=4' in r.stderr
  assert not os.path.exists(f'{tmp}/run/corrupt_checkpoints')  # healthy checkpoints are not set aside
  assert {n: pathlib.Path(tmp, 'run', n).read_text() for n in files} == files
  r = run_module('minillm_jax.train', f'--workdir={tmp}/run', '--nosample')  # resumes from config.json as it was
  assert r.returncode == 0 and 'resuming from step 20' in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize('fsdp,accum', [(False, 1), (True, 1), (False, 2)])
def test_one_and_eight_devices_agree(tmp_path, fsdp, accum):
  """Data parallel (gradients averaged as one flat buffer, with and without accumulation) and FSDP on 8
  devices compute the 1-device run."""
  tmp = str(tmp_path)
  over = {'train.steps': 10, 'train.fsdp': fsdp, 'model.d_model': 64, 'model.n_head': 4, 'optim.accum_steps': accum}
  r1 = run_module('minillm_jax.train', *args(tmp, 'one', **over, **{'train.cpu_devices': 1}))
  assert 'CPU:' not in r1.stdout
  r8 = run_module('minillm_jax.train', *args(tmp, 'eight', **over),
                  env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert r1.returncode == 0 and r8.returncode == 0, r8.stderr[-2000:]
  a, b = losses(tmp, 'one'), losses(tmp, 'eight')
  np.testing.assert_allclose([a[s] for s in range(1, 11)], [b[s] for s in range(1, 11)], rtol=2e-5)


def test_steps_per_call_matches_single_steps(tmp_path):
  """K steps per jitted call (lax.scan) is the same run as one step per call: same batches, same dropout
  streams, metrics rows still every log_every steps."""
  tmp = str(tmp_path)
  over = {'train.steps': 20, 'model.dropout': 0.1, 'train.log_every': 3, 'train.cpu_devices': 1}
  r1 = run_module('minillm_jax.train', *args(tmp, 'one', **over, **{'train.steps_per_call': 1}))
  r5 = run_module('minillm_jax.train', *args(tmp, 'five', **over, **{'train.steps_per_call': 5}))
  assert r1.returncode == 0 and r5.returncode == 0, r5.stderr[-2000:]
  a, b = losses(tmp, 'one'), losses(tmp, 'five')
  assert sorted(a) == sorted(b) == [3, 6, 9, 12, 15, 18, 20]
  np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(a)], rtol=1e-5)
  assert metrics(tmp, 'five')[-2]['tokens_seen'] == 20 * 8 * 32


def test_compilation_cache_is_reused(tmp_path):
  tmp, cache = str(tmp_path), str(tmp_path / 'xla')
  over = {'train.steps': 10, 'train.cpu_devices': 1}
  env = {'JAX_COMPILATION_CACHE_DIR': cache, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  assert run_module('minillm_jax.train', *args(tmp, 'a', **over), env=env).returncode == 0
  entries = set(os.listdir(cache))
  assert any(e.startswith('jit_train_steps-') for e in entries)
  r = run_module('minillm_jax.train', *args(tmp, 'b', **over), env=env)
  assert r.returncode == 0 and set(os.listdir(cache)) == entries  # the same programs: all read, none added
  assert losses(tmp, 'a') == losses(tmp, 'b')


def test_bad_inputs_one_line(tmp_path):
  tmp = str(tmp_path)
  r = run_module('minillm_jax.train', f'--workdir={tmp}/x')
  assert r.returncode == 2 and 'no --config given' in r.stderr
  r = run_module('minillm_jax.train', *args(tmp, **{'train.batch_size': 0}))
  assert r.returncode == 2 and 'train.batch_size=0 must be a positive integer' in r.stderr
  assert run_module('minillm_jax.train', *args(tmp, **{'train.steps': 20})).returncode == 0
  r = run_module('minillm_jax.train', *args(tmp, **{'train.steps': 40, 'model.n_layer': 2}))
  assert r.returncode == 2 and 'different model (n_layer: checkpoint 1 vs config 2)' in r.stderr
  r = run_module('minillm_jax.status', f'--workdir={tmp}/nope')
  assert r.returncode == 2 and "workdir" in r.stderr and 'Traceback' not in r.stderr


def test_fine_tune_starts_from_the_base_and_resumes_without_it(tmp_path):
  tmp = str(tmp_path)
  assert run_module('minillm_jax.train', *args(tmp, 'base', **{'train.steps': 20})).returncode == 0
  ft = args(tmp, 'ft', **{'train.init_from': f'{tmp}/base', 'train.steps': 20})
  assert run_module('minillm_jax.train', *ft).returncode == 0
  assert losses(tmp, 'ft')[1] < losses(tmp, 'base')[1] - 0.3  # starts from the trained weights
  os.rename(f'{tmp}/base', f'{tmp}/base_moved')  # a fine-tune resumes from its own checkpoints and tokenizer
  r = run_module('minillm_jax.train', *args(tmp, 'ft', **{'train.init_from': f'{tmp}/base', 'train.steps': 30}))
  assert r.returncode == 0 and 'resuming from step 20' in r.stdout, r.stderr[-2000:]
  assert max(losses(tmp, 'ft')) == 30
  run_json = pathlib.Path(tmp, 'ft', 'run.json').read_text()
  r = run_module('minillm_jax.train', f'--workdir={tmp}/ft', '--nosample')  # finished: nothing is rewritten
  assert r.returncode == 0 and 'has finished its 30 steps' in r.stdout, r.stderr[-2000:]
  assert pathlib.Path(tmp, 'ft', 'run.json').read_text() == run_json
  r = run_module('minillm_jax.train', f'--config={tmp}/ft/config.py', f'--workdir={tmp}/ft', '--nosample',
                 '--config.train.steps=25')
  assert r.returncode == 2 and r.stderr.strip().endswith(
      'is already at step 30, past train.steps=25; resume with --config.train.steps=30 or more'), r.stderr[-2000:]


def test_resume_refuses_another_tokenizer(tmp_path):
  tmp = str(tmp_path)
  assert run_module('minillm_jax.train', *args(tmp, **{'train.steps': 20})).returncode == 0
  other = os.path.join(tmp, 'other.txt')  # same number of distinct characters, different ones
  table = str.maketrans('abcdefghij', 'ABCDEFGHIJ')
  with open(other, 'w') as f:
    f.write(TEXT.translate(table))
  r = run_module('minillm_jax.train', *args(tmp, **{'train.steps': 40, 'data.path': other}))
  assert r.returncode == 2 and 'was trained with another tokenizer' in r.stderr, r.stderr[-500:]
  assert f"data.path: checkpoint {os.path.join(tmp, 'corpus.txt')!r} vs config {other!r}" in r.stderr, r.stderr
  with open(other, 'w') as f:  # more distinct characters: a larger vocabulary, named as the corpus change it is
    f.write(TEXT + 'XYZ!\n')
  r = run_module('minillm_jax.train', *args(tmp, **{'train.steps': 40, 'data.path': other}))
  assert r.returncode == 2 and 'was trained with another tokenizer' in r.stderr, r.stderr[-500:]
  assert 'data.path: checkpoint' in r.stderr and 'vocab_size' not in r.stderr, r.stderr[-500:]


def test_imported_weights_continue_training(tmp_path):
  tmp = str(tmp_path)
  assert run_module('minillm_jax.train', *args(tmp, **{'train.steps': 20})).returncode == 0
  r = run_module('torch_compat.export', f'--workdir={tmp}/run', f'--out={tmp}/m.pt', '--format=pt')
  assert r.returncode == 0, r.stderr
  r = run_module('torch_compat.import_ckpt', f'--src={tmp}/m.pt', f'--workdir={tmp}/imp')
  assert r.returncode == 0, r.stderr
  with open(f'{tmp}/imp/config.json') as f:
    assert json.load(f)['data']['tokenizer'] == os.path.abspath(f'{tmp}/imp/tokenizer.json')
  over = {k.split('=')[0][len('--config.'):]: k.split('=', 1)[1] for k in args(tmp) if k.startswith('--config.')}
  over['train.steps'] = 10
  r = run_module('minillm_jax.train', f'--config={tmp}/imp/config.py', f'--workdir={tmp}/imp', '--nosample',
                 *[f'--config.{k}={v}' for k, v in over.items() if k.startswith(('train.', 'data.'))])
  assert r.returncode == 0, r.stderr[-1000:]
  assert 'starting from the imported weights' in r.stdout
  first = losses(tmp, 'imp')[1]
  assert first < losses(tmp)[1] - 0.5  # starts where the exported run ended, not from scratch


def test_damaged_checkpoint_is_one_line_naming_an_older_step(tmp_path):
  tmp = str(tmp_path)
  assert run_module('minillm_jax.train', *args(tmp, **{'train.steps': 40})).returncode == 0
  for f in glob.glob(f'{tmp}/run/checkpoints/40/params/**/*', recursive=True):
    if os.path.isfile(f) and os.path.getsize(f) > 1000:
      with open(f, 'r+b') as fh:
        fh.truncate(1000)
  for mod in ('minillm_jax.generate', 'torch_compat.export'):
    extra = ['--prompt=the', '--max_new_tokens=4'] if mod.endswith('generate') else [f'--out={tmp}/m.pt']
    r = run_module(mod, f'--workdir={tmp}/run', '--step=40', *extra)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert 'cannot restore checkpoint 40' in r.stderr and r.stderr.strip().endswith('; try --step=20'), r.stderr


def test_detached_launcher_paths_and_refusals(tmp_path):
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'launch', 'train_bg.sh')
  r = subprocess.run([script, '--help'], capture_output=True, text=True, cwd=tmp_path, check=False)
  assert r.returncode == 0 and r.stdout.startswith('usage:')
  (tmp_path / 'bad.py').write_text('def get_config(:\n')  # relative to the caller's directory, not the repo's
  r = subprocess.run([script, 'bad.py', 'myrun'], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                     check=False)
  assert r.returncode == 1 and 'training stopped at once' in r.stderr, r.stderr
  assert 'bad.py' in (tmp_path / 'myrun' / 'train.log').read_text()


def test_mfu_never_exceeds_one_when_the_cached_peak_was_timed_under_load(tmp_path):
  """The matmul peak is measured once and cached; one timed on a busy host is too low. A run that goes faster
  than it raises the cached peak to the rate it achieved, so MFU stays <= 1."""
  tmp, env = str(tmp_path), {'XDG_CACHE_HOME': str(tmp_path / 'xdg')}
  measured = lambda **over: [a for a in args(tmp, **over) if 'peak_flops' not in a]  # no fixed peak
  r = run_module('minillm_jax.train', *measured(**{'train.steps': 20}), env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  cache = tmp_path / 'xdg' / 'minillm_jax' / 'peak_flops.json'
  peaks = json.loads(cache.read_text())
  assert peaks and all(v > 1e9 for v in peaks.values()), peaks  # a 2048^3 matmul runs at GFLOP/s
  cache.write_text(json.dumps(dict.fromkeys(peaks, 1e3)))  # as if timed while the host was swamped
  r = run_module('minillm_jax.train', *measured(**{'train.steps': 100}), env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  mfu = [m['mfu'] for m in metrics(tmp) if m['step'] > 20 and 'mfu' in m]
  assert mfu and all(0 < x <= 1 for x in mfu), mfu
  assert all(v > 1e3 for v in json.loads(cache.read_text()).values())


def test_bf16_hint_only_for_float32_on_amx_cpus(monkeypatch):
  from minillm_jax import parallel
  monkeypatch.setattr(parallel, 'cpu_flags', lambda: {'avx512f', 'amx_bf16'})
  assert '--config.model.dtype=bfloat16' in train_cli.bf16_hint('float32')
  assert train_cli.bf16_hint('bfloat16') is None
  monkeypatch.setattr(parallel, 'cpu_flags', lambda: {'avx512f', 'avx512_bf16'})
  assert train_cli.bf16_hint('float32') is None


def test_wandb_offline_gets_the_metrics_rows(tmp_path):
  """train.wandb_project logs every metrics.jsonl row to W&B; offline mode writes a local run under the
  workdir (its records are binary, so the check counts the metric names in them); a resumed run keeps its id."""
  tmp = str(tmp_path)
  env = {'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true'}
  a = args(tmp, **{'train.steps': 10, 'train.eval_every': 5, 'train.ckpt_every': 5,
                   'train.wandb_project': 'minillm-test'})
  r = run_module('minillm_jax.train', *a, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  runs = glob.glob(f'{tmp}/run/wandb/offline-run-*/run-*.wandb')
  assert len(runs) == 1
  data = pathlib.Path(runs[0]).read_bytes()
  rows = metrics(tmp)
  assert data.count(b'train_loss') >= sum('train_loss' in x for x in rows) == 10
  assert data.count(b'val_loss') >= 2
  assert b'corpus.txt' in data  # the config (data.path) went with the run
  r = run_module('minillm_jax.train', *args(tmp, **{'train.steps': 15, 'train.eval_every': 5, 'train.ckpt_every': 5,
                                                   'train.wandb_project': 'minillm-test'}), env=env)
  assert r.returncode == 0 and 'resuming from step 10' in r.stdout, r.stderr[-2000:]
  ids = {os.path.basename(p).split('-', 3)[-1] for p in glob.glob(f'{tmp}/run/wandb/offline-run-*')}
  assert len(ids) == 1  # the same W&B run id continues
