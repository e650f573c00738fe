"""Training: `python -m minillm_jax.train --config=configs/tiny.py [--config.optim.lr=...] --workdir=runs/tiny`.

Re-running the same command resumes from the workdir's latest good checkpoint (bitwise identical losses on
the same device count). Read top to bottom: optimizer, loss and steps (pure functions), then the loop.
"""
from __future__ import annotations

import functools
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from minillm_jax import config as config_lib
from minillm_jax import parallel
from minillm_jax.config import UserError
from minillm_jax.model import flops_per_token, init_model, param_counts


# ----------------------------------------------------------------------------------------------- optimizer
def lr_schedule(o, steps: int) -> optax.Schedule:
  """Linear warmup (from lr/(warmup+1), as nanoGPT, so step 0 is not a no-op) then cosine to min_lr."""
  if o.warmup_steps == 0:
    return optax.cosine_decay_schedule(o.lr, max(steps, 1), alpha=o.min_lr / o.lr)
  return optax.warmup_cosine_decay_schedule(o.lr / (o.warmup_steps + 1), o.lr, o.warmup_steps,
                                            max(steps, o.warmup_steps + 1), o.min_lr)


def decay_mask(params, decay_embeddings: bool):
  """Weight decay on matrices only: never norms or biases; embeddings only when asked."""
  def rule(path, x):
    name = jax.tree_util.keystr(path)
    is_emb = name.startswith(("['wte']", "['wpe']"))
    return x.ndim >= 2 and (decay_embeddings or not is_emb)
  return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(o, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  sched = lr_schedule(o, steps)
  adamw = optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      mask=functools.partial(decay_mask, decay_embeddings=o.decay_embeddings))
  # always the same chain (clip at inf when off) so the optimizer state has one structure for every config
  clip = optax.clip_by_global_norm(o.grad_clip if o.grad_clip > 0 else float('inf'))
  return optax.chain(clip, adamw), sched


# ----------------------------------------------------------------------------------------------- steps
def loss_fn(params, gdef, inputs_BxT, targets_BxT, key):
  logits_BxTxV = nnx.merge(gdef, params)(inputs_BxT, key=key)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()


def local_grads(params, gdef, batch: dict, key) -> tuple[jax.Array, dict]:
  """Mean loss and gradients of a batch [B,T], or of [A,B,T] accumulated micro-batches (scanned, so the result
  equals one A*B batch)."""
  grad_fn = jax.value_and_grad(loss_fn)
  if batch['inputs'].ndim == 2:
    return grad_fn(params, gdef, batch['inputs'], batch['targets'], key)
  A = batch['inputs'].shape[0]

  def micro(carry, xs):
    i, x, y = xs
    l, g = grad_fn(params, gdef, x, y, jax.random.fold_in(key, i))
    return jax.tree.map(jnp.add, carry, (l, g)), None

  zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(micro, zero, (jnp.arange(A), batch['inputs'], batch['targets']))
  return jax.tree.map(lambda x: x / A, (loss, grads))


def flat_dp_grads(params, gdef, batch: dict, key, mesh) -> tuple[jax.Array, dict]:
  """local_grads per device on its batch shard, averaged as one flat buffer. XLA's own data-parallel gradient
  all-reduce is one tuple of every parameter, and XLA:CPU makes the device threads meet once per tuple element:
  one flat buffer meets once, ~5% of a shakespeare_char step on 2 cores. For replicated parameters and no
  dropout (a dropout mask drawn per shard would differ from the global one)."""
  rows = parallel.batch_sharding(mesh, batch['inputs'].ndim - 2).spec

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), rows, P()),
                     out_specs=(P(), P()), check_vma=False)  # check_vma: the custom-VJP matmul has no rule
  def per_device(params, batch, key):
    loss, grads = local_grads(params, gdef, batch, key)
    flat, unravel = ravel_pytree(grads)
    tot = jax.lax.psum(jnp.concatenate([loss[None], flat]), parallel.AXIS) / mesh.shape[parallel.AXIS]
    return tot[0], unravel(tot[1:])

  return per_device(params, batch, key)


