"""The one Orbax wrapper (Orbax's API churns: every orbax call in the project lives here).

A checkpoint is `<workdir>/checkpoints/<step>/` with items
  params  model parameters (nnx.State as a pytree)          StandardSave
  opt     optimizer state (absent for imported weights)      StandardSave
  data    Grain iterator state (absent for imported weights) grain.checkpoint.CheckpointSave
  meta    step, val_loss, model_config, config, tokenizer.json text, seed, tokens_seen   JsonSave
Retention keeps the latest `keep` steps plus the best by val_loss (AnyPreservationPolicy, not best_fn +
max_to_keep, which deletes the newest steps: STACK_NOTES §4), so the latest step never goes backwards.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import sys
import threading
import time
import warnings

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from minillm_jax import config as config_lib
from minillm_jax import workdir as wd
from minillm_jax.config import ModelConfig, UserError
from minillm_jax.model import GPT
from minillm_jax.workdir import ckpt_dir, finished_steps

log = logging.getLogger(__name__)

for _name in ('absl', 'orbax', 'orbax.checkpoint'):  # orbax logs every save/restore at INFO through absl
  logging.getLogger(_name).setLevel(logging.WARNING)
# A step without a val loss (an import's step 0, a non-finite eval) is saved without metrics on purpose.
logging.getLogger('absl').addFilter(lambda r: not str(r.msg).startswith('Requested `tracked_metric`'))


def _abstract(tree):
  """Restore target with the shapes, dtypes and shardings of `tree` (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.dir = ckpt_dir(workdir)
    self.last_resolved = None  # the step load_for_inference is reading (to tell retention from damage)
    if read_only and not os.path.isdir(self.dir):
      raise UserError(f'no checkpoints in {workdir!r} (expected {self.dir}); train first or check --workdir')
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m['val_loss'], reverse=True, n=1,
                                      keep_checkpoints_without_metrics=False)])
    # best_fn only makes Orbax write each step's metrics to disk (its best_step is not used): without them a
    # reopened manager sees no metrics, BestN protects nothing, and a resumed run's first save deleted the best.
    opts = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=lambda m: m['val_loss'],
                                        best_mode='min', enable_async_checkpointing=async_save,
                                        create=not read_only, cleanup_tmp_directories=not read_only)
    self.mngr = ocp.CheckpointManager(self.dir, options=opts)
    # Orbax removes a killed save's temporary directories on a background thread that its close() does not
    # join (it waits only before a save): a run that fails right after opening the manager exited under it, and
    # the thread's traceback followed the one-line error. Wait here (milliseconds; private, hence getattr).
    wait = getattr(self.mngr, '_maybe_await_cleanup_tmp_directory', None)
    if wait is not None:
      wait()

  def steps(self) -> list[int]:
    return sorted(self.mngr.all_steps())

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def items(self, step: int) -> set[str]:
    return set(os.listdir(os.path.join(self.dir, str(step))))

  def save(self, step: int, params, meta: dict, opt_state=None, data_iter=None, val_loss: float | None = None,
           force: bool = True) -> bool:
    """Async save; returns once device buffers are copied, so the next (donating) step may run."""
    if jax.process_count() == 1:
      # One host copy of the whole state, saved as numpy (restores into any sharding): one transfer instead of
      # Orbax's own per-array, per-shard device-to-host transfers, which each pay a fixed cost.
      params, opt_state = jax.device_get((params, opt_state))
    args = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
    if opt_state is not None:
      args['opt'] = ocp.args.StandardSave(opt_state)
    if data_iter is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iter)
    metrics = {'val_loss': float(val_loss)} if val_loss is not None and np.isfinite(val_loss) else None
    wd.fault('checkpoint', os.path.join(self.dir, str(step)))  # test hook (workdir.fault), off by default
    if step in self.mngr.all_steps():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
      return False
    return self.mngr.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=force)

  def restore(self, step: int, params, opt_state=None, data_iter=None) -> dict:
    """Restores into targets shaped like `params`/`opt_state` (arrays or abstract), with the targets' shardings
    (never the saved ones: a checkpoint saved on other devices, or on a GPU, restores on these); returns the
    items. The data iterator's state may come from another process count (see _other_count_state)."""
    args = dict(params=ocp.args.StandardRestore(_abstract(params)), meta=ocp.args.JsonRestore())
    if opt_state is not None:
      args['opt'] = ocp.args.StandardRestore(_abstract(opt_state))
    other = self._other_count_state(step) if data_iter is not None else None
    if data_iter is not None and other is None:
      args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    r = self.mngr.restore(step, args=ocp.args.Composite(**args))
    got = {k: r[k] for k in args}
    if other is not None:
      data_iter.set_state(json.loads(other))
      data_iter.start_prefetch()
      got['data'] = data_iter
    return got

  def _other_count_state(self, step: int) -> str | None:
    """The data iterator state of a checkpoint saved by another number of processes, or None when this process's
    own file is there. Grain names the file by process (process_<i>-of-<n>.json); data.pipeline's state is the
    same on every process and for any count (global batches), so process 0's file serves any process count."""
    d = os.path.join(self.dir, str(step), 'data')
    own = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    if not os.path.isdir(d) or os.path.exists(os.path.join(d, own)):
      return None
    saved = sorted(n for n in os.listdir(d) if n.startswith('process_0-of-') and n.endswith('.json'))
    if not saved:
      return None  # Orbax's own error follows: an unreadable checkpoint
    with open(os.path.join(d, saved[0])) as f:
      return f.read()

  def restore_latest_good(self, params, opt_state=None, data_iter=None, check_meta=None) -> tuple[int, dict] | None:
    """Newest checkpoint that restores cleanly; a corrupt newer one is set aside with a warning.
    `check_meta(meta)` runs first and may raise UserError (a different model is not corruption)."""
    steps = self.steps()
    for step in reversed(steps):
      meta = self.meta(step)
      if meta is not None and check_meta is not None:
        check_meta(meta)
      full = opt_state is not None and {'opt', 'data'} <= self.items(step)
      try:
        if meta is None:
          raise ValueError('meta item unreadable')
        got = self.restore(step, params, opt_state if full else None, data_iter if full else None)
      except Exception as e:  # any unreadable checkpoint: fall back to an older one
        if isinstance(e, (MemoryError, UserError)):  # not the checkpoint's fault (e.g. the data iterator's state
          raise                                       # does not fit a changed batch_size): keep it where it is
        _quiet_failed_reads()
        moved = self._set_aside(step)
        older = 'trying the previous one' if step != steps[0] else 'no older one is left'
        why = (str(e).strip().splitlines() or [''])[0][:160]
        print(f'warning: checkpoint step {step} is unreadable ({type(e).__name__}: {why}); moved it to {moved}; '
              f'{older}', file=sys.stderr, flush=True)
        continue
      got['full'] = full
      return step, got
    aside = os.path.join(os.path.dirname(self.dir), 'corrupt_checkpoints')
    if os.path.isdir(aside) and os.listdir(aside):  # starting over would rewrite this run's metrics
      raise UserError(f'no readable checkpoint is left in {self.dir} (the unreadable ones are in {aside}); '
                      'train in a new --workdir, or move a repaired step back into checkpoints/')
    return None

  def _set_aside(self, step: int) -> str:
    """Moves an unreadable step out of the manager's sight (kept, not deleted: it may be recoverable)."""
    dst = os.path.join(os.path.dirname(self.dir), 'corrupt_checkpoints', f'{step}-{int(time.time())}')
    if jax.process_index() == 0:  # one mover; every process then stops seeing the step
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      os.replace(os.path.join(self.dir, str(step)), dst)
    self.mngr.reload()
    return dst

  def best_step(self) -> int | None:
    best = None
    for step in self.steps():
      m = self.meta(step)
      v = m.get('val_loss') if m else None
      if v is not None and (best is None or v < best[0]):
        best = (v, step)
    return best[1] if best else None

  def meta(self, step: int) -> dict | None:
    try:
      return self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception:  # noqa: BLE001 - status/plot tolerate unreadable steps
      _quiet_failed_reads()  # its failed reads end in orbax's event loop too, at exit after our one line
      return None

  def resolve_step(self, step: str | int) -> int:
    steps = self.steps()
    if not steps:
      raise UserError(f'no finished checkpoint in {self.dir}')
    if step == 'latest':
      return steps[-1]
    if step == 'best':
      return self.best_step() or steps[-1]
    try:
      n = int(step)
    except ValueError:
      raise UserError(f'--step={step!r}: use best, latest or a step number') from None
    if n not in steps:
      raise UserError(f'no checkpoint for step {n} in {self.dir}; available: {steps}')
    return n

  def wait(self):
    self.mngr.wait_until_finished()

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()


