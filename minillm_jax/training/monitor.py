"""Run monitoring: progress bar, metrics.jsonl, TensorBoard events, run.json (liveness), early stopping, MFU.
In a multi-process run every process keeps the same counts, and process 0 alone prints and writes."""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from minillm_jax import cli
from minillm_jax import workdir as wd
from minillm_jax.config import UserError, to_plain
from minillm_jax.kernels import matmul as cpu_matmul
from minillm_jax.model import mm


def _peak_key(dtype: str) -> tuple[str, str]:
  dev = jax.devices()[0]
  lib = ':openblas' if dev.platform == 'cpu' and dtype == 'float32' and cpu_matmul.available() else ''
  return (os.path.join(cli.cache_dir(), 'peak_flops.json'),
          f'{dev.platform}:{dev.device_kind}:{jax.device_count()}:{dtype}{lib}')


def matmul_peak_flops(dtype: str) -> float:
  """Measured FLOP/s of the model's 2048^3 matmul (`model.mm`: OpenBLAS for float32 on CPU) on device 0 in the
  compute dtype, cached: the fastest of the calls in about half a second (on a shared host the slower ones
  measure the neighbours)."""
  cache, key = _peak_key(dtype)
  try:
    with open(cache) as f:
      return float(json.load(f)[key])
  except (OSError, ValueError, KeyError, TypeError):
    pass
  n = 2048
  a = jnp.ones((n, n), dtype)
  f = jax.jit(mm)
  f(a, a).block_until_ready()
  best, t_end = float('inf'), time.perf_counter() + 0.5
  while time.perf_counter() < t_end:
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return store_peak_flops(dtype, 2 * n ** 3 / best)


def store_peak_flops(dtype: str, peak: float) -> float:
  """Records `peak` for this device and dtype (best effort: the cache may be read-only); returns it."""
  cache, key = _peak_key(dtype)
  try:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    old = {}
    if os.path.exists(cache):
      with open(cache) as f:
        old = json.load(f)
    wd.write_json(cache, {**old, key: peak})
  except (OSError, ValueError):
    pass
  return peak


# Peak dense TFLOP/s per GPU (no structured sparsity) from NVIDIA's datasheets: (16-bit tensor core: bfloat16, or
# float16 where the GPU has no bfloat16 units, float32 without tensor cores). H100 SXM / PCIe / NVL and H200 SXM /
# NVL: "NVIDIA H100 Tensor Core GPU" and "NVIDIA H200 Tensor Core GPU" datasheets (the sparsity figures halved);
# A100 40/80 GB, SXM and PCIe: "NVIDIA A100 Tensor Core GPU" datasheet; L4, L40, L40S, A10: their datasheets
# (AWS's A10G has no NVIDIA datasheet: the A10's figures, an upper bound for it); RTX 4090 and 3090: the "NVIDIA Ada GPU Architecture" and
# "NVIDIA Ampere GA102 GPU Architecture" whitepapers (bfloat16 with float32 accumulation, the GeForce rate);
# V100 SXM2 / PCIe and T4 (float16; no bfloat16 units): their datasheets. Matched in this order against
# jax.Device.device_kind (e.g. 'NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-40GB', 'Tesla T4'), case-insensitive.
GPU_PEAK_TFLOPS = (
    ('H100 PCIe', 756.0, 51.0), ('H100 NVL', 835.0, 60.0), ('H100', 989.0, 67.0),
    ('H200 NVL', 835.0, 60.0), ('H200', 989.0, 67.0),
    ('A100', 312.0, 19.5),
    ('L40S', 362.0, 91.6), ('L40', 181.0, 90.5), ('L4', 121.0, 30.3),
    ('RTX 4090', 165.2, 82.6), ('RTX 3090', 71.0, 35.6),
    ('A10G', 125.0, 31.2), ('A10', 125.0, 31.2),
    ('V100 PCIe', 112.0, 14.0), ('V100', 125.0, 15.7),
    ('T4', 65.0, 8.1),
)
_SAID_UNKNOWN = set()


