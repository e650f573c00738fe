"""`bench --what=memory`: the peak memory and time of one train step with model.remat none / attention / block,
beside the torch mirror with and without torch.utils.checkpoint on each block (its remat=block).

Each variant runs in a fresh process (`python -m minillm_jax.evals.bench_memory '<json spec>'`, one JSON line
back), so one variant's resident-memory high-water mark and allocator caches never reach another's. In it:
the weights and optimizer state are made resident, the step compiled and run once, then the next steps are
timed, the first of them also giving the resident-memory peak over the resident memory before it
(bench_runs.rss_peak: activations, gradients and temporaries; the weights and optimizer state were resident
before). JAX reports XLA's accounting of the compiled step too (temp + arguments + outputs - aliased, the
donated state), and its *activation* memory: the temp bytes of the compiled loss-and-gradient function alone
(its gradients are outputs there, so temp is what the forward keeps for the backward plus the backward's
scratch). The step is the trainer's (training.step.train_steps, one step per call, state donated) on one
device, at one micro-batch (optim.accum_steps is not applied: accumulation scans micro-batches one at a
time, so a micro-batch's activations are what remat changes). Torch runs eager with the same AdamW and
clipping (torch_compat.train_step), under bf16 autocast when the model computes in bfloat16.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

VARIANTS = ('jax_none', 'jax_attention', 'jax_block', 'torch', 'torch_checkpoint')
# the targets for full-block remat against the plain step of the same framework, same run
TARGET_ACTIVATION_RATIO = 0.40
TARGET_TIME_RATIO = 1.35


def memory_bench(cfg, mc, a: dict) -> dict:
  """Runs VARIANTS one process each; `a`: batch (0: 1), steps (0: 1) timed after a first step, the first of
  them the memory probe."""
  B, steps = a.get('batch') or 1, a.get('steps') or 1
  base = {'model': {**mc.to_dict(), 'dropout': 0.0}, 'optim': cfg.optim.to_dict(), 'train_steps': cfg.train.steps,
          'seed': cfg.train.seed, 'batch': B, 'steps': steps}
  out = {'batch': [B, mc.block_size], 'dtype': mc.dtype, 'steps': steps, 'variants': {}, 'errors': {}}
  for v in VARIANTS:
    print(f'  memory {v}: fresh process', flush=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, '-m', __name__, json.dumps({**base, 'variant': v})], capture_output=True,
                       text=True, check=False, timeout=3600)
    line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ''
    if r.returncode != 0 or not line.startswith('{'):
      out['errors'][v] = f'exit {r.returncode}: {" ".join(r.stderr.split())[-300:]}'
      print(f'  memory {v} failed: {out["errors"][v]}', flush=True)
      continue
    out['variants'][v] = {**json.loads(line), 'wall_s': time.perf_counter() - t0}
  out['ratios'] = ratios(out['variants'])
  blk = out['ratios'].get('jax_block', {})
  if 'activation' in blk:
    out['targets'] = {'activation_ratio_max': TARGET_ACTIVATION_RATIO, 'time_ratio_max': TARGET_TIME_RATIO,
                      'activation_met': blk['activation'] <= TARGET_ACTIVATION_RATIO,
                      'time_met': blk['time'] <= TARGET_TIME_RATIO}
  return out


def ratios(vs: dict) -> dict:
  """Each remat variant over its framework's plain variant (memory and step time), measured in the same run."""
  out = {}
  for v, plain in (('jax_attention', 'jax_none'), ('jax_block', 'jax_none'), ('torch_checkpoint', 'torch')):
    if v in vs and plain in vs:
      a, b = vs[v], vs[plain]
      out[v] = {k: a[f] / b[f] for k, f in (('rss', 'rss_step_mb'), ('time', 'step_s'), ('xla_step', 'xla_step_mb'),
                                            ('activation', 'xla_activation_mb')) if a.get(f) and b.get(f)}
  return out