def load_for_inference(workdir: str, step: str | int = 'best') -> tuple[ModelConfig, GPT, str, dict]:
  """(model config, model with restored params, tokenizer.json text, meta) of a run's checkpoint."""
  ck = Checkpointer(workdir, read_only=True)
  try:
    for attempt in range(3):  # a live run's retention may delete the step between listing and reading it
      try:
        return _load(ck, workdir, step)
      except UserError:
        gone = ck.last_resolved is not None and not os.path.isdir(os.path.join(ck.dir, str(ck.last_resolved)))
        if not gone:
          raise
        if step not in ('latest', 'best') or attempt == 2:
          raise UserError(f'checkpoint step {ck.last_resolved} in {workdir!r} was removed by retention (train.keep) '
                          f'while it was read; pass --step=latest or one of {ck.steps() or "none left"}') from None
        print(f'warning: checkpoint step {ck.last_resolved} was removed by retention while it was read; '
              f'trying the newest again', file=sys.stderr, flush=True)
        ck.mngr.reload()
  finally:
    ck.close()
  raise AssertionError('unreachable')


def _load(ck: Checkpointer, workdir: str, step: str | int) -> tuple[ModelConfig, GPT, str, dict]:
  """load_for_inference's one attempt; ck.last_resolved says which step it read."""
  ck.last_resolved = None
  n = ck.last_resolved = ck.resolve_step(step)
  meta = ck.meta(n)
  if meta is None or 'model_config' not in meta:
    raise UserError(f'checkpoint {n} in {workdir!r} has no readable meta item; it is corrupt')
  mc = ModelConfig.from_dict(meta['model_config'])
  gdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(mc, nnx.Rngs(params=0))))
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract)
  err = None
  try:
    params = ck.restore(n, target)['params']
  except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many kinds for damaged files
    err = f'{type(e).__name__}: ' + ' '.join(str(e).split()).split('. See full TensorStore details')[0][:160]
    _quiet_failed_reads()
  if err is not None:
    older = [s for s in ck.steps() if s < n]
    raise UserError(f'cannot restore checkpoint {n} in {workdir!r} (damaged or incomplete: {err})'
                    + (f'; try --step={older[-1]}' if older else ''))
  return mc, nnx.merge(gdef, params), meta.get('tokenizer', ''), meta


