"""Training: `python -m minillm_jax.train --config=configs/tiny.py [--config.optim.lr=...] --workdir=runs/tiny`.

Several processes (one per host or GPU) train one run when started with --coordinator, --num_processes and
--process_id, or under SLURM or on a multi-host TPU VM (minillm_jax.training.distributed; launch/ starts them).

Re-running the same command resumes from the workdir's latest good checkpoint (bitwise identical losses on
the same device count). The step is minillm_jax.training.step, the loop minillm_jax.training.loop.
"""
from __future__ import annotations

import os
import signal
import sys

import jax
from absl import flags

from minillm_jax import cli, parallel
from minillm_jax import config as config_lib
from minillm_jax.config import UserError
from minillm_jax.inference import load
from minillm_jax.model import param_counts
from minillm_jax.training import distributed, loop


def bf16_hint(dtype: str) -> str | None:
  """A float32 run on a CPU that multiplies bfloat16 in hardware (AMX) is leaving speed behind: say so."""
  if dtype == 'float32' and jax.default_backend() == 'cpu' and 'amx_bf16' in parallel.cpu_flags():
    return ('this CPU has AMX bfloat16 units: --config.model.dtype=bfloat16 (float32 weights and optimizer, '
            'bfloat16 matmuls) is the faster path on such CPUs (BENCHMARKS.md, "bfloat16 compute on CPU")')
  return None


def main(argv):
  del argv
  F = flags.FLAGS
  cfg = cli.config() if F['config'].present or F['config'].value is not None else None
  if os.path.exists(F.workdir) and not os.path.isdir(F.workdir):
    raise UserError(f'--workdir={F.workdir!r} is a file, not a directory')
  cfg = loop.load_run_config(F.workdir, cfg)
  weights = param_counts(config_lib.model_config(cfg, 2 ** 16))['total']  # before the tokenizer: vocab bound
  n = parallel.cpu_device_count(cfg.train.cpu_devices, cfg.train.batch_size, weights)
  if parallel.use_cpu_devices(n):
    print(f'CPU: {n} devices, data parallel (train.cpu_devices=1 for a single device)', flush=True)
  # before anything asks JAX for its backend: the backend of a multi-process run is made by joining the others
  distributed.start(F.coordinator, F.num_processes, F.process_id)
  # after use_cpu_devices: asking jax for its backend before it would fix the device count at one
  loop.check_memory(cfg, weights, n if jax.default_backend() == 'cpu' else jax.device_count())
  if hint := bf16_hint(cfg.model.dtype):
    print(hint, flush=True)
  summary = loop.run(cfg, F.workdir)
  if summary['signal']:  # saved, but not finished: `train && export` must not go on (130 Ctrl-C, 143 SIGTERM)
    sys.exit(128 + signal.Signals[summary['signal']])
  if summary['status'] == 'finished' and F.sample:
    load.print_sample(F.workdir)  # every process restores (Orbax is collective); process 0 prints and writes


if __name__ == '__main__':
  cli.define_config(default=None)
  cli.define_workdir()
  flags.DEFINE_bool('sample', True, 'Print a sample from the best checkpoint when training finishes.')
  flags.DEFINE_string('coordinator', None, 'Multi-process training: HOST:PORT of process 0 (with --num_processes '
                      'and --process_id; env MINILLM_COORDINATOR). SLURM and TPU VMs need none of the three.')
  flags.DEFINE_integer('num_processes', None, 'Multi-process training: how many processes (env '
                       'MINILLM_NUM_PROCESSES).')
  flags.DEFINE_integer('process_id', None, 'Multi-process training: this process, 0 .. num_processes-1 (env '
                       'MINILLM_PROCESS_ID).')
  cli.run(main)
