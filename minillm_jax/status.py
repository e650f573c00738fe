"""`python -m minillm_jax.status --workdir=runs/x [--watch=10]`: config summary, progress, losses, checkpoints, ETA,
liveness; --watch refreshes until the run ends."""
from __future__ import annotations

import json
import os
import sys
import time

from absl import flags

from minillm_jax import cli
from minillm_jax import config as config_lib
from minillm_jax import workdir as wd
from minillm_jax.config import UserError


def summarize(workdir: str) -> dict:
  if not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir!r} ' + ('is a file, not a run directory' if os.path.exists(workdir)
                                              else 'does not exist'))
  cfg_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(cfg_path):
    raise UserError(f'{workdir!r} is not a run directory (no config.json)')
  cfg = config_lib.to_plain(wd.read_run_config(workdir))
  rows, run = wd.read_metrics(workdir), wd.read_run(workdir)
  train = [r for r in rows if 'train_loss' in r]
  val = [r for r in rows if 'val_loss' in r]
  ckpts = wd.finished_steps(workdir)
  step, steps = (train[-1]['step'] if train else 0), cfg['train']['steps']
  speeds = [r['tokens_per_s'] for r in train[-20:] if r.get('tokens_per_s')]
  tps = sum(speeds) / len(speeds) if speeds else None
  a = cfg['optim']['accum_steps'] * cfg['train']['batch_size'] * cfg['model']['block_size']
  alive = wd.run_alive(run)
  best = min(val, key=lambda r: r['val_loss']) if val else None
  return {
      'workdir': os.path.abspath(workdir), 'alive': alive,
      'status': ('running' if alive else ('dead (killed or crashed)' if run.get('status') == 'running'
                                          else run.get('status', 'unknown'))),
      'pid': run.get('pid'), 'heartbeat_age_s': time.time() - run['heartbeat'] if 'heartbeat' in run else None,
      'model': cfg['model'], 'data': {k: cfg['data'][k] for k in ('corpus', 'format', 'tokenizer', 'vocab_size')},
      'step': step, 'steps': steps, 'progress': step / steps if steps else 0.0,
      'last_train_loss': train[-1]['train_loss'] if train else None,
      'last_val_loss': val[-1]['val_loss'] if val else None,
      'best_val_loss': best['val_loss'] if best else None, 'best_step': best['step'] if best else None,
      'tokens_per_s': tps, 'eta_s': (steps - step) * a / tps if tps and alive else None,
      'checkpoints': ckpts, 'elapsed_s': train[-1]['time'] if train else None,
  }


def format_summary(s: dict) -> str:
  m = s['model']
  f = lambda v, fmt='.4f': '-' if v is None else format(v, fmt)
  lines = [
      f'run        {s["workdir"]}',
      f'status     {s["status"]}' + (f' (pid {s["pid"]}, heartbeat {s["heartbeat_age_s"]:.0f}s ago)'
                                    if s['alive'] and s['heartbeat_age_s'] is not None else ''),
      (f'model      {m["n_layer"]} layers, d_model {m["d_model"]}, {m["n_head"]} heads, block {m["block_size"]}, '
       f'pos {m["pos"]}, norm {m["norm"]}, mlp {m["mlp"]}, dtype {m["dtype"]}'),
      f'data       {s["data"]["corpus"]}, tokenizer {s["data"]["tokenizer"]}'
      + (', chat: losses over the assistant tokens' if s['data']['format'] == 'chat' else ''),
      f'progress   step {s["step"]}/{s["steps"]} ({100 * s["progress"]:.1f}%)',
      (f'loss       train {f(s["last_train_loss"])}, val {f(s["last_val_loss"])}, best val '
       f'{f(s["best_val_loss"])} at step {s["best_step"] if s["best_step"] is not None else "-"}'),
      f'speed      {f(s["tokens_per_s"], ",.0f")} tokens/s' + (f', ETA {s["eta_s"] / 60:.1f} min'
                                                              if s['eta_s'] is not None else ''),
      f'checkpoints {", ".join(map(str, s["checkpoints"])) or "none"}',
  ]
  return '\n'.join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  if f.watch < 0:
    raise UserError(f'--watch={f.watch} must be >= 0 (seconds between refreshes; 0 = print once)')
  tty = sys.stdout.isatty()
  while True:
    ss = [summarize(w) for w in f.workdir]
    out = (json.dumps(ss[0] if len(ss) == 1 else ss, indent=1) if f.json
           else '\n\n'.join(format_summary(s) for s in ss))
    if f.watch and tty:
      out = '\x1b[H\x1b[2J' + out  # redraw in place
    print(out, flush=True)
    if not f.watch or not any(s['alive'] for s in ss):  # until every run has ended
      return
    if not tty:
      print(flush=True)
    time.sleep(f.watch)


if __name__ == '__main__':
  flags.DEFINE_multi_string('workdir', None, 'Run directory (repeat the flag for several runs).', required=True)
  flags.DEFINE_bool('json', False, 'Print the summary as JSON (a list for several runs).')
  flags.DEFINE_float('watch', 0, 'Refresh every this many seconds until every run has ended (0 = print once).')
  cli.run(main)