def markdown(m: dict) -> list[str]:
  from minillm_jax.evals.bench_report import _table
  B, T = m['batch']
  L = ['', (f'Train step memory, batch {B} x {T}, {m["dtype"]} compute, one process per variant; step time is the '
            f'median of {m["steps"]} steps. RSS: the resident-memory peak of a step over the resident memory before '
            'it (weights and optimizer state resident already). XLA: the compiled step (temp + arguments + '
            'outputs - aliased); activations: temp of the loss-and-gradient function alone. Ratios are against '
            'the same framework\'s plain step.')]
  rows = []
  for v, d in m['variants'].items():
    r = m['ratios'].get(v, {})
    cell = lambda x, k, r=r: f'{x:,.0f}' + (f' ({r[k]:.2f}x)' if k in r else '') if x is not None else '-'
    rows.append([v, cell(d.get('rss_step_mb'), 'rss'), cell(d.get('xla_step_mb'), 'xla_step'),
                 cell(d.get('xla_activation_mb'), 'activation'), f'{d["step_s"]:.2f}' + (
                     f' ({r["time"]:.2f}x)' if 'time' in r else ''), f'{d["loss"]:.4f}'])
  rows += [[v, f'failed: {e}', '', '', '', ''] for v, e in m['errors'].items()]
  L += _table(['variant', 'step RSS peak MB', 'XLA step MB', 'XLA activations MB', 's/step', 'loss'], rows)
  if 'targets' in m:
    t, r = m['targets'], m['ratios']['jax_block']
    L += ['', (f'Target for remat=block: activations <= {t["activation_ratio_max"]:.0%} of the plain step\'s '
               f'({r["activation"]:.0%}: {"met" if t["activation_met"] else "not met"}) for <= '
               f'{t["time_ratio_max"] - 1:.0%} more time (+{r["time"] - 1:.0%}: '
               f'{"met" if t["time_met"] else "not met"}).')]
  return L


# ------------------------------------------------------------------------------------------- the child
def _child(spec: dict) -> dict:
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from ml_collections import ConfigDict

  from minillm_jax.config import ModelConfig
  from minillm_jax.evals.bench_runs import rss_peak
  from minillm_jax.model import init_model
  from minillm_jax.training import step

  v, B, o = spec['variant'], spec['batch'], ConfigDict(spec['optim'])
  framework, _, remat = v.partition('_')
  mc = ModelConfig(**{**spec['model'], 'remat': {'none': 'none', 'checkpoint': 'block'}.get(remat, remat)})
  toks = np.random.default_rng(0).integers(0, mc.vocab_size, (B, mc.block_size + 1)).astype(np.int32)
  batch_np = {'inputs': toks[:, :-1], 'targets': toks[:, 1:]}
  model = init_model(mc, spec['seed'])
  mem, res = {}, {}
  if framework == 'torch':
    from torch_compat import convert, train_step
    flat = convert.flax_flat(model)
    del model
    variant = 'torch_eager_bf16' if mc.dtype == 'bfloat16' else 'torch_eager_fp32'
    import torch
    run = train_step.torch_train_run(mc, flat, o, variant, batch_np, torch.device('cpu'))
    del flat
    one = lambda: run(1)
  else:
    gdef, params = nnx.split(model, nnx.Param)
    del model
    tx, _ = step.make_optimizer(o, spec['train_steps'])
    state = {'params': params, 'opt': jax.jit(tx.init)(params)}
    batches = {k: jnp.asarray(x[None]) for k, x in batch_np.items()}
    opts = step.compiler_options(mc.remat)
    fn = jax.jit(functools.partial(step.train_steps, gdef=gdef, tx=tx, seed=spec['seed']), donate_argnums=(0,),
                 compiler_options=opts)
    compiled = fn.lower(state, batches, jnp.int32(0)).compile()
    ma = compiled.memory_analysis()
    grad = jax.jit(jax.value_and_grad(step.loss_fn), static_argnums=1, compiler_options=opts).lower(
        params, gdef, batches['inputs'][0], batches['targets'][0], jax.random.key(0)).compile()
    res |= {'xla_step_mb': (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
                            - ma.alias_size_in_bytes) / 2**20, 'xla_temp_mb': ma.temp_size_in_bytes / 2**20,
            'xla_activation_mb': grad.memory_analysis().temp_size_in_bytes / 2**20}
    del grad
    box = {'state': state, 'i': 0}

    def one() -> float:
      box['state'], m = compiled(box['state'], batches, jnp.int32(box['i']))
      box['i'] += 1
      return float(jax.block_until_ready(m['loss'])[-1])
  loss = one()  # first step: allocations that stay (torch's AdamW state, caches) happen here, not measured
  times = []
  for i in range(spec['steps']):  # the first of these is the memory probe as well
    with rss_peak(mem, 'rss') if i == 0 else contextlib.nullcontext():
      t0 = time.perf_counter()
      one()
      times.append(time.perf_counter() - t0)
  with open('/proc/self/status') as f:
    hwm = next((int(ln.split()[1]) / 1024 for ln in f if ln.startswith('VmHWM:')), None)
  return {**res, 'rss_step_mb': mem['rss'], 'rss_hwm_mb': hwm, 'step_s': float(np.median(times)),
          'step_samples_s': times, 'loss': loss, 'remat': mc.remat}


if __name__ == '__main__':
  print(json.dumps(_child(json.loads(sys.argv[1]))), flush=True)
  os._exit(0)  # skip interpreter teardown (torch and XLA threads): the result is out
