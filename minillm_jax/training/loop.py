"""The training loop: `open_run` sets a run up (config, resume or fine-tune source, data, state, checkpointer,
monitor); `loop` trains it to the end, a signal, early stopping or a non-finite loss; `run` does both.

Re-running the same command resumes from the workdir's latest good checkpoint (bitwise identical losses on
the same device count).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from minillm_jax import cli, parallel
from minillm_jax import config as config_lib
from minillm_jax import workdir as wd
from minillm_jax.config import ModelConfig, UserError
from minillm_jax.data import pipeline, prepare
from minillm_jax.data.tokenizer import Tok
from minillm_jax.model import flops_per_token, init_model
from minillm_jax.training import checkpoint, distributed, monitor
from minillm_jax.training.preflight import available_memory, check_memory  # noqa: F401 - loop.check_memory
from minillm_jax.training.step import (
  compiler_options,
  eval_loss,
  flat_dp_mesh,
  make_optimizer,
  steps_per_call,
  train_steps,
)


class Stop:
  """SIGTERM/SIGINT: finish the current call (train.steps_per_call steps), save, exit 128 + the signal (143, 130).
  A second signal exits at once.

  Several processes must stop after the same call, or their collectives would wait for each other forever:
  there SIGTERM is left to JAX's preemption sync manager (jax.distributed installs its handler), SIGINT is
  turned into a SIGTERM, and `agreed(first, last)` (every call's steps, on every process) says when all have
  reached the call after which they save and stop together. The ids are the training steps, one by one: the
  ones Orbax also reports to the manager when it saves."""

  def __init__(self):
    self.reason = None
    self.synced = jax.process_count() > 1
    signal.signal(signal.SIGINT, self._handle)
    if not self.synced:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    if self.synced:
      os.kill(os.getpid(), signal.SIGTERM)
      return
    if self.reason is not None:
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
    self.reason = signal.Signals(signum).name

  def agreed(self, first: int, last: int) -> None:
    if not self.synced or self.reason is not None:
      return
    hit = False
    for s in range(first, last + 1):  # every step reported (no short cut): the manager counts them
      hit = multihost_utils.reached_preemption_sync_point(s) or hit
    if hit:
      self.reason = 'SIGTERM'


# ------------------------------------------------------------------------------------------------- checks

def load_run_config(workdir: str, cfg):
  """--config if given, else the workdir's config.json (so `train --workdir=W` resumes as it was)."""
  path = os.path.join(workdir, 'config.json')
  if cfg is None:
    if not os.path.exists(path):
      raise UserError(f'no --config given and {path} does not exist; pass --config=configs/<name>.py')
    try:
      return wd.read_run_config(workdir)
    except UserError as e:
      raise UserError(f'{e}; pass --config=<the file it was trained with> to resume') from None
  return cfg


def check_same_tokenizer(meta: dict, tok_json: str, where: str, data=None):
  if meta.get('tokenizer') and Tok.from_json_str(meta['tokenizer']).hash != Tok.from_json_str(tok_json).hash:
    old = (meta.get('config') or {}).get('data') or {}  # name a data change: the usual cause of a new tokenizer
    diff = [f'data.{k}: checkpoint {old[k]!r} vs config {data[k]!r}' for k in ('corpus', 'path', 'tokenizer',
            'vocab_size') if data is not None and k in old and old[k] != data[k]]
    raise UserError(f'{where} was trained with another tokenizer than data.tokenizer gives now'
                    f'{" (" + "; ".join(diff) + ")" if diff else ""}; resume with the run\'s data settings, set '
                    f'--config.data.tokenizer=<the run\'s tokenizer.json>, or use a new --workdir')


def check_same_model(old: dict, new: ModelConfig, where: str, fine_tune: bool = False):
  """Refuses another architecture. Fine-tuning may change block_size (and with RoPE max_positions: no weights
  depend on it); fit_positions has then given a learned-position model its source's table size."""
  free = ('dropout', 'dtype', 'remat') + (('block_size', 'max_positions') if fine_tune and new.pos == 'rope' else
                                 ('block_size',) if fine_tune else ())
  diff = [f'{k}: checkpoint {old[k]!r} vs config {v!r}' for k, v in new.to_dict().items()
          if k in old and old[k] != v and k not in free]
  if diff:
    raise UserError(f'{where} was trained with a different model ({"; ".join(diff)}); '
                    'use the same model config or a new --workdir')


def fit_positions(cfg, old: ModelConfig, where: str):
  """Fine-tuning at another block size (pretrain at 512, fine-tune at 1024): RoPE has no position weights, so
  any size works; a learned position table keeps its source's rows, which must cover the new block_size."""
  m = cfg.model
  if old.pos != 'learned' or m.pos != 'learned' or m.max_positions is not None:
    return
  if m.block_size > old.max_positions:
    raise UserError(f'{where} has learned positions for {old.max_positions} tokens; model.block_size='
                    f'{m.block_size} exceeds them: fine-tune with model.block_size <= {old.max_positions} (a RoPE '
                    'model can change its block size freely)')
  with cfg.unlocked():
    m.max_positions = old.max_positions


def prepare_data(cfg, workdir: str, tok_json: str | None) -> prepare.Prepared:
  if tok_json:  # fine-tuning: the text must be tokenized the way the weights were trained
    path = os.path.join(os.path.abspath(workdir), 'tokenizer.json')
    if os.path.exists(path) and Path(path).read_text() != tok_json and wd.finished_steps(workdir):
      raise UserError(f'{workdir!r} was trained with another tokenizer than train.init_from={cfg.train.init_from!r} '
                      'has; fine-tune into a new --workdir')
    os.makedirs(workdir, exist_ok=True)
    wd.write_atomic(path, tok_json)
    with cfg.unlocked():
      cfg.data.tokenizer = path
  return prepare.prepare(cfg)


# ------------------------------------------------------------------------------------------------ opening

@dataclasses.dataclass
class Run:
  """An opened run: everything `loop` needs, and the step it starts from."""
  cfg: Any
  workdir: str
  mc: ModelConfig
  gdef: Any
  state: dict              # {'params', 'opt'}, sharded over the mesh
  s_shard: dict
  b_shard: Any
  mesh: Any
  tx: optax.GradientTransformation
  sched: optax.Schedule
  it: Any                  # the Grain train iterator (its state is checkpointed)
  val: dict                # stacked validation batches [batches, B, T], on the devices
  ck: checkpoint.Checkpointer
  tok_json: str
  start: int
  meta0: dict              # the restored checkpoint's meta ({} for a fresh run)
  t_start: float
  mon_close: Any = None    # closes the monitor's bar and TensorBoard writer after a disk error


def open_run(cfg, workdir: str) -> Run:
  """Checks, data, model and optimizer state, restored from the latest good checkpoint when there is one.
  A refused start writes nothing in the workdir but its lock."""
  t_start = time.time()
  cfg = config_lib.absolute_paths(load_run_config(workdir, cfg))
  t, o = cfg.train, cfg.optim
  distributed.take_lock(workdir)  # process 0 holds it; the others wait until it does
  src, tok0 = None, None
  if t.init_from and wd.finished_steps(workdir):  # a fine-tune resumes from its own weights and tokenizer,
    own = os.path.join(workdir, 'tokenizer.json')  # so the base run may since have moved or gone
    tok0 = Path(own).read_text() if os.path.isfile(own) else None
    if cfg.model.max_positions is None and os.path.isfile(os.path.join(workdir, 'config.json')):
      with cfg.unlocked():  # the table size fit_positions chose when the fine-tune started
        cfg.model.max_positions = wd.read_run_config(workdir).model.max_positions
  elif t.init_from:  # fine-tuning: another run's best weights (and its tokenizer)
    if not os.path.isdir(t.init_from):
      raise UserError(f'train.init_from={t.init_from!r} is not a workdir; convert other formats with '
                      'python -m torch_compat.import_ckpt first')
    src = checkpoint.load_for_inference(t.init_from, 'best')
    tok0 = src[2]
    fit_positions(cfg, src[0], f'train.init_from={t.init_from!r}')
  prep = prepare_data(cfg, workdir, tok0)
  mc = config_lib.model_config(cfg, prep.vocab_size)
  if prep.vocab_size > mc.vocab_size:
    raise UserError(f'the tokenizer has {prep.vocab_size} tokens but model.vocab_size={mc.vocab_size}; '
                    f'raise model.vocab_size or lower data.vocab_size')
  if src:
    check_same_model(src[0].to_dict(), mc, f'train.init_from={t.init_from!r}', fine_tune=True)
    gdef, params = nnx.split(src[1])
  else:
    gdef, params = nnx.split(init_model(mc, t.seed))
  tok_json = Path(prep.tokenizer_path).read_text()

  mesh = parallel.make_mesh()
  n_dev = mesh.shape[parallel.AXIS]
  if t.batch_size % n_dev:
    raise UserError(f'train.batch_size={t.batch_size} must be divisible by the {n_dev} devices '
                    '(on a CPU: train.cpu_devices=0 picks a count that divides it)')
  tx, sched = make_optimizer(o, t.steps)
  p_shard = parallel.param_shardings(mesh, params, t.fsdp)
  params = jax.device_put(params, p_shard)
  o_shard = parallel.opt_shardings(mesh, tx, params, p_shard)
  state = {'params': params, 'opt': jax.jit(tx.init, out_shardings=o_shard)(params)}
  b_shard = parallel.batch_sharding(mesh, 1 + (o.accum_steps > 1))  # [calls, (accum,) B, T]
  it = pipeline.train_iter(prep, t.batch_size, mc.block_size, t.seed, cfg.data.num_workers, jax.process_index(),
                           jax.process_count())  # this process's rows of the global batches
  val = pipeline.val_batches(prep, t.batch_size, mc.block_size, t.eval_batches)
  val = parallel.shared_batch({k: np.stack([b[k] for b in val]) for k in val[0]}, parallel.batch_sharding(mesh, 1))

  ck = checkpoint.Checkpointer(workdir, keep=t.keep)
  start, meta0 = 0, {}

  def check(meta):  # the tokenizer first: another corpus changes it, and with it the vocabulary size
    check_same_tokenizer(meta, tok_json, f'{workdir!r}', cfg.data)
    check_same_model(meta.get('model_config', {}), mc, f'{workdir!r}')

  try:
    got = ck.restore_latest_good(state['params'], state['opt'], it, check)
    # past train.steps the loop would not run, and config.json would say the lower steps from now on
    if got is not None and got[1]['full'] and got[0] > t.steps:
      raise UserError(f'{workdir!r} is already at step {got[0]}, past train.steps={t.steps}; resume with '
                      f'--config.train.steps={got[0]} or more')
  except BaseException:
    ck.close()  # Orbax's background cleanup thread must end before the interpreter does
    raise
  if got is not None:
    step0, items = got
    state['params'] = items['params']
    if items['full']:
      state['opt'], start, meta0 = items['opt'], step0, items['meta']
      print(f'resuming from step {start} of {workdir}', flush=True)
    else:
      print(f'starting from the imported weights in {workdir} (step {step0}, fresh optimizer)', flush=True)
  return Run(cfg, workdir, mc, gdef, state, {'params': p_shard, 'opt': o_shard}, b_shard, mesh, tx, sched, it, val,
             ck, tok_json, start, meta0, t_start)


# ---------------------------------------------------------------------------------------------------- loop

def loop(r: Run) -> dict:
  """Trains an opened run; returns a summary with `status`: finished | interrupted | early_stopped |
  stopped_nonfinite (raised as a UserError after the run is closed)."""
  try:
    return _loop(r)
  except Exception as e:
    err = cli.disk_error(e)
    if err is None:
      raise
    _fail_on_disk(r, err)


def _fail_on_disk(r: Run, err: OSError):
  """A full disk (or quota, or a read-only remount) while writing metrics, run.json or a checkpoint: end the run
  as cleanly as the disk allows (run.json says 'failed' and why, where it can still be written; the checkpoints
  already finished stay), then one line."""
  what = cli.DISK_ERRNOS[err.errno]
  where = err.filename or 'the run directory'
  for close in (r.ck.close, r.mon_close):
    # the same full disk again (an async save that failed) is already reported
    with contextlib.suppress(Exception):
      if close is not None:
        close()
  try:
    if distributed.primary():
      wd.update_run(r.workdir, status='failed', reason=f'{what} while writing {where}', ended=time.time())
  except OSError:
    pass
  wd.release(r.workdir)
  kept = r.ck.latest_step()
  fix = ('free space and resume with the same command' if err.errno != errno.EROFS else
         'make it writable (or use another --workdir) and resume with the same command')
  raise UserError(f'{what} while writing {where}; {fix}'
                  + (f' (the last good checkpoint, step {kept}, is kept)' if kept is not None else '')) from None


def _loop(r: Run) -> dict:
  cfg, workdir, mc, t, accum = r.cfg, r.workdir, r.mc, r.cfg.train, r.cfg.optim.accum_steps
  if distributed.primary():
    wd.claim(workdir, cfg)
  n_dev = r.mesh.shape[parallel.AXIS]
  dp_mesh = flat_dp_mesh(r.mesh, t.fsdp, mc.dropout)
  step_fn = jax.jit(functools.partial(train_steps, gdef=r.gdef, tx=r.tx, seed=t.seed, sched=r.sched,
                                      dp_mesh=dp_mesh), donate_argnums=(0,), out_shardings=(r.s_shard, None),
                    compiler_options=compiler_options(mc.remat))
  eval_fn = jax.jit(functools.partial(eval_loss, gdef=r.gdef))
  tokens_per_step, fpt = accum * t.batch_size * mc.block_size, flops_per_token(mc)['train']
  per_call = steps_per_call(t, tokens_per_step * fpt)
  mon = monitor.Monitor(workdir, cfg, mc, r.start, t.steps, tokens_per_step=tokens_per_step, flops_per_token=fpt,
                        meta=r.meta0)
  r.mon_close = mon.abort
  stop, status, bad = Stop(), 'running', None
  state = r.state
  chat = cfg.data.format == 'chat'  # trained on the chat template: chat, generate and evaluate use it

  def save(step: int, val_loss: float | None):
    meta = {'step': step, 'val_loss': val_loss, 'model_config': mc.to_dict(), 'config': config_lib.to_plain(cfg),
            'tokenizer': r.tok_json, 'instruction_tuned': chat, 'loss_over': mon.loss_over, **mon.state()}
    r.ck.save(step, state['params'], meta, state['opt'], r.it, val_loss)

  def next_batches(n_steps: int) -> dict:
    bs = [next(r.it) for _ in range(n_steps * accum)]
    lead = (n_steps, *([accum] * (accum > 1)))
    return parallel.global_batch({key: np.stack([x[key] for x in bs]).reshape(*lead, *v.shape)
                                  for key, v in bs[0].items()}, r.b_shard)

  step, prev, row_done = r.start, None, False
  while status == 'running' and step < t.steps:
    # `per_call` steps per call while no eval, checkpoint or the end falls inside; single steps otherwise (two
    # compiled sizes at most). A resumed run starts on a call boundary of the uninterrupted one, so it makes the
    # same calls and its losses stay bitwise equal.
    room = min(t.eval_every - step % t.eval_every, t.ckpt_every - step % t.ckpt_every, t.steps - step)
    n_steps = per_call if room >= per_call else 1
    state, m = step_fn(state, next_batches(n_steps), jnp.int32(step))
    # At most two calls in flight: with several CPU devices, a deep queue of programs with collectives can
    # deadlock XLA:CPU's in-process all-reduce. Costs nothing: the next batch is still prepared while a call runs.
    if prev is not None and n_dev > 1:
      jax.block_until_ready(prev)
    ends_row = step // t.log_every != (step + n_steps) // t.log_every
    stop.agreed(step + 1, step + n_steps)
    step, prev = step + n_steps, m['loss']
    mon.record(step, m)
    last = step == t.steps
    final = last or stop.reason or step % t.eval_every == 0 or step % t.ckpt_every == 0
    # A non-final flush fetches the finished calls only, so a row is written (and timed) once the call after
    # the one that completes it has been launched.
    if row_done or final:
      bad = mon.flush(t.log_every, final)  # losses of finished calls (all calls when final)
      if bad is not None:  # closed like any other end (run.json: a deliberate stop, not a crash), then raised
        status = 'stopped_nonfinite'
        break
    row_done = ends_row and not final
    val_loss = None
    if final:  # every checkpoint step is an evaluation step, so each checkpoint carries its val loss
      val_loss = float(eval_fn(state['params'], r.val))
      if mon.eval(step, val_loss, t.patience):
        status = 'early_stopped'
    if stop.reason and not last:  # a signal during the last call: the run is finished all the same
      status = 'interrupted'
    if step % t.ckpt_every == 0 or last or status != 'running':
      save(step, val_loss)
  if status == 'running':
    status = 'finished'
  kept = r.ck.latest_step()
  r.ck.close()
  summary = mon.close(status)
  wd.release(workdir)
  if status == 'stopped_nonfinite':
    kept = (f'the last good checkpoint (step {kept}) is kept' if kept is not None and kept > r.start
            else f'checkpoint step {kept} (where this run started) is kept' if kept is not None
            else 'no checkpoint had been saved')
    raise UserError(f'loss is {bad[1]} at step {bad[0]}; the run is stopped and {kept}. Lower optim.lr or '
                    'raise optim.warmup_steps.')
  if status == 'interrupted':
    print(f'\n{stop.reason}: saved step {step}. Resume with: python -m minillm_jax.train --workdir={workdir}',
          flush=True)
  else:
    print(f'done: {summary["steps"]} steps, best val loss {summary["best_val_loss"]:.4f} at step '
          f'{summary["best_step"]}, {time.time() - r.t_start:.1f}s', flush=True)
  return {**summary, 'status': status, 'workdir': workdir, 'signal': stop.reason if status == 'interrupted' else None}


def run(cfg, workdir: str) -> dict:
  """Trains (or resumes) the run in workdir; returns a summary dict."""
  r = open_run(cfg, workdir)
  if r.start == r.cfg.train.steps and r.start > 0:  # nothing to train: run.json, config and metrics stay as they are
    r.ck.close()
    wd.release(workdir)
    best = r.meta0.get('best_val_loss')
    print(f'{workdir} has finished its {r.start} steps (best val loss {best if best is None else round(best, 4)} '
          f'at step {r.meta0.get("best_step")}); raise --config.train.steps to train further', flush=True)
    return {'steps': r.start, 'best_val_loss': float('nan') if best is None else best, 'status': 'finished',
            'best_step': r.meta0.get('best_step'), 'last_train_loss': r.meta0.get('last_train_loss'),
            'tokens_per_s': None, 'workdir': workdir, 'signal': None}
  return loop(r)
