"""Multi-process training on JAX's own multi-controller runtime (`jax.distributed`).

When it starts (`start`, before anything asks JAX for a backend):
  1. `--coordinator=HOST:PORT --num_processes=N --process_id=I` (train's flags), or the same in the environment
     as MINILLM_COORDINATOR, MINILLM_NUM_PROCESSES, MINILLM_PROCESS_ID: explicit, any machine;
  2. else SLURM (SLURM_JOB_ID set and more than one task) or a multi-host TPU VM (TPU_WORKER_HOSTNAMES naming
     several hosts), or MINILLM_DISTRIBUTED=1: `jax.distributed.initialize()` detects the cluster itself;
  3. else one process, as before. MINILLM_DISTRIBUTED=0 turns 2 off.
Timeouts (seconds, environment): MINILLM_INIT_TIMEOUT (peers must all connect within it, default 300),
MINILLM_HEARTBEAT_TIMEOUT (a process silent that long is dead and the others stop, default 20).

Roles once joined: process 0 holds the workdir lock and alone writes run.json, config, metrics, TensorBoard,
plots and samples (`primary()`); the others wait for it to take the lock (`wait_for_lock`), train their rows of
every batch, and save and restore checkpoints collectively with it (Orbax).

A process that dies: JAX's coordination service notices the missing heartbeats and ends every other process
(SIGABRT, after its own log line "Terminating process because the JAX distributed service detected fatal
errors"); launch/local.sh and launch/slurm.sbatch then say which process died first.
"""
from __future__ import annotations

import faulthandler
import os
import socket

import jax

from minillm_jax.config import UserError

_MSG_BYTES = 1024  # process 0's lock outcome, broadcast to the others


def _env_int(name: str, default: int | None) -> int | None:
  v = os.environ.get(name, '')
  if v == '':
    return default
  try:
    return int(v)
  except ValueError:
    raise UserError(f'{name}={v!r} must be an integer') from None


def requested(coordinator: str | None = None, num_processes: int | None = None,
              process_id: int | None = None) -> dict | None:
  """The jax.distributed.initialize arguments the flags and environment ask for; None for one process."""
  coordinator = coordinator or os.environ.get('MINILLM_COORDINATOR') or None
  n = num_processes if num_processes is not None else _env_int('MINILLM_NUM_PROCESSES', None)
  i = process_id if process_id is not None else _env_int('MINILLM_PROCESS_ID', None)
  if coordinator or n is not None or i is not None:
    missing = [k for k, v in (('--coordinator', coordinator), ('--num_processes', n), ('--process_id', i))
               if v is None]
    if missing:
      raise UserError(f'multi-process training needs --coordinator=HOST:PORT, --num_processes and --process_id '
                      f'together (or MINILLM_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID); missing {", ".join(missing)}')
    if ':' not in coordinator or not coordinator.rsplit(':', 1)[1].isdigit():
      raise UserError(f'--coordinator={coordinator!r} must be HOST:PORT, e.g. 10.0.0.1:29500')
    if n < 1 or not 0 <= i < n:
      raise UserError(f'--process_id={i} must be in [0, --num_processes={n})')
    return {'coordinator_address': coordinator, 'num_processes': n, 'process_id': i} if n > 1 else None
  flag = os.environ.get('MINILLM_DISTRIBUTED', '')
  if flag == '0':
    return None
  slurm = os.environ.get('SLURM_JOB_ID') and max(_env_int('SLURM_NTASKS', 1), _env_int('SLURM_STEP_NUM_TASKS', 1)) > 1
  tpu = ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return {} if flag == '1' or slurm or tpu else None  # {}: JAX's own cluster detection


def start(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Joins the processes of a multi-process run when asked to (see the module docstring) and prints one line
  saying what it joined. Returns whether it did."""
  args = requested(coordinator, num_processes, process_id)
  if args is None:
    return False
  timeouts = {'initialization_timeout': _env_int('MINILLM_INIT_TIMEOUT', 300),
              'heartbeat_timeout_seconds': _env_int('MINILLM_HEARTBEAT_TIMEOUT', 20)}
  # a process that reached the end waits this long for the others at the shutdown barrier
  timeouts['shutdown_timeout_seconds'] = max(60, timeouts['heartbeat_timeout_seconds'])
  try:
    jax.distributed.initialize(**args, **timeouts)
  except (ValueError, RuntimeError) as e:
    raise UserError(f'jax.distributed.initialize failed ({" ".join(str(e).split())[:200]}); check the '
                    'coordinator address, process count and id') from None
  # A dead peer ends this process by SIGABRT from the coordination service, after its own one-line reason; the
  # Python fault handler would add every thread's stack to it, which says nothing more
  faulthandler.disable()
  print(f'distributed: process {jax.process_index()} of {jax.process_count()} on {socket.gethostname()}, '
        f'{jax.local_device_count()} local / {jax.device_count()} global {jax.devices()[0].platform} devices'
        + (f', coordinator {args["coordinator_address"]}' if args.get('coordinator_address') else ''), flush=True)
  return True


def primary() -> bool:
  """Whether this process writes the run's files (process 0; the only one of a single-process run)."""
  return jax.process_index() == 0


def _broadcast_text(text: str | None) -> str:
  """Process 0's `text` on every process: a collective (every process calls it), through the public
  multihost_utils (a process that never arrives ends the others by the heartbeat timeout)."""
  import numpy as np
  from jax.experimental import multihost_utils
  buf = np.zeros(_MSG_BYTES, np.uint8)
  if primary():
    raw = (text or '').encode()[:_MSG_BYTES]
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return bytes(out).rstrip(b'\0').decode(errors='replace')


def announce_lock(error: str | None) -> None:
  """Process 0, after trying the workdir lock: tells the others whether it holds it (`error`: why not)."""
  if jax.process_count() > 1:
    _broadcast_text(error or 'ok')


def wait_for_lock(workdir: str) -> None:
  """The other processes: wait until process 0 has tried the workdir lock; raise its error when it could not
  take it."""
  got = _broadcast_text(None)
  if got != 'ok':
    raise UserError(f'process 0: {got}' if got else f'process 0 could not take the lock of {workdir!r}')


def take_lock(workdir: str) -> None:
  """The workdir lock (workdir.check_free) on process 0; the other processes wait until it holds it."""
  from minillm_jax import workdir as wd
  if not primary():
    wait_for_lock(workdir)
    return
  try:
    wd.check_free(workdir)
  except UserError as e:
    announce_lock(str(e))
    raise
  announce_lock(None)