def gpu_peak_flops(device_kind: str, dtype: str) -> float | None:
  """Datasheet peak FLOP/s of one GPU of this kind in this compute dtype, or None for a GPU not in the table."""
  def norm(s: str) -> str:  # 'Tesla V100-PCIE-32GB' and 'V100 PCIe' alike
    return s.lower().replace('-', ' ').replace('_', ' ')
  kind = norm(device_kind)
  for name, half, single in GPU_PEAK_TFLOPS:
    if norm(name) in kind:
      return (single if dtype == 'float32' else half) * 1e12
  return None


def peak_flops(dtype: str) -> tuple[float, bool]:
  """(the MFU denominator in FLOP/s, whether it was measured). A GPU in GPU_PEAK_TFLOPS: its datasheet peak
  times the run's GPUs; another GPU or TPU: the measured matmul peak of one device times the devices (said once);
  a CPU: the measured peak of device 0 (the CPU's devices share its cores)."""
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    return matmul_peak_flops(dtype), True
  known = gpu_peak_flops(dev.device_kind, dtype) if dev.platform == 'gpu' else None
  if known is not None:
    return known * jax.device_count(), False
  if dev.device_kind not in _SAID_UNKNOWN and jax.process_index() == 0:
    _SAID_UNKNOWN.add(dev.device_kind)
    print(f'note: no datasheet peak for {dev.device_kind!r} (training.monitor.GPU_PEAK_TFLOPS); MFU is against '
          'a measured matmul peak (or set train.peak_flops)', flush=True)
  return matmul_peak_flops(dtype) * jax.device_count(), True


def _summary_writer(logdir: str, purge_step: int | None):
  # tensorboardX imports torch at module level only to accept torch tensors (a slow import, for nothing here);
  # it is written floats here, so torch is hidden while it imports (a later `import torch` works as usual).
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules['torch']
  return SummaryWriter(logdir, purge_step=purge_step)


def _wandb_run(cfg, workdir: str):
  """A Weights & Biases run that gets the metrics.jsonl rows, when train.wandb_project is set (the `wandb` extra;
  WANDB_MODE=offline writes it under <workdir>/wandb/ without an account). Its id is derived from the workdir, so a
  resumed run continues the same W&B run."""
  if not cfg.train.wandb_project:
    return None
  try:
    import wandb
  except ImportError:
    raise UserError("train.wandb_project is set but wandb is not installed: pip install -e '.[wandb]' (or unset "
                    'train.wandb_project)') from None
  name = os.path.basename(os.path.normpath(workdir))
  rid = f'{name}-{hashlib.sha256(os.path.realpath(workdir).encode()).hexdigest()[:8]}'
  return wandb.init(project=cfg.train.wandb_project, name=name, id=rid, resume='allow', dir=workdir,
                    config=to_plain(cfg))


