"""How the project installs: what `make run` and `make test` put in the venv (checked with make's dry run; the
slow test builds the run's venv for real and trains in it without torch), make clean, the interpreter check."""
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT


def _env() -> dict:
  # under `make test` the environment carries the outer make's MAKEFLAGS/MAKELEVEL (directory messages, -n ...)
  # and its command-line variables (the 3.12 lane's PYTHON=... VENV=...), which would pick the outer lane
  return {k: v for k, v in os.environ.items() if k not in ('MAKEFLAGS', 'MAKELEVEL', 'MFLAGS', 'PYTHON', 'VENV')}


def _make(tmp, *target) -> subprocess.CompletedProcess:
  return subprocess.run(['make', '--no-print-directory', '-n', *target], cwd=tmp, capture_output=True, text=True,
                        check=False, env=_env())


@pytest.fixture
def bare(tmp_path):
  """The Makefile, pyproject.toml and the lock files in a directory without a venv: what a fresh clone's make sees."""
  for f in ('Makefile', 'pyproject.toml'):
    shutil.copy(os.path.join(ROOT, f), tmp_path / f)
  shutil.copytree(os.path.join(ROOT, 'constraints'), tmp_path / 'constraints')
  return tmp_path


def _pip_lines(out: str) -> list[str]:
  return [ln for ln in out.splitlines() if 'pip install' in ln]


def test_make_run_installs_no_torch_and_make_test_does(bare):
  run = _pip_lines(_make(bare, 'run').stdout)
  assert run == [".venv/bin/python -m pip install --quiet -c constraints/py311-run.txt -e '.[blas]'"]
  test = _pip_lines(_make(bare, 'test').stdout)
  assert test == [".venv/bin/python -m pip install --quiet  -c constraints/py311-test.txt -e '.[torch,dev,blas,serve]'"]
  cpu = _pip_lines(_make(bare, 'test', 'TORCH_CPU=1').stdout)
  assert '--extra-index-url https://download.pytorch.org/whl/cpu' in cpu[0]


def test_the_312_lane_takes_its_own_lock_and_no_torch(bare):
  """The lane follows the interpreter: Python 3.12 installs from the py312 locks, and `make test` there leaves
  torch out (PyPI's torch for 3.12 on Linux is a multi-GB CUDA download)."""
  fake = bare / 'python3.12'  # answers the Makefile's version probe as a 3.12 would
  fake.write_text('#!/bin/sh\necho 312\n')
  fake.chmod(0o755)
  out = _make(bare, 'test', f'PYTHON={fake}', 'VENV=.venv312').stdout
  assert _pip_lines(out) == [
      ".venv312/bin/python -m pip install --quiet  -c constraints/py312-test.txt -e '.[dev,blas,serve]'"]
  pytest_line = next(ln for ln in out.splitlines() if ' -m pytest ' in ln)  # the tests that need torch stay out
  assert '--deselect=tests/test_train.py::test_imported_weights_continue_training' in pytest_line
  assert '--deselect' not in next(ln for ln in _make(bare, 'test').stdout.splitlines() if ' -m pytest ' in ln)
  run = _pip_lines(_make(bare, 'run', f'PYTHON={fake}', 'VENV=.venv312').stdout)
  assert run == [".venv312/bin/python -m pip install --quiet -c constraints/py312-run.txt -e '.[blas]'"]