_NOISE = ('TensorStore', 'OCDBT', 'reading array index', 'Event loop is closed')


class _DropFailedReadNoise(logging.Filter):
  """After one failed restore, orbax's other reads of the damaged step fail later in its event-loop thread and
  asyncio logs each ('Task exception was never retrieved', pages of TensorStore specs) over our one-line error.
  Only those records are dropped; other asyncio errors still show."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage() + (repr(record.exc_info[1]) if record.exc_info else '')
    return not any(n in text for n in _NOISE)


def _quiet_failed_reads():
  log_ = logging.getLogger('asyncio')
  if not any(isinstance(f, _DropFailedReadNoise) for f in log_.filters):
    log_.addFilter(_DropFailedReadNoise())
  prev = sys.unraisablehook
  if not getattr(prev, 'drops_failed_reads', False):
    def hook(u, prev=prev):  # the same reads, finalized at exit after the loop closed
      if not any(n in f'{u.exc_value!r} {u.object!r}' for n in _NOISE):
        prev(u)
    hook.drops_failed_reads = True
    sys.unraisablehook = hook
  warnings.filterwarnings('ignore', message="coroutine '_read_array_index_and_device_put' was never awaited")
  prev_exc = sys.excepthook
  if not getattr(prev_exc, 'drops_failed_reads', False):
    def excepthook(t, v, tb, prev=prev_exc):  # tensorstore callbacks posting to orbax's closed loop, at exit
      if not (t is RuntimeError and 'Event loop is closed' in str(v)):
        prev(t, v, tb)
    excepthook.drops_failed_reads = True
    sys.excepthook = excepthook
  prev_thread = threading.excepthook
  if not getattr(prev_thread, 'drops_failed_reads', False):
    def thread_hook(a, prev=prev_thread):  # the same, raised in orbax's event-loop thread as the process exits
      if not (a.exc_type is RuntimeError and 'Event loop is closed' in str(a.exc_value)):
        prev(a)
    thread_hook.drops_failed_reads = True
    threading.excepthook = thread_hook
  gc.collect()


# What an imported file's run config may bring: training hyperparameters only. Its data section (corpus, paths,
# hub dataset, cache dir, tokenizer) and train.init_from name files and sources its author chose; a later plain
# `train --workdir` would read them, so they are reset to the defaults (the model section comes from the weights).
IMPORTED_SECTIONS = ('optim', 'train', 'sample')
NOT_IMPORTED = {'train.init_from', 'train.cpu_devices', 'train.fsdp', 'train.peak_flops', 'sample.prompt'}


def imported_config(cfg_plain: dict | None) -> tuple[config_lib.ConfigDict, list[str]]:
  """(default_config() plus the harmless hyperparameters of `cfg_plain`, the keys set in `cfg_plain` to
  something other than the default that were not taken)."""
  cfg = config_lib.default_config()
  dropped = []
  for sec, sub in (cfg_plain or {}).items():
    if not isinstance(sub, dict) or sec == 'model':
      continue
    for k, v in sub.items():
      name = f'{sec}.{k}'
      if sec not in cfg or k not in cfg[sec]:
        dropped.append(name)
      elif sec in IMPORTED_SECTIONS and name not in NOT_IMPORTED:
        cfg[sec][k] = tuple(v) if isinstance(v, list) else v
      elif v != cfg[sec][k]:
        dropped.append(name)
  return config_lib.validate(cfg), dropped


def init_workdir(workdir: str, cfg_plain: dict | None, model_cfg: ModelConfig, model: GPT,
                 tokenizer_json: str | None, meta: dict) -> None:
  """Writes a weights-only step-0 checkpoint (+ config.json/.py) so `train --workdir` continues from it.
  Of `cfg_plain` (the source's run config) only the hyperparameters are kept: see imported_config."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir!r} is a file, not a directory')
  if finished_steps(workdir):
    raise UserError(f'{workdir!r} already has checkpoints; import into a new --workdir')
  # Another run's config.json and metrics would be replaced. What an interrupted import itself leaves (these
  # files, a checkpoints/ without a finished step: Orbax removes its <step>.orbax-checkpoint-tmp dirs when it
  # opens the directory) is fine, so the import can be run again.
  leftovers = {'tokenizer.json', 'config.json', 'config.py', 'checkpoints', '.lock'}
  other = sorted(set(os.listdir(workdir)) - leftovers) if os.path.isdir(workdir) else []
  if other:
    raise UserError(f'{workdir!r} already holds files ({", ".join(other[:4])}); import into a new or empty '
                    '--workdir')
  cfg, _ = imported_config(cfg_plain)
  for k, v in model_cfg.to_dict().items():
    if k in cfg.model:
      cfg.model[k] = v
  os.makedirs(workdir, exist_ok=True)
  if tokenizer_json:  # training must tokenize text the way these weights expect
    tok_path = os.path.join(os.path.abspath(workdir), 'tokenizer.json')
    with open(tok_path, 'w') as f:
      f.write(tokenizer_json)
    cfg.data.tokenizer = tok_path
  wd.write_run_config(workdir, cfg)
  ck = Checkpointer(workdir, async_save=False)
  full_meta = {**meta, 'step': 0, 'model_config': model_cfg.to_dict(), 'config': config_lib.to_plain(cfg),
               'tokenizer': tokenizer_json or ''}
  ck.save(0, nnx.state(model, nnx.Param), full_meta)
  ck.close()
