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
  return {k: v for k, v in os.environ.items() if k not in ('MAKEFLAGS', 'MAKELEVEL', 'MFLAGS')}


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
  test = _pip_lines(_make(bare, 'test', f'PYTHON={fake}', 'VENV=.venv312').stdout)
  assert test == [".venv312/bin/python -m pip install --quiet  -c constraints/py312-test.txt -e '.[dev,blas,serve]'"]
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