class Monitor:
  def __init__(self, workdir: str, cfg, mc, start: int, steps: int, tokens_per_step: int, flops_per_token: float,
               meta: dict):
    self.workdir, self.steps, self.tps, self.fpt = workdir, steps, tokens_per_step, flops_per_token
    self.primary = jax.process_index() == 0
    if self.primary:
      wd.truncate_metrics(workdir, start)  # rows a killed run wrote past its last checkpoint
    self.tb = _summary_writer(os.path.join(workdir, 'tb'), purge_step=start + 1 if start else None) \
        if self.primary else None
    self.wb = _wandb_run(cfg, workdir) if self.primary else None
    self.dtype, self.cpu = mc.dtype, jax.devices()[0].platform == 'cpu'
    self.peak, self.peak_measured = (cfg.train.peak_flops, False) if cfg.train.peak_flops else peak_flops(mc.dtype)
    self.best_val, self.best_step = meta.get('best_val_loss'), meta.get('best_step')
    self.bad_evals, self.tokens = meta.get('bad_evals', 0), meta.get('tokens_seen', 0)
    self.elapsed0 = meta.get('elapsed', 0.0)
    self.prev_eval = meta.get('prev_eval')  # (train_loss, val_loss) at the previous evaluation
    self.last_train = meta.get('last_train_loss')
    self.pending, self.rows_in = [], []  # per call (device); per step (host), not yet a row
    # what train_loss and val_loss average over: every token, or (chat) the assistant replies' tokens only
    self.loss_over = 'assistant_tokens' if cfg.data.format == 'chat' else 'all_tokens'
    self.since_eval = list(meta.get('since_eval', []))  # step losses since the last evaluation (the train loss
    # printed beside the next val loss: a run resumed between evaluations continues the same mean)
    self.t_run, self.t_flush, self.warm, self.step = time.time(), None, False, start
    self.last_row = {}
    self.bar = tqdm(total=steps, initial=start, desc='train', unit='step', dynamic_ncols=True, mininterval=0.5,
                    disable=None if self.primary else True)

  def _write(self, row: dict):
    if not self.primary:
      return
    row = {**row, 'wall_time': round(time.time(), 3)}  # unix seconds beside `time` (the run's elapsed seconds)
    if self.loss_over != 'all_tokens':  # (text runs' rows do not say it: theirs is over every token)
      row['loss_over'] = self.loss_over
    wd.append_metrics(self.workdir, row)
    scalars = {k: v for k, v in row.items() if k not in ('step', 'time', 'wall_time') and isinstance(v, (int, float))
               and math.isfinite(v)}
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, row['step'])
    if self.wb is not None:
      self.wb.log(scalars, step=row['step'])

  def record(self, step: int, m: dict):
    """One call's metrics (loss, grad_norm, lr): scalars, or [k] arrays for the k steps ending at `step`."""
    self.pending.append((step, m))
    self.bar.update(step - self.step)
    self.step = step

  def flush(self, log_every: int, final: bool) -> tuple[int, float] | None:
    """Fetches pending losses and writes one row per log_every steps; `final` also writes the steps since the
    last full row (at an eval, a checkpoint, the end or a stop). Returns (step, value) of the first non-finite
    loss. Unless final, the newest call is left pending: fetching it would wait for it, and the devices would
    idle while the host writes rows and prepares the next batches."""
    done, self.pending = (self.pending, []) if final else (self.pending[:-1], self.pending[-1:])
    got = jax.device_get([m for _, m in done])
    now = time.time()
    fetched = 0
    for (last, _), m in zip(done, got):
      ls, gs, lrs = (np.atleast_1d(m[k]).tolist() for k in ('loss', 'grad_norm', 'lr'))
      self.rows_in.extend(zip(range(last - len(ls) + 1, last + 1), ls, gs, lrs))
      fetched += len(ls)
    for s, lv, gv, _ in self.rows_in:
      if not (np.isfinite(lv) and np.isfinite(gv)):
        self.rows_in = []
        return s, lv if not np.isfinite(lv) else float('nan')
    if not fetched:
      return None
    rate = None
    if self.t_flush is not None and self.warm:  # the first interval holds compilation: no speed for it
      rate = fetched * self.tps / (now - self.t_flush)
    self.warm, self.t_flush = True, now
    rows, row, i = self.rows_in, None, 0
    while i < len(rows):
      j = i + 1  # a row ends at a multiple of log_every, or at the last step when final
      while j < len(rows) and rows[j - 1][0] % log_every:
        j += 1
      if rows[j - 1][0] % log_every and not final:
        break
      losses = [r[1] for r in rows[i:j]]
      self.tokens += (j - i) * self.tps
      self.since_eval += losses
      step = rows[j - 1][0]
      row = {'step': step, 'train_loss': float(np.mean(losses)), 'lr': rows[j - 1][3],
             'grad_norm': rows[j - 1][2], 'tokens_seen': self.tokens}
      if rate is not None:
        if self.peak_measured and self.cpu and rate * self.fpt > self.peak:  # the cached peak was timed under
          self.peak = store_peak_flops(self.dtype, rate * self.fpt)  # load: the CPU did more, so MFU stays <= 1
        row.update(tokens_per_s=rate, mfu=rate * self.fpt / self.peak)
      row['time'] = self.elapsed0 + now - self.t_run
      self._write(row)
      i = j
    self.rows_in = rows[i:]
    if row is None:
      return None
    self.last_train, self.last_row = row['train_loss'], row
    post = {'loss': f'{row["train_loss"]:.4f}', 'lr': f'{row["lr"]:.2e}'}
    if 'tokens_per_s' in row:
      post.update({'tok/s': f'{row["tokens_per_s"]:,.0f}', 'mfu': f'{100 * row["mfu"]:.1f}%'})
    self.bar.set_postfix(post, refresh=False)
    if self.primary:
      wd.update_run(self.workdir, **{'steps': self.steps, 'heartbeat': now, **row})
    return None

  def eval(self, step: int, val_loss: float, patience: int) -> bool:
    """Records a validation loss; True when early stopping should end the run."""
    train = float(np.mean(self.since_eval)) if self.since_eval else self.last_train
    self.since_eval = []
    improved = self.best_val is None or val_loss < self.best_val
    if improved:
      self.best_val, self.best_step, self.bad_evals = val_loss, step, 0
    else:
      self.bad_evals += 1
    msg = f'step {step}: train loss {train:.4f}, val loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50)):.2f})'
    if self.prev_eval and train is not None and val_loss > self.prev_eval[1] and train < self.prev_eval[0]:
      msg += ('\nwarning: val loss rose while train loss fell: the model may be overfitting '
              '(more data, dropout, weight decay, or early stopping with train.patience)')
    self.prev_eval = (train, val_loss)
    if self.primary:
      self.bar.write(msg)
    if self.t_flush is not None:  # the next row's tokens/s counts training time only
      self.t_flush = time.time()
    self._write({'step': step, 'val_loss': val_loss, 'val_ppl': math.exp(min(val_loss, 50)),
                 'best_val_loss': self.best_val, 'time': self.elapsed0 + time.time() - self.t_run})
    if patience and self.bad_evals >= patience:
      if self.primary:
        self.bar.write(f'early stopping: no val improvement in {patience} evaluations (best '
                       f'{self.best_val:.4f} at step {self.best_step})')
      return True
    return False

  def state(self) -> dict:
    """What a resumed run needs to continue monitoring exactly (stored in the checkpoint meta)."""
    return {'best_val_loss': self.best_val, 'best_step': self.best_step, 'bad_evals': self.bad_evals,
            'tokens_seen': self.tokens, 'elapsed': self.elapsed0 + time.time() - self.t_run,
            'prev_eval': self.prev_eval, 'last_train_loss': self.last_train,
            'since_eval': [float(x) for x in self.since_eval]}

  def abort(self):
    """Closes the bar, TensorBoard and W&B after an error (a full disk) without a summary."""
    self.bar.close()
    if self.tb is not None:
      self.tb.close()
    if self.wb is not None:
      self.wb.finish(exit_code=1)

  def close(self, status: str) -> dict:
    self.bar.close()
    if self.tb is not None:
      self.tb.close()
    if self.wb is not None:
      self.wb.summary['status'] = status
      self.wb.finish()
    if self.primary:
      wd.update_run(self.workdir, status=status, ended=time.time())
    return {'steps': self.step, 'best_val_loss': self.best_val if self.best_val is not None else float('nan'),
            'best_step': self.best_step, 'last_train_loss': self.last_train,
            'tokens_per_s': self.last_row.get('tokens_per_s')}
