"""Multi-process training on jax.distributed (launch/local.sh), a killed process, a signal, and resuming a
checkpoint on another process count, device count or sharding (DP <-> FSDP). The training runs are `slow` (each
start of a process costs seconds of imports and compilation on a small CPU; together about 7 minutes on 2 busy
cores); the default suite keeps the lock hand-off, which trains nothing."""
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT
from test_data import _synthetic

from minillm_jax.config import UserError
from minillm_jax.data import pipeline as data
from minillm_jax.training import distributed, monitor

LAUNCH = os.path.join(ROOT, 'launch')
# local.sh runs $PYTHON: this interpreter, not the one an outer `make test PYTHON=...` exported
ENV = {**os.environ, 'PYTHON': sys.executable}
SCRIPTS = ('local.sh', 'slurm.sbatch', 'tpu_vm.sh', 'gpu_check.sh')


def test_launch_scripts_parse_and_answer_help():
  for name in SCRIPTS:
    path = os.path.join(LAUNCH, name)
    assert subprocess.run(['bash', '-n', path], check=False, capture_output=True, timeout=30).returncode == 0, name
    r = subprocess.run(['bash', path, '--help'], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith('usage: '), (name, r.stdout, r.stderr)
  r = subprocess.run(['bash', os.path.join(LAUNCH, 'local.sh'), 'two'], check=False, capture_output=True, text=True, timeout=30)
  assert r.returncode == 2 and r.stderr.startswith('usage: ')


def test_what_the_environment_asks_for(monkeypatch):
  for k in ('MINILLM_COORDINATOR', 'MINILLM_NUM_PROCESSES', 'MINILLM_PROCESS_ID', 'MINILLM_DISTRIBUTED',
            'SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_STEP_NUM_TASKS', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(k, raising=False)
  assert distributed.requested() is None
  assert distributed.requested('h:1234', 2, 1) == {'coordinator_address': 'h:1234', 'num_processes': 2,
                                                   'process_id': 1}
  assert distributed.requested('h:1234', 1, 0) is None  # one process: nothing to join
  monkeypatch.setenv('MINILLM_COORDINATOR', '10.0.0.1:29500')
  monkeypatch.setenv('MINILLM_NUM_PROCESSES', '4')
  monkeypatch.setenv('MINILLM_PROCESS_ID', '3')
  assert distributed.requested() == {'coordinator_address': '10.0.0.1:29500', 'num_processes': 4, 'process_id': 3}
  assert distributed.requested(process_id=0)['process_id'] == 0  # the flag wins over the environment
  monkeypatch.delenv('MINILLM_PROCESS_ID')
  with pytest.raises(UserError, match='missing --process_id'):
    distributed.requested()
  with pytest.raises(UserError, match='must be in'):
    distributed.requested(process_id=4)
  with pytest.raises(UserError, match='HOST:PORT'):
    distributed.requested('10.0.0.1', 2, 0)
  for k in ('MINILLM_COORDINATOR', 'MINILLM_NUM_PROCESSES'):
    monkeypatch.delenv(k)
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert distributed.requested() is None  # a one-task SLURM job trains alone
  monkeypatch.setenv('SLURM_NTASKS', '8')
  assert distributed.requested() == {}  # JAX's SLURM detection fills in the rest
  monkeypatch.setenv('MINILLM_DISTRIBUTED', '0')
  assert distributed.requested() is None
  monkeypatch.delenv('SLURM_JOB_ID')
  monkeypatch.setenv('MINILLM_DISTRIBUTED', '1')
  assert distributed.requested() == {}
  monkeypatch.delenv('MINILLM_DISTRIBUTED')
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 't0,t1')
  assert distributed.requested() == {}


def test_gpu_peak_table():
  peak = monitor.gpu_peak_flops
  assert peak('NVIDIA H100 80GB HBM3', 'bfloat16') == 989e12
  assert peak('NVIDIA H100 PCIe', 'bfloat16') == 756e12
  assert peak('NVIDIA H200', 'float32') == 67e12
  assert peak('NVIDIA A100-SXM4-40GB', 'bfloat16') == peak('NVIDIA A100 80GB PCIe', 'bfloat16') == 312e12
  assert peak('NVIDIA A100-SXM4-80GB', 'float32') == 19.5e12
  assert peak('NVIDIA L40S', 'bfloat16') == 362e12 and peak('NVIDIA L40', 'bfloat16') == 181e12
  assert peak('NVIDIA L4', 'bfloat16') == 121e12
  assert peak('NVIDIA GeForce RTX 4090', 'bfloat16') == 165.2e12
  assert peak('NVIDIA GeForce RTX 3090', 'float32') == 35.6e12
  assert peak('NVIDIA A10G', 'bfloat16') == 125e12
  assert peak('Tesla V100-SXM2-16GB', 'float16') == 125e12 and peak('Tesla V100-PCIE-32GB', 'float16') == 112e12
  assert peak('Tesla T4', 'float32') == 8.1e12
  assert peak('NVIDIA A40', 'bfloat16') is None  # not in the table: MFU falls back to a measured peak


def test_global_batches_are_the_same_for_any_process_count(tmp_path):
  p = _synthetic(tmp_path, 4000)
  B, T = 8, 16
  one = data.train_iter(p, B, T, seed=0)
  halves = [data.train_iter(p, B, T, seed=0, process_index=i, process_count=2) for i in (0, 1)]
  quarters = [data.train_iter(p, B, T, seed=0, process_index=i, process_count=4) for i in range(4)]
  for _ in range(40):  # past the first epoch (248 windows / 8)
    want = next(one)['inputs']
    assert want.shape == (B, T)
    np.testing.assert_array_equal(np.concatenate([next(h)['inputs'] for h in halves]), want)
    np.testing.assert_array_equal(np.concatenate([next(q)['inputs'] for q in quarters]), want)
  state = json.loads(json.dumps(halves[1].get_state()))
  assert state == one.get_state() == quarters[3].get_state()  # one state for every process and count
  again = data.train_iter(p, B, T, seed=0, process_index=1, process_count=4)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)['inputs'], next(one)['inputs'][2:4])
  with pytest.raises(UserError, match='divisible by the 3 processes'):
    data.train_iter(p, B, T, seed=0, process_index=0, process_count=3)