def flat_dp_mesh(mesh, fsdp: bool, dropout: float):
  """The mesh `flat_dp_grads` reduces over, or None where the partitioner's own reduction applies."""
  return mesh if mesh.shape[parallel.AXIS] > 1 and not fsdp and dropout == 0 else None


def train_step(state: dict, batch: dict, step, *, gdef, tx, seed: int, sched=None, dp_mesh=None
               ) -> tuple[dict, dict]:
  """One optimizer update on a batch [B,T] or [A,B,T] (A accumulated micro-batches). A non-finite loss or
  gradient leaves the weights finite. With `sched`, the metrics include this update's learning rate (computed
  here: evaluated eagerly it costs compiles). `dp_mesh`: reduce gradients with `flat_dp_grads` on it."""
  params, key = state['params'], jax.random.fold_in(jax.random.key(seed), step)
  if dp_mesh is not None:
    loss, grads = flat_dp_grads(params, gdef, batch, key, dp_mesh)
  else:
    loss, grads = local_grads(params, gdef, batch, key)
  gnorm = optax.tree.norm(grads)
  # A non-finite loss/gradient becomes a zero gradient, so the weights never turn NaN (the loop then stops
  # the run). Masking the gradient, not selecting old vs new state, lets XLA update the donated state in place.
  ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
  grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
  updates, opt = tx.update(grads, state['opt'], params)
  metrics = {'loss': loss, 'grad_norm': gnorm} | ({'lr': sched(step)} if sched is not None else {})
  return {'params': optax.apply_updates(params, updates), 'opt': opt}, metrics


def train_steps(state: dict, batches: dict, step0, *, gdef, tx, seed: int, sched=None, dp_mesh=None
                ) -> tuple[dict, dict]:
  """K = len(batches) train_steps in one call (lax.scan); metrics come back as [K] arrays. A small model's
  step is not much longer than the dispatch and host sync around it: a call of several steps pays them once."""
  def body(st, xs):
    batch, i = xs
    return train_step(st, batch, step0 + i, gdef=gdef, tx=tx, seed=seed, sched=sched, dp_mesh=dp_mesh)
  K = jax.tree.leaves(batches)[0].shape[0]
  return jax.lax.scan(body, state, (batches, jnp.arange(K, dtype=jnp.int32)))


def eval_loss(params, batches: dict, *, gdef) -> jax.Array:
  """Mean loss over stacked batches [E,B,T]: one call, one batch's activations in memory at a time."""
  return jax.lax.map(lambda b: loss_fn(params, gdef, b['inputs'], b['targets'], None), batches).mean()