def test_the_locks_pin_every_package_the_extras_need():
  """Each lock pins one exact version of everything (a package the lock misses would float): for the run's
  install, the package's own pins are among them; the test lock has torch and never a CUDA package."""
  def pins(name):
    with open(os.path.join(ROOT, 'constraints', name)) as f:
      lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith('#')]
    assert all('==' in ln for ln in lines), [ln for ln in lines if '==' not in ln]
    return dict(ln.split('==', 1) for ln in lines)
  run, test = pins('py311-run.txt'), pins('py311-test.txt')
  assert run['jax'] == '0.10.2' and run['flax'] == '0.12.8' and 'torch' not in run
  assert test['torch'].startswith('2.13.0') and not any(k.startswith('nvidia') for k in test)
  assert {k: v for k, v in run.items() if k in test} == {k: test[k] for k in run if k in test}
  run, test = pins('py312-run.txt'), pins('py312-test.txt')  # the 3.12 lane: jax 0.11.x, the line jax-mps needs
  assert run['jax'] == run['jaxlib'] == '0.11.1' and run['flax'] == '0.12.12' and 'torch' not in test
  assert not any(k.startswith('nvidia') for k in test)
  assert {k: v for k, v in run.items() if k in test} == {k: test[k] for k in run if k in test}


def test_every_package_folder_ships_in_the_wheel():
  """pyproject.toml lists the packages (the presets' mapping needs a list): a new package folder missing from it
  would be left out of wheels and fail only after a pip install."""
  import tomllib
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    st = tomllib.load(f)['tool']['setuptools']
  found = {os.path.relpath(d, ROOT).replace(os.sep, '.') for top in ('minillm_jax', 'torch_compat')
           for d, _, files in os.walk(os.path.join(ROOT, top)) if '__init__.py' in files}
  assert found | {'minillm_jax.presets'} == set(st['packages'])
  assert st['package-dir'] == {'minillm_jax.presets': 'configs'}


def test_make_clean_keeps_runs(bare):
  out = _make(bare, 'clean').stdout
  assert out.startswith('rm -rf') and ' runs' not in out.split('#')[0] and '.venv' in out


def test_a_wrong_interpreter_is_one_line(bare):
  old = bare / 'python3.9'  # what macOS's python3 is: too old for these pins
  old.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "Python 3.9.6"; exit 0; }\nexit 1\n')
  old.chmod(0o755)
  r = subprocess.run(['make', '--no-print-directory', 'setup', f'PYTHON={old}'], cwd=bare, capture_output=True,
                     text=True, check=False, env=_env())
  assert r.returncode == 2 and r.stderr.splitlines()[0] == (
      f'error: {old} is Python 3.9.6; this project needs Python 3.11 or 3.12 (make PYTHON=python3.11 ...)'), r.stderr
  assert not (bare / '.venv').exists()


