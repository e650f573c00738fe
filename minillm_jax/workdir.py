"""The run directory (`--workdir`): its file format and all reads and writes of it, in one place.

  config.json   the resolved config (config.py beside it loads it: a --config file for resuming with overrides)
  run.json      pid, host, status, heartbeat and the last metrics row
  .lock         file lock (filelock: flock on Unix) held by the training process
  metrics.jsonl one JSON row per log interval and per evaluation
  checkpoints/  Orbax steps (training.checkpoint reads and writes those)

WORKSPACE.md describes every file.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time

from filelock import FileLock, Timeout
from ml_collections import ConfigDict

from minillm_jax.config import UserError, from_plain, to_plain

_RUN_CONFIG_PY = '''"""This run's config: config.json beside this file. Use it to resume with overrides:
  python -m minillm_jax.train --config={path} --workdir={workdir} --config.train.steps=5000
"""
import os

from minillm_jax.config import no_variant
from minillm_jax.workdir import read_run_config


def get_config(variant: str = ''):
  no_variant(variant)
  return read_run_config(os.path.dirname(os.path.abspath(__file__)))
'''


def fault(site: str, path: str = '') -> None:
  """Test hook, off unless MINILLM_FAULT is set: MINILLM_FAULT=SITE:ERRNO[,SITE:ERRNO] raises OSError(ERRNO) at
  SITE (metrics, run_json, checkpoint, figure), so tests see a full or read-only disk without making one.
  E.g. MINILLM_FAULT=metrics:ENOSPC. Only tests set it."""
  spec = os.environ.get('MINILLM_FAULT')
  if not spec:
    return
  for item in spec.split(','):
    where, _, code = item.partition(':')
    if where == site:
      n = getattr(errno, code, errno.EIO)
      raise OSError(n, os.strerror(n), path or site)


def write_atomic(path: str, text: str) -> None:
  """Written beside `path`, then renamed over it: an interrupted write leaves the old file whole."""
  fault('run_json' if os.path.basename(path) == 'run.json' else 'write', path)
  tmp = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.tmp{os.getpid()}')
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:  # a full disk: no half-written temp file is left beside the old one
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def write_json(path: str, obj: dict) -> None:
  write_atomic(path, json.dumps(obj, indent=1))


# ------------------------------------------------------------------------------------------------ config

def write_run_config(workdir: str, cfg: ConfigDict) -> None:
  """<workdir>/config.json (the resolved config) and config.py (loads it: a --config file for overrides)."""
  os.makedirs(workdir, exist_ok=True)
  for name, text in (('config.json', json.dumps(to_plain(cfg), indent=1)),
                     ('config.py', _RUN_CONFIG_PY.format(path=os.path.join(workdir, 'config.py'), workdir=workdir))):
    write_atomic(os.path.join(workdir, name), text)


def read_run_config(workdir: str) -> ConfigDict:
  """<workdir>/config.json back as a validated config; UserError naming the file when it is unreadable."""
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as f:
      return from_plain(json.load(f))
  except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
    raise UserError(f'cannot read the run config {path} ({type(e).__name__}: {e})') from None


# ----------------------------------------------------------------------------------------- run.json, lock

def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def read_run(workdir: str) -> dict:
  try:
    with open(os.path.join(workdir, 'run.json')) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def update_run(workdir: str, **fields) -> None:
  """run.json with `fields` set over what it holds."""
  write_json(os.path.join(workdir, 'run.json'), {**read_run(workdir), **fields})


def run_alive(run: dict) -> bool:
  return (run.get('status') == 'running' and run.get('host') == socket.gethostname()
          and isinstance(run.get('pid'), int) and _pid_alive(run['pid']))


_LOCKS: dict[str, FileLock] = {}


def check_free(workdir: str) -> None:
  """One live run per workdir, from the start of `train` (not only from its claim): an flock on <workdir>/.lock,
  held until the process ends, and run.json's pid for a run on another host. Writes nothing else, so a run
  refused later (another model, no data) leaves the workdir as it was."""
  run = read_run(workdir)
  if run_alive(run) and run['pid'] != os.getpid():
    raise UserError(f'{workdir!r} is being trained by pid {run["pid"]}; stop it first or use another --workdir')
  key = os.path.realpath(workdir)
  if key in _LOCKS:
    return
  os.makedirs(workdir, exist_ok=True)
  lock = FileLock(os.path.join(workdir, '.lock'), timeout=0)  # flock on Unix, msvcrt on Windows
  try:
    lock.acquire()
  except Timeout:
    raise UserError(f'{workdir!r} is being trained by another process (pid {read_run(workdir).get("pid", "?")}); '
                    'stop it first or use another --workdir') from None
  _LOCKS[key] = lock


def release(workdir: str) -> None:
  lock = _LOCKS.pop(os.path.realpath(workdir), None)
  if lock is not None:
    lock.release()


def claim(workdir: str, cfg: ConfigDict) -> None:
  """Marks the run as running and writes its resolved config (config.json + config.py), once every check passed."""
  check_free(workdir)
  write_json(os.path.join(workdir, 'run.json'), {'pid': os.getpid(), 'host': socket.gethostname(),
                                                 'status': 'running', 'started': time.time()})
  write_run_config(workdir, cfg)


# ---------------------------------------------------------------------------------- metrics, checkpoints

_NUMERIC = ('train_loss', 'val_loss', 'lr', 'tokens_per_s', 'time')


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, 'metrics.jsonl')


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl's rows, without a row cut off by a kill or a full disk, or damaged bytes."""
  path = metrics_path(workdir)
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, encoding='utf-8', errors='replace') as f:
    for ln in f:
      try:
        row = json.loads(ln)
      except ValueError:
        continue
      if isinstance(row, dict) and isinstance(row.get('step'), int) and all(
          isinstance(row[k], (int, float)) for k in _NUMERIC if row.get(k) is not None):
        rows.append(row)
  return rows


def truncate_metrics(workdir: str, step: int) -> None:
  """Drops the rows past `step`: what a killed run wrote after its last checkpoint."""
  if os.path.exists(metrics_path(workdir)):
    write_atomic(metrics_path(workdir),
                 ''.join(json.dumps(r) + '\n' for r in read_metrics(workdir) if r['step'] <= step))


def append_metrics(workdir: str, row: dict) -> None:
  fault('metrics', metrics_path(workdir))
  with open(metrics_path(workdir), 'a') as f:
    f.write(json.dumps(row) + '\n')


def ckpt_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def finished_steps(workdir: str) -> list[int]:
  """Step directories under <workdir>/checkpoints that hold something: a killed save's
  <step>.orbax-checkpoint-tmp and an empty step directory are not checkpoints."""
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.listdir(os.path.join(d, n))) \
      if os.path.isdir(d) else []


def is_run_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, 'checkpoints'))


IMPORTED = 'imported.json'  # written by torch_compat.import_ckpt: the weights came from a file, not from training


def mark_imported(workdir: str, info: dict) -> None:
  write_json(os.path.join(workdir, IMPORTED), info)


def own_run(path: str) -> bool:
  """A run directory trained here from scratch: not an import of someone else's weights (evaluate executes
  generated code only from such runs unless --execute)."""
  return is_run_dir(path) and not os.path.exists(os.path.join(path, IMPORTED))
