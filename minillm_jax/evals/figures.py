"""Figures: a run's training curves, and the checks and saving every figure of the project goes through.
matplotlib is imported where a figure is drawn (it costs a second of start-up)."""
from __future__ import annotations

import math
import os

from minillm_jax import workdir as wd
from minillm_jax.config import UserError


def curves(workdirs: list[str], out: str) -> str:
  """Train/val loss, val perplexity and LR of one or several runs on one figure; returns the path written."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 2, figsize=(12, 8))
  (ax_tr, ax_val), (ax_ppl, ax_lr) = axes
  for w in workdirs:
    rows = wd.read_metrics(w)
    if not rows:
      raise UserError(f'{w!r} has no metrics.jsonl rows; is it a run directory?')
    name = os.path.basename(os.path.normpath(w))
    if any(r.get('loss_over') == 'assistant_tokens' for r in rows):  # a chat fine-tune: the replies' loss only
      name += ' (assistant tokens)'
    tr = [r for r in rows if 'train_loss' in r]
    va = [r for r in rows if 'val_loss' in r]
    ax_tr.plot([r['step'] for r in tr], [r['train_loss'] for r in tr], label=name)
    ax_val.plot([r['step'] for r in va], [r['val_loss'] for r in va], marker='o', ms=3, label=name)
    ax_ppl.plot([r['step'] for r in va], [math.exp(min(r['val_loss'], 50)) for r in va], marker='o', ms=3, label=name)
    ax_lr.plot([r['step'] for r in tr], [r['lr'] for r in tr], label=name)
  for ax, title in ((ax_tr, 'train loss'), (ax_val, 'val loss'), (ax_ppl, 'val perplexity'), (ax_lr, 'learning rate')):
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend()
  ax_ppl.set_yscale('log')
  fig.tight_layout()
  return save_figure(fig, out)


def figure_path(out: str, flag: str = 'out') -> str:
  """The path a figure for --flag=out is written to (PNG when there is no extension); UserError when matplotlib
  cannot write that format or out is a directory. Cheap: callers check before long work."""
  from matplotlib.backend_bases import FigureCanvasBase
  if os.path.isdir(out):
    raise UserError(f'--{flag}={out} is a directory; give a file name such as {os.path.join(out, "curves.png")}')
  ext = os.path.splitext(out)[1].lstrip('.').lower()
  if not ext:
    return out + '.png'
  if ext not in FigureCanvasBase.get_supported_filetypes():
    raise UserError(f'--{flag}={out}: matplotlib cannot write .{ext}; use .png, .svg or .pdf')
  return out


def save_figure(fig, out: str, flag: str = 'out') -> str:
  """Saves to figure_path(out); returns the path actually written."""
  import matplotlib.pyplot as plt
  out = figure_path(out, flag)
  wd.fault('figure', out)  # test hook (workdir.fault), off by default
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out