@pytest.mark.slow
def test_the_run_install_trains_without_torch(tmp_path):
  """pip install -e '.[blas]' into a fresh venv (what make run does), then a few training steps in it."""
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  py = str(venv / 'bin' / 'python')
  r = subprocess.run([py, '-m', 'pip', 'install', '--quiet', '-e', f'{ROOT}[blas]'], capture_output=True, text=True,
                     check=False, timeout=1800)
  assert r.returncode == 0, r.stderr[-2000:]
  assert subprocess.run([py, '-c', 'import torch'], capture_output=True, check=False).returncode != 0
  r = subprocess.run([py, '-m', 'minillm_jax.train', '--config=configs/shakespeare_char.py',
                      f'--workdir={tmp_path}/run', '--config.train.steps=4', '--config.train.eval_every=2',
                      '--config.train.ckpt_every=2', '--config.train.eval_batches=1', f'--config.data.cache_dir={tmp_path}/c'],
                     cwd=ROOT, capture_output=True, text=True, check=False, timeout=900,
                     env={**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'})
  assert r.returncode == 0 and 'done: 4 steps' in r.stdout, r.stderr[-2000:]


def _wheel_venv(tmp_path) -> tuple[str, str]:
  """Builds the wheel from a copy of the checkout (build/ and *.egg-info land in the copy, not in the tree others
  work in) and installs it with --no-deps into a fresh venv whose dependencies are this interpreter's
  site-packages, through a .pth line: no network, seconds instead of a full install. The wheel's own files come
  first on sys.path, and the .pth files of the borrowed folder (this checkout's editable install) are not run."""
  def skip(folder, names):
    top = {'.git', 'runs', 'data', 'build', 'dist', 'bench_out', 'tests', '.lock-venv'} if folder == ROOT else set()
    return [n for n in names if n in top or n.startswith('.venv') or n == '__pycache__' or n.endswith('.egg-info')]
  src = tmp_path / 'src'
  shutil.copytree(ROOT, src, ignore=skip)
  import setuptools  # pyproject.toml's build requirement, when this venv has it: the build needs no index then
  isolation = [] if int(setuptools.__version__.split('.')[0]) >= 68 else ['--use-pep517']
  pip = [sys.executable, '-m', 'pip']
  r = subprocess.run([*pip, 'wheel', '--no-deps', *(isolation or ['--no-build-isolation']), '-q', '-w',
                      str(tmp_path / 'dist'), str(src)], capture_output=True, text=True, check=False, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  (wheel,) = (tmp_path / 'dist').glob('minillm_jax-*.whl')
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
  py = str(venv / 'bin' / 'python')
  site = subprocess.run([py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], capture_output=True,
                        text=True, check=True).stdout.strip()
  import sysconfig
  deps = {sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']}
  with open(os.path.join(site, '_minillm_test_deps.pth'), 'w') as f:
    f.write('\n'.join(sorted(deps)) + '\n')
  r = subprocess.run([*pip, '--python', py, 'install', '--no-deps', '--no-index', '-q', str(wheel)],
                     capture_output=True, text=True, check=False, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  return py, str(venv / 'bin' / 'minillm')


@pytest.mark.slow
def test_the_wheel_trains_a_preset_by_name_generates_and_exports(tmp_path):
  """pip install of the wheel (not editable), then from a scratch directory: train shakespeare_char by its preset
  name, generate, export a .pt, all through the minillm console script. The embedded corpus, the presets and the
  C++ kernel sources must come from the installed package: the checkout is nowhere on the path."""
  pytest.importorskip('torch')  # export writes a torch file
  py, minillm = _wheel_venv(tmp_path)
  scratch, home = tmp_path / 'scratch', tmp_path / 'home'
  scratch.mkdir()
  env = {**_env(), 'HOME': str(home), 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
  env.pop('XDG_CACHE_HOME', None)
  env.pop('PYTHONPATH', None)

  def run(*args, timeout=900):
    return subprocess.run(list(args), cwd=scratch, capture_output=True, text=True, check=False, timeout=timeout,
                          env=env)

  r = run(py, '-c', 'import minillm_jax, os; print(os.path.dirname(minillm_jax.__file__))')
  assert r.stdout.strip().startswith(str(tmp_path / 'venv')), r.stdout + r.stderr
  r = run(minillm, 'train', '--help')
  assert r.returncode == 0 and '--config' in r.stdout and '--workdir' in r.stdout, r.stderr[-2000:]
  r = run(minillm, 'train', '--config=shakespeare_char', '--workdir=run', '--config.train.steps=4',
          '--config.train.eval_every=2', '--config.train.ckpt_every=2', '--config.train.eval_batches=1')
  assert r.returncode == 0 and 'done: 4 steps' in r.stdout, r.stdout[-1000:] + r.stderr[-2000:]
  cache = home / '.cache' / 'minillm_jax'
  assert any((cache / 'tokens').glob('shakespeare-char-*/train.bin'))  # a non-checkout install caches in ~/.cache
  if shutil.which('g++') or shutil.which('c++'):  # the tests turn the kernels on: built from the installed sources
    assert any(cache.glob('cpu_attention-*.so')), sorted(p.name for p in cache.iterdir())
  r = run(minillm, 'generate', '--workdir=run', '--max_new_tokens=16', '--seed=0', '--prompt=ROMEO:')
  assert r.returncode == 0 and 'ROMEO:' in r.stdout, r.stderr[-2000:]
  r = run(minillm, 'export', '--workdir=run', '--out=model.pt')
  assert r.returncode == 0 and 'step 4' in r.stdout, r.stderr[-2000:]
  import torch
  assert torch.load(scratch / 'model.pt', map_location='cpu', weights_only=False)
