"""Pre-flight checks of `train` that need nothing built yet: will the run fit in memory."""
from __future__ import annotations

import os

import jax

from minillm_jax.config import UserError


def available_memory() -> tuple[int, str] | None:
  """(bytes, where) a training process can still use: on CPU the lower of /proc/meminfo MemAvailable and the
  cgroup's room; on an accelerator device 0's memory limit. None when unknown."""
  if jax.default_backend() != 'cpu':
    stats = jax.local_devices()[0].memory_stats() or {}
    return (int(stats['bytes_limit']), f'{jax.local_devices()[0].device_kind} memory') \
        if 'bytes_limit' in stats else None
  got = []
  try:
    with open('/proc/meminfo') as f:
      got += [int(ln.split()[1]) * 1024 for ln in f if ln.startswith('MemAvailable:')]
  except (OSError, ValueError, IndexError):
    pass
  try:
    with open('/sys/fs/cgroup/memory.max') as f, open('/sys/fs/cgroup/memory.current') as g:
      limit = f.read().strip()
      if limit != 'max':
        got.append(int(limit) - int(g.read().strip()))
  except (OSError, ValueError):
    pass
  return (min(got), 'available memory') if got else None


def check_memory(cfg, n_params: int, n_devices: int = 1) -> None:
  """Refuses, before anything is built, a run that cannot fit: float32 weights, gradients and Adam's two moments
  (16 bytes a parameter; spread over the devices with FSDP) plus activations (about 16 float32 values per layer
  and token of a micro-batch: residual, attention and MLP intermediates kept for the backward pass). A rough
  estimate that errs low, so a refused run would certainly not fit. MINILLM_SKIP_MEMORY_CHECK=1 skips it."""
  if os.environ.get('MINILLM_SKIP_MEMORY_CHECK') == '1':
    return
  m, t = cfg.model, cfg.train
  state = 16 * n_params
  act = 4 * 16 * t.batch_size * m.block_size * m.d_model * m.n_layer
  per_dev = jax.default_backend() != 'cpu'  # a CPU's devices share one memory
  need = (state / n_devices if t.fsdp and per_dev else state) + (act / n_devices if per_dev else act)
  got = available_memory()
  if got is None or need <= got[0]:
    return
  gib = 2 ** 30
  raise UserError(f'this run needs about {need / gib:.1f} GiB ({n_params / 1e6:,.0f}M parameters x 16 bytes for '
                  f'weights, gradients and Adam state: {state / gib:.1f} GiB; activations: {act / gib:.1f} GiB) but '
                  f'{got[0] / gib:.1f} GiB of {got[1]} is free; lower model.n_layer, model.d_model or '
                  'train.batch_size (MINILLM_SKIP_MEMORY_CHECK=1 starts it anyway)')