# ------------------------------------------------------------------------------------- multi-process runs

def targs(tmp: str, workdir: str, **over) -> list[str]:
  """A shakespeare_char-shaped run, tiny: 1 layer of 64 wide (its MLP is big enough for FSDP to shard), one step
  per call (a kill lands between rows), checkpoints at 10 and 20."""
  base = {'data.corpus': 'shakespeare', 'data.cache_dir': os.path.join(tmp, 'cache'), 'model.n_layer': 1,
          'model.n_head': 2, 'model.d_model': 64, 'model.block_size': 32, 'train.batch_size': 8,
          'train.steps': 20, 'train.eval_every': 10, 'train.eval_batches': 2, 'train.ckpt_every': 10,
          'train.log_every': 1, 'train.steps_per_call': 1, 'optim.warmup_steps': 5, 'optim.lr': 3e-3,
          'train.peak_flops': 1e11, **over}
  return ['--config=configs/shakespeare_char.py', f'--workdir={os.path.join(tmp, workdir)}', '--nosample',
          *[f'--config.{k}={v}' for k, v in base.items()]]


def one_process(devices: int, argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', 'JAX_PLATFORMS': 'cpu'}
  for k in ('MINILLM_COORDINATOR', 'MINILLM_NUM_PROCESSES', 'MINILLM_PROCESS_ID'):
    env.pop(k, None)
  r = subprocess.run([sys.executable, '-m', 'minillm_jax.train', *argv], cwd=ROOT, env=env, check=False, capture_output=True,
                     text=True, timeout=timeout)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  return r


def local_sh(argv: list[str]) -> list[str]:
  return ['bash', os.path.join(LAUNCH, 'local.sh'), '-d', '2', '2', *argv]


def read(path: str) -> str:
  with open(path) as f:
    return f.read()


def rows(tmp: str, workdir: str) -> list[dict]:
  with open(os.path.join(tmp, workdir, 'metrics.jsonl')) as f:
    return [json.loads(ln) for ln in f]


def losses(tmp: str, workdir: str) -> dict[int, float]:
  return {r['step']: r['train_loss'] for r in rows(tmp, workdir) if 'train_loss' in r}


STEPS_K = 200  # the killed run's length


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """'one': 1 process x 4 devices, 'two': launch/local.sh 2 (2 processes x 2 devices), both 20 steps."""
  tmp = str(tmp_path_factory.mktemp('dist'))
  one_process(4, targs(tmp, 'one'))
  r = subprocess.run(local_sh(targs(tmp, 'two')), cwd=ROOT, env=ENV, check=False, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return tmp, r


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
  tmp, r = runs
  one, two = losses(tmp, 'one'), losses(tmp, 'two')
  assert sorted(two) == list(range(1, 21))  # every step's row once: one writer
  # the same global batches and updates; only the all-reduce's summation order differs (gloo's ring across the
  # two processes vs XLA:CPU's in-process reduction), so float32 rounding: measured at most 1 ulp
  for s in one:
    assert two[s] == pytest.approx(one[s], rel=1e-6, abs=0), s
  vals = [(x['val_loss'], y['val_loss']) for x, y in zip(rows(tmp, 'one'), rows(tmp, 'two')) if 'val_loss' in x]
  assert len(vals) == 2 and all(b == pytest.approx(a, rel=1e-6) for a, b in vals)
  out = r.stdout + r.stderr
  assert '[0] distributed: process 0 of 2' in out and '2 local / 4 global cpu devices' in out
  assert '[1] distributed: process 1 of 2' in out and '[launch] all 2 processes finished' in out
  # process 0 alone prints the evaluations and writes the run's files
  assert re.search(r'^\[0\] step 20: train loss', out, re.MULTILINE) and not re.search(r'^\[1\] step', out, re.MULTILINE)
  pid0 = int(re.search(r'\[launch\] process 0: pid (\d+)', out)[1])
  with open(os.path.join(tmp, 'two', 'run.json')) as f:
    run = json.load(f)
  assert run['pid'] == pid0 and run['status'] == 'finished'
  assert len(glob.glob(os.path.join(tmp, 'two', 'tb', 'events.*'))) == 1
  # the data iterator's state: one file per process (grain), the same state in both
  d = os.path.join(tmp, 'two', 'checkpoints', '20', 'data')
  states = [read(os.path.join(d, f'process_{i}-of-2.json')) for i in (0, 1)]
  assert states[0] == states[1]


@pytest.mark.slow
def test_killed_process_stops_the_others_and_the_run_resumes_exactly(runs):
  """200 steps, so that the kill lands mid-run however long Orbax takes to commit checkpoint 10 (a 20-step run
  finished before its commit on a slow CI host); the resume starts from the newest committed checkpoint."""
  tmp, _ = runs
  over = {'train.steps': STEPS_K}
  argv, log = targs(tmp, 'killed', **over), os.path.join(tmp, 'killed.log')
  with open(log, 'w') as out:
    p = subprocess.Popen(local_sh(argv), cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
  try:
    path, deadline = os.path.join(tmp, 'killed', 'metrics.jsonl'), time.time() + 240
    ck10 = os.path.join(tmp, 'killed', 'checkpoints', '10')  # renamed there once every process committed it
    while not (os.path.isdir(ck10) and os.path.exists(path) and max(losses(tmp, 'killed'), default=0) >= 11):
      assert p.poll() is None and time.time() < deadline, read(log)[-3000:]
      time.sleep(0.05)
    pid1 = int(re.search(r'\[launch\] process 1: pid (\d+)', read(log))[1])
    os.kill(pid1, signal.SIGKILL)
    t0 = time.time()
    rc = p.wait(timeout=90)
    took = time.time() - t0
  finally:
    if p.poll() is None:
      p.kill()
  text = read(log)
  assert rc == 128 + signal.SIGKILL and took < 60, (took, text[-3000:])
  assert f'[launch] process 1 (pid {pid1}) failed: exit status 137 (signal KILL)' in text
  # process 0: the coordination service's own reason, then the launcher's line
  assert 'Terminating process because the JAX distributed service detected fatal errors' in text, text[-3000:]
  assert re.search(r"\[launch\] process 0 \(pid \d+\) failed: exit status 134 \(signal ABRT\): JAX's "
                   'coordination service ended it because another process died', text), text[-3000:]
  died_at = max(losses(tmp, 'killed'))
  assert died_at < STEPS_K
  committed = max(int(n) for n in os.listdir(os.path.join(tmp, 'killed', 'checkpoints')) if n.isdigit())
  assert 10 <= committed <= died_at
  # the same command again: resumes from that checkpoint and makes the uninterrupted run's losses, bitwise
  r = subprocess.run(local_sh(argv), cwd=ROOT, env=ENV, check=False, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert f'[0] resuming from step {committed}' in r.stdout and f'[1] resuming from step {committed}' in r.stdout
  r = subprocess.run(local_sh(targs(tmp, 'whole', **over)), cwd=ROOT, env=ENV, check=False, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  got, want = losses(tmp, 'killed'), losses(tmp, 'whole')
  assert sorted(want) == list(range(1, STEPS_K + 1)) and got == want
  print(f'killed at step {died_at}, resumed from {committed}; peers exited {took:.1f} s after the SIGKILL')


@pytest.mark.slow
def test_resume_on_other_process_and_device_counts_and_shardings(runs):
  """Two chains from step 20 of the same data: 2 processes x 2 devices -> 1 process x 1 device (DP) -> 1 x 8
  (FSDP), and 1 x 4 -> 1 x 8 (FSDP) -> 1 x 1 (DP). Restored weights, optimizer state and data order are exact;
  the losses agree to float rounding (each topology sums its gradients in another order)."""
  tmp, _ = runs
  for src, dst in (('two', 'x'), ('one', 'y')):
    shutil.copytree(os.path.join(tmp, src), os.path.join(tmp, dst))
  for steps, (dx, fx), (dy, fy) in ((30, (1, False), (8, True)), (40, (8, True), (1, False))):
    for w, n, fsdp in (('x', dx, fx), ('y', dy, fy)):
      r = one_process(n, targs(tmp, w, **{'train.steps': steps, 'train.fsdp': fsdp}))
      assert f'resuming from step {steps - 10}' in r.stdout
  x, y = losses(tmp, 'x'), losses(tmp, 'y')
  assert sorted(x) == sorted(y) == list(range(1, 41))
  worst = max(abs(x[s] - y[s]) / y[s] for s in range(21, 41))
  assert worst < 1e-5, worst
  print(f'largest relative loss difference over steps 21-40: {worst:.2e}')


# ------------------------------------------------------------------------------- GPU (launch/gpu_check.sh)
# `pytest -m gpu` runs these; without a CUDA plugin installed they skip before asking JAX for a backend.
needs_gpu = pytest.mark.skipif(not any(importlib.util.find_spec(m) for m in ('jax_cuda12_plugin', 'jax_cuda13_plugin')),
                               reason='no CUDA plugin for JAX (pip install -e .[gpu])')


def _gpu_or_skip():
  import jax
  if jax.devices()[0].platform != 'gpu':
    pytest.skip(f'no GPU (jax runs on {jax.devices()[0].platform})')
  return jax


@pytest.mark.gpu
@needs_gpu
def test_gpu_mfu_is_against_the_datasheet_peak():
  jax = _gpu_or_skip()
  kind = jax.devices()[0].device_kind
  want = monitor.gpu_peak_flops(kind, 'bfloat16')
  if want is None:
    pytest.skip(f'{kind!r} is not in monitor.GPU_PEAK_TFLOPS')
  assert monitor.peak_flops('bfloat16') == (want * jax.device_count(), False)


@pytest.mark.gpu
@needs_gpu
def test_gpu_checkpoint_restores_on_a_cpu_only_machine(tmp_path):
  _gpu_or_skip()
  tmp = str(tmp_path)
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  r = subprocess.run([sys.executable, '-m', 'minillm_jax.train', *targs(tmp, 'g', **{'train.steps': 10})], cwd=ROOT,
                     env=env, check=False, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  code = ('import jax, numpy as np; from flax import nnx; from minillm_jax.training import checkpoint; '
          f'm = checkpoint.load_for_inference({os.path.join(tmp, "g")!r}, "latest")[1]; '
          'print(jax.devices()[0].platform, repr(sum(float(np.abs(np.asarray(x, np.float64)).sum()) '
          'for x in jax.tree.leaves(nnx.state(m, nnx.Param)))))')
  got = {}
  for platforms in ('', 'cpu'):  # the GPU machine as it is, and as a CPU-only one
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env={**env, 'JAX_PLATFORMS': platforms},
                       check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    platform, total = r.stdout.split()[-2:]
    got[platform] = total
  assert set(got) == {'gpu', 'cpu'} and got['gpu'] == got['cpu']


def test_process_0_holds_the_lock_and_the_others_hear_why_it_could_not(tmp_path):
  """A workdir locked by another run: process 0 is refused, and process 1, waiting for process 0 to take the
  lock, exits with process 0's reason instead of waiting on (no training starts: seconds)."""
  from filelock import FileLock
  tmp = str(tmp_path)
  os.makedirs(os.path.join(tmp, 'w'))
  with FileLock(os.path.join(tmp, 'w', '.lock')):
    r = subprocess.run(['bash', os.path.join(LAUNCH, 'local.sh'), '-d', '1', '2', *targs(tmp, 'w')], cwd=ROOT,
                       env=ENV, check=False, capture_output=True, text=True,
                       timeout=120)
  out = r.stdout + r.stderr
  assert r.returncode == 2, out[-3000:]
  refused = "is being trained by another process"
  assert re.search(rf'^\[0\] error: {re.escape(repr(os.path.join(tmp, "w")))} {refused}', out, re.MULTILINE), out
  assert re.search(rf'^\[1\] error: process 0: {re.escape(repr(os.path.join(tmp, "w")))} {refused}', out,
                   re.MULTILINE), out
  assert os.listdir(os.path.join(tmp, 'w')) == ['.lock']  # nothing written


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_after_the_same_step(tmp_path):
  tmp, log = str(tmp_path), os.path.join(str(tmp_path), 'term.log')
  with open(log, 'w') as out:
    p = subprocess.Popen(local_sh(targs(tmp, 'w', **{'train.steps_per_call': 2})), cwd=ROOT, env=ENV, stdout=out,
                         stderr=subprocess.STDOUT)
  try:
    path, deadline = os.path.join(tmp, 'w', 'metrics.jsonl'), time.time() + 240
    while not (os.path.exists(path) and max(losses(tmp, 'w'), default=0) >= 4):
      assert p.poll() is None and time.time() < deadline, read(log)[-3000:]
      time.sleep(0.05)
    os.kill(int(re.search(r'\[launch\] process 0: pid (\d+)', read(log))[1]), signal.SIGTERM)  # process 0 only
    rc = p.wait(timeout=90)
  finally:
    if p.poll() is None:
      p.kill()
  text = read(log)
  assert rc == 128 + signal.SIGTERM, text[-3000:]
  saved = int(re.search(r'^\[0\] SIGTERM: saved step (\d+)', text, re.MULTILINE)[1])
  assert 4 <= saved < 20 and saved % 2 == 0  # a call's end, agreed by both
  for i in (0, 1):
    assert re.search(rf'\[launch\] process {i} \(pid \d+\) failed: exit status 143 \(signal TERM\)', text), text
  assert os.path.isdir(os.path.join(tmp, 'w', 'checkpoints', str(saved)))