def steps_per_call(t, flops_per_step: float) -> int:
  """train.steps_per_call, or auto: steps worth about 5e10 FLOPs (half a second or less on a CPU, so SIGTERM
  still answers quickly), at most 16, dividing the eval and checkpoint intervals (calls never cross them)."""
  if t.steps_per_call:
    return t.steps_per_call
  cap = int(min(16, max(1, 5e10 // flops_per_step)))
  return parallel.largest_divisor(math.gcd(t.eval_every, t.ckpt_every), cap)


# ----------------------------------------------------------------------------------------------- setup
class Stop:
  """SIGTERM/SIGINT: finish the current call (train.steps_per_call steps), save, exit 128 + the signal (143, 130).
  A second signal exits at once."""

  def __init__(self):
    self.reason = None
    for s in (signal.SIGTERM, signal.SIGINT):
      signal.signal(s, self._handle)

  def _handle(self, signum, frame):
    if self.reason is not None:
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
    self.reason = signal.Signals(signum).name


def load_run_config(workdir: str, cfg):
  """--config if given, else the workdir's config.json (so `train --workdir=W` resumes as it was)."""
  path = os.path.join(workdir, 'config.json')
  if cfg is None:
    if not os.path.exists(path):
      raise UserError(f'no --config given and {path} does not exist; pass --config=configs/<name>.py')
    try:
      return config_lib.read_run_config(workdir)
    except UserError as e:
      raise UserError(f'{e}; pass --config=<the file it was trained with> to resume') from None
  return cfg


def check_same_tokenizer(meta: dict, tok_json: str, where: str, data=None):
  from minillm_jax.tokenizer import Tok
  if meta.get('tokenizer') and Tok.from_json_str(meta['tokenizer']).hash != Tok.from_json_str(tok_json).hash:
    old = (meta.get('config') or {}).get('data') or {}  # name a data change: the usual cause of a new tokenizer
    diff = [f'data.{k}: checkpoint {old[k]!r} vs config {data[k]!r}' for k in ('corpus', 'path', 'tokenizer',
            'vocab_size') if data is not None and k in old and old[k] != data[k]]
    raise UserError(f'{where} was trained with another tokenizer than data.tokenizer gives now'
                    f'{" (" + "; ".join(diff) + ")" if diff else ""}; resume with the run\'s data settings, set '
                    f'--config.data.tokenizer=<the run\'s tokenizer.json>, or use a new --workdir')


def check_same_model(old: dict, new: config_lib.ModelConfig, where: str):
  diff = [f'{k}: checkpoint {old[k]!r} vs config {v!r}' for k, v in new.to_dict().items()
          if k in old and old[k] != v and k not in ('dropout', 'dtype')]
  if diff:
    raise UserError(f'{where} was trained with a different model ({"; ".join(diff)}); '
                    'use the same model config or a new --workdir')


def prepare_data(cfg, workdir: str, tok_json: str | None):
  from minillm_jax import prepare
  from minillm_jax.status import finished_steps
  if tok_json:  # fine-tuning: the text must be tokenized the way the weights were trained
    path = os.path.join(os.path.abspath(workdir), 'tokenizer.json')
    if os.path.exists(path) and Path(path).read_text() != tok_json and finished_steps(workdir):
      raise UserError(f'{workdir!r} was trained with another tokenizer than train.init_from={cfg.train.init_from!r} '
                      'has; fine-tune into a new --workdir')
    os.makedirs(workdir, exist_ok=True)
    config_lib.write_atomic(path, tok_json)
    with cfg.unlocked():
      cfg.data.tokenizer = path
  return prepare.prepare(cfg)


def run(cfg, workdir: str) -> dict:
  """Trains (or resumes) the run in workdir; returns a summary dict."""
  from minillm_jax import checkpoint, data, monitor
  from minillm_jax.status import finished_steps
  t_start = time.time()
  cfg = config_lib.absolute_paths(load_run_config(workdir, cfg))
  t, o = cfg.train, cfg.optim
  monitor.check_workdir_free(workdir)
  src, tok0 = None, None
  if t.init_from and finished_steps(workdir):  # a fine-tune resumes from its own weights and tokenizer,
    own = os.path.join(workdir, 'tokenizer.json')  # so the base run may since have moved or gone
    tok0 = Path(own).read_text() if os.path.isfile(own) else None
  elif t.init_from:  # fine-tuning: another run's best weights (and its tokenizer)
    if not os.path.isdir(t.init_from):
      raise UserError(f'train.init_from={t.init_from!r} is not a workdir; convert other formats with '
                      'python -m torch_compat.import_ckpt first')
    src = checkpoint.load_for_inference(t.init_from, 'best')
    tok0 = src[2]
  prep = prepare_data(cfg, workdir, tok0)
  mc = config_lib.model_config(cfg, prep.vocab_size)
  if prep.vocab_size > mc.vocab_size:
    raise UserError(f'the tokenizer has {prep.vocab_size} tokens but model.vocab_size={mc.vocab_size}; '
                    f'raise model.vocab_size or lower data.vocab_size')
  if src:
    check_same_model(src[0].to_dict(), mc, f'train.init_from={t.init_from!r}')
    gdef, params = nnx.split(src[1])
  else:
    gdef, params = nnx.split(init_model(mc, t.seed))
  with open(prep.tokenizer_path) as f:
    tok_json = f.read()

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
  s_shard = {'params': p_shard, 'opt': o_shard}
  A = o.accum_steps
  b_shard = parallel.batch_sharding(mesh, 1 + (A > 1))  # [K, (A,) B, T]
  local_B = t.batch_size // jax.process_count()
  it = data.train_iter(prep, local_B, mc.block_size, t.seed, cfg.data.num_workers, jax.process_index(),
                       jax.process_count())
  val = data.val_batches(prep, t.batch_size, mc.block_size, t.eval_batches)
  val = parallel.global_batch({k: np.stack([b[k] for b in val]) for k in val[0]}, parallel.batch_sharding(mesh, 1))

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

  if start == t.steps and start > 0:  # nothing to train: leave run.json, config and metrics as they are
    ck.close()
    monitor.release_workdir(workdir)
    best = meta0.get('best_val_loss')
    print(f'{workdir} has finished its {start} steps (best val loss {best if best is None else round(best, 4)} at '
          f'step {meta0.get("best_step")}); raise --config.train.steps to train further', flush=True)
    return {'steps': start, 'best_val_loss': float('nan') if best is None else best, 'status': 'finished',
            'best_step': meta0.get('best_step'), 'last_train_loss': meta0.get('last_train_loss'),
            'tokens_per_s': None, 'workdir': workdir, 'signal': None}

  monitor.claim_workdir(workdir, cfg)
  dp_mesh = flat_dp_mesh(mesh, t.fsdp, mc.dropout)
  step_fn = jax.jit(functools.partial(train_steps, gdef=gdef, tx=tx, seed=t.seed, sched=sched, dp_mesh=dp_mesh),
                    donate_argnums=(0,),
                    out_shardings=(s_shard, None))
  eval_fn = jax.jit(functools.partial(eval_loss, gdef=gdef))
  tokens_per_step, fpt = A * t.batch_size * mc.block_size, flops_per_token(mc)['train']
  K = steps_per_call(t, tokens_per_step * fpt)
  mon = monitor.Monitor(workdir, cfg, mc, start, t.steps, tokens_per_step=tokens_per_step, flops_per_token=fpt,
                        meta=meta0)
  stop, stopped_early, status = Stop(), False, 'finished'

  def evaluate() -> float:
    return float(eval_fn(state['params'], val))

  def save(step: int, val_loss: float | None):
    meta = {'step': step, 'val_loss': val_loss, 'model_config': mc.to_dict(), 'config': config_lib.to_plain(cfg),
            'tokenizer': tok_json, **mon.state()}
    ck.save(step, state['params'], meta, state['opt'], it, val_loss)

  def next_batches(k: int) -> dict:
    bs = [next(it) for _ in range(k * A)]
    return parallel.global_batch({key: np.stack([x[key] for x in bs]).reshape(k, *([A] * (A > 1)), *v.shape)
                                  for key, v in bs[0].items()}, b_shard)

  step, prev, row_done = start, None, False
  while step < t.steps:
    # K steps per call while no eval, checkpoint or the end falls inside; single steps otherwise (two compiled
    # sizes at most). A resumed run starts on a call boundary of the uninterrupted one, so it makes the same
    # calls and its losses stay bitwise equal.
    k = K if min(t.eval_every - step % t.eval_every, t.ckpt_every - step % t.ckpt_every, t.steps - step) >= K else 1
    state, m = step_fn(state, next_batches(k), jnp.int32(step))
    # At most two calls in flight: with several CPU devices, a deep queue of programs with collectives can
    # deadlock XLA:CPU's in-process all-reduce (reproduced with 50 queued calls on 2 cores). Costs nothing:
    # the next batch is still prepared while a call runs.
    if prev is not None and n_dev > 1:
      jax.block_until_ready(prev)
    ends_row = step // t.log_every != (step + k) // t.log_every
    step, prev = step + k, m['loss']
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
      val_loss = evaluate()
      stopped_early = mon.eval(step, val_loss, t.patience)
    if step % t.ckpt_every == 0 or last or stop.reason or stopped_early:
      save(step, val_loss)
    if stop.reason and not last:  # a signal during the last call: the run is finished all the same
      status = 'interrupted'
      break
    if stopped_early:
      status = 'early_stopped'
      break
  kept = ck.latest_step()
  ck.close()
  summary = mon.close(status)
  if status == 'stopped_nonfinite':
    monitor.release_workdir(workdir)
    kept = (f'the last good checkpoint (step {kept}) is kept' if kept is not None and kept > start
            else f'checkpoint step {kept} (where this run started) is kept' if kept is not None
            else 'no checkpoint had been saved')
    raise UserError(f'loss is {bad[1]} at step {bad[0]}; the run is stopped and {kept}. Lower optim.lr or '
                    'raise optim.warmup_steps.')
  if status == 'interrupted':
    print(f'\n{stop.reason}: saved step {step}. Resume with: python -m minillm_jax.train --workdir={workdir}',
          flush=True)
  else:
    print(f'done: {summary["steps"]} steps, best val loss {summary["best_val_loss"]:.4f} at step '
          f'{summary["best_step"]}, {time.time() - t_start:.1f}s', flush=True)
  monitor.release_workdir(workdir)
  return {**summary, 'status': status, 'workdir': workdir, 'signal': stop.reason if status == 'interrupted' else None}


def bf16_hint(dtype: str) -> str | None:
  """A float32 run on a CPU that multiplies bfloat16 in hardware (AMX) is leaving speed behind: say so."""
  if dtype == 'float32' and jax.default_backend() == 'cpu' and 'amx_bf16' in parallel.cpu_flags():
    return ('this CPU has AMX bfloat16 units: --config.model.dtype=bfloat16 (float32 weights and optimizer, '
            'bfloat16 matmuls) trained `tiny` 1.4x faster on one (BENCHMARKS.md)')
  return None


def main(argv):
  del argv
  from absl import flags

  from minillm_jax import cli
  F = flags.FLAGS
  cfg = cli.config() if F['config'].present or F['config'].value is not None else None
  if os.path.exists(F.workdir) and not os.path.isdir(F.workdir):
    raise UserError(f'--workdir={F.workdir!r} is a file, not a directory')
  cfg = load_run_config(F.workdir, cfg)
  weights = param_counts(config_lib.model_config(cfg, 2 ** 16))['total']  # before the tokenizer: vocab bound
  n = parallel.cpu_device_count(cfg.train.cpu_devices, cfg.train.batch_size, weights)
  if parallel.use_cpu_devices(n):
    print(f'CPU: {n} devices, data parallel (train.cpu_devices=1 for a single device)', flush=True)
  if hint := bf16_hint(cfg.model.dtype):
    print(hint, flush=True)
  summary = run(cfg, F.workdir)
  if summary['signal']:  # saved, but not finished: `train && export` must not go on (130 Ctrl-C, 143 SIGTERM)
    sys.exit(128 + signal.Signals[summary['signal']])
  if summary['status'] == 'finished' and F.sample:
    from minillm_jax import sample
    sample.print_sample(F.workdir)


if __name__ == '__main__':
  from absl import flags

  from minillm_jax import cli
  cli.define_config(default=None)
  cli.define_workdir()
  flags.DEFINE_bool('sample', True, 'Print a sample from the best checkpoint when training finishes.')
  cli.run(main)
