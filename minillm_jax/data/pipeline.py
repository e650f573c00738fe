"""Grain input pipeline over the prepared token files.

Training draws windows of block_size + 1 tokens on a grid with stride block_size, shuffled every epoch (grain
MapDataset shuffle + repeat, seeded). Each epoch also shifts the whole grid by a seeded offset in
[0, block_size), so later epochs see other cut points while windows within an epoch stay disjoint. The order is
global: every process shuffles and batches all the windows alike (global batches of batch_size, drop_remainder)
and reads only its own rows of each batch (process p of n: rows [p*B/n, (p+1)*B/n)). So the global batches, and
the iterator state, are the same for any process count: a checkpoint resumes on another process count with the
same data. Optional mp_prefetch workers open the token file themselves (TokenFile pickles without data).

data.format=chat: the token files hold packed rows of block_size + 1 tokens (data.chat_data.pack) with a loss mask
beside them; a training window is one whole row (no grid shift: a row starts at a conversation's first token), and
batches carry 'mask' [B,T], the mask of the targets.

Resume: `it.get_state()` / `it.set_state(state)` (or grain.checkpoint.CheckpointSave/CheckpointRestore with
Orbax) continue with exactly the batches an uninterrupted iterator yields. The state is only valid for the same
pipeline settings (num_workers included: grain's state format depends on it), so it carries them and
set_state refuses a state made with other settings instead of silently yielding other data.
"""
from __future__ import annotations

import time
from typing import Any

import grain
import numpy as np

from minillm_jax.config import UserError
from minillm_jax.data.prepare import Prepared

Batch = dict[str, np.ndarray]  # {'inputs': int32 [B,T], 'targets': int32 [B,T]} (+ 'mask': uint8 [B,T])


class TokenFile:
  """A flat token file, memory-mapped on first access. Pickles as (path, dtype, n) so grain workers reopen
  the file instead of receiving a copy of it (a pickled np.memmap carries all its data)."""

  def __init__(self, path, dtype: np.dtype, n: int):
    self.path, self.dtype, self.n = str(path), np.dtype(dtype), int(n)
    self._mm = None

  @property
  def mm(self) -> np.ndarray:
    if self._mm is None:
      self._mm = np.memmap(self.path, dtype=self.dtype, mode='r', shape=(self.n,))
    return self._mm

  def __len__(self) -> int:
    return self.n

  def __getstate__(self):
    return {**self.__dict__, '_mm': None}


def grid(n_tokens: int, block_size: int) -> tuple[int, int]:
  """(windows per epoch, largest per-epoch shift). One window is given up for a full [0, T) shift range when
  the split holds two or more; with one window only the slack can shift it."""
  T = block_size
  if n_tokens < T + 1:
    return 0, 0
  n = (n_tokens - T) // T if n_tokens >= 2 * T + 1 else 1
  return n, min(T - 1, n_tokens - 1 - n * T)


class _Windows:
  """(batch index, window ids [B]) -> this process's rows of one global batch, read with one gather; each
  element's epoch (hence its grid shift) follows from its global index, so a batch may straddle two epochs."""

  def __init__(self, tokens: TokenFile, block_size: int, batch_size: int, per_epoch: int, max_shift: int,
               seed: int, rows: slice = slice(None)):
    self.tokens, self.T, self.B, self.per_epoch = tokens, block_size, batch_size, per_epoch
    self.max_shift, self.seed, self.rows = max_shift, seed, rows
    self._last = (-1, 0)  # (epoch, shift): a Generator per element would cost more than the window read

  def shift(self, epoch: int) -> int:
    last = self._last  # one read: grain's reader threads may replace it concurrently
    if last[0] != epoch:
      s = np.random.default_rng([self.seed, epoch, 0x5EED]).integers(0, self.max_shift + 1) if self.max_shift else 0
      last = self._last = (epoch, int(s))
    return last[1]

  def __call__(self, index: int, w_B: np.ndarray) -> Batch:
    epoch_B = ((index * self.B + np.arange(self.B)) // self.per_epoch)[self.rows]
    w_B = w_B[self.rows]
    start_B = w_B * self.T + np.array([self.shift(int(e)) for e in epoch_B])
    x_BxT1 = self.tokens.mm[start_B[:, None] + np.arange(self.T + 1)].astype(np.int32)
    return {'inputs': x_BxT1[:, :-1], 'targets': x_BxT1[:, 1:]}


class _Rows:
  """data.format=chat: (batch index, row ids [B]) -> one batch of whole packed rows and their targets' mask."""

  def __init__(self, tokens: TokenFile, masks: TokenFile, window: int, rows: slice = slice(None)):
    self.tokens, self.masks, self.W, self.rows = tokens, masks, window, rows

  def __call__(self, index: int, r_B: np.ndarray) -> Batch:
    r_B = r_B[self.rows]
    at_BxW = r_B[:, None] * self.W + np.arange(self.W)
    x_BxW = self.tokens.mm[at_BxW].astype(np.int32)
    return {'inputs': x_BxW[:, :-1], 'targets': x_BxW[:, 1:], 'mask': np.asarray(self.masks.mm[at_BxW][:, 1:])}


def _rows_of(prep: Prepared, block_size: int) -> int:
  if prep.window != block_size + 1:
    raise UserError(f'the chat token cache {prep.dir.name} is packed in windows of {prep.window} tokens, not '
                    f'model.block_size + 1 = {block_size + 1}; prepare it again with this config')
  return prep.n_train // prep.window


class _Tagged(grain.DatasetIterator):
  """Adds the pipeline settings to the grain state and checks them on restore."""

  def __init__(self, parent: grain.DatasetIterator, tag: dict):
    super().__init__(parent)
    self._tag = tag

  def __next__(self) -> Batch:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {'pipeline': dict(self._tag), 'grain': self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = state.get('pipeline') if isinstance(state, dict) else None
    if saved is None or 'grain' not in state:
      raise UserError('data iterator state is not from minillm_jax.data.train_iter (no pipeline settings)')
    diff = {k: (saved.get(k), v) for k, v in self._tag.items() if saved.get(k) != v}
    if diff:
      was = ', '.join(f'{k}={a}' for k, (a, _) in diff.items())
      now = ', '.join(f'{k}={b}' for k, (_, b) in diff.items())
      raise UserError(f'data iterator state was saved with {was} but this pipeline has {now}; resume with the '
                      'saved settings (the data order depends on them), or continue from these weights in a new '
                      'workdir with --config.train.init_from')
    self._parent.set_state(state['grain'])


def _flags_parsed():
  # mp_prefetch reads absl flags in the workers' setup; outside absl.app.run nobody has parsed them.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def train_iter(prep: Prepared, batch_size: int, block_size: int, seed: int, num_workers: int = 0,
               process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Endless iterator of this process's rows of global batches of `batch_size` windows: {'inputs', 'targets'}
  int32 [batch_size // process_count, block_size]."""
  if not 0 <= process_index < process_count:
    raise UserError(f'process_index={process_index} is not in [0, process_count={process_count})')
  if batch_size % process_count:
    raise UserError(f'train.batch_size={batch_size} must be divisible by the {process_count} processes')
  local = batch_size // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  tokens = TokenFile(prep.train_path, prep.dtype, prep.n_train)
  if prep.chat:
    n, read = _rows_of(prep, block_size), _Rows(tokens, TokenFile(prep.mask_path('train'), np.uint8, prep.n_train),
                                                prep.window, rows)
  else:
    n, max_shift = grid(prep.n_train, block_size)
  if n < batch_size:
    raise UserError(f'the train split ({prep.n_train} tokens) gives {n} windows of block_size+1='
                    f'{block_size + 1} tokens, fewer than batch_size={batch_size}; use more '
                    f'{"conversations" if prep.chat else "text"} or lower batch_size/block_size')
  if not prep.chat:
    read = _Windows(tokens, block_size, batch_size, n, max_shift, seed, rows)
  ds = (grain.MapDataset.range(n)
        .shuffle(seed=seed)
        .repeat(None)
        .batch(batch_size, drop_remainder=True, batch_fn=np.asarray)
        .map_with_index(read))
  # One reader thread a few batches ahead: the batch is ready when a step ends, and grain's default (16
  # threads, 500 elements) only adds GIL contention for a gather this small.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
  if num_workers > 0:
    _flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  # no process index or count: the state is the same on every process and for any count (states saved with
  # them, all single-process, still restore: only these keys are compared)
  tag = {'tokens': prep.dir.name, 'batch_size': batch_size, 'block_size': block_size, 'seed': seed,
         'num_workers': num_workers}
  if prep.chat:  # (only here, so the states of text runs saved before this key existed still restore)
    tag['mask'] = True
  return _Tagged(iter(it_ds), tag)


def val_batches(prep: Prepared, batch_size: int, block_size: int, n: int) -> list[Batch]:
  """A fixed set of n validation batches: n * batch_size windows evenly spaced over the val split (they
  overlap when the split is short), the same on every call and every process."""
  T = block_size
  if prep.chat:  # whole packed rows, evenly spaced (repeated when the split has fewer than n * batch_size)
    _rows_of(prep, block_size)  # checks the window
    W, rows = prep.window, prep.n_val // prep.window
    r = np.linspace(0, rows - 1, n * batch_size).round().astype(np.int64)
    at = r[:, None] * W + np.arange(W)
    x = prep.tokens('val')[at].astype(np.int32).reshape(n, batch_size, W)
    m = np.asarray(prep.masks('val')[at]).reshape(n, batch_size, W)
    return [{'inputs': b[:, :-1], 'targets': b[:, 1:], 'mask': k[:, 1:]} for b, k in zip(x, m)]
  if prep.n_val < T + 1:
    raise UserError(f'the val split has {prep.n_val} tokens, fewer than block_size + 1 = {T + 1}; raise '
                    'data.val_fraction, use more text or lower model.block_size')
  tokens = prep.tokens('val')
  starts = np.linspace(0, prep.n_val - T - 1, n * batch_size).round().astype(np.int64)
  x = np.stack([tokens[s:s + T + 1] for s in starts]).astype(np.int32)
  x = x.reshape(n, batch_size, T + 1)
  return [{'inputs': b[:, :-1], 'targets': b[:, 1:]} for b in x]


def measure_throughput(prep: Prepared, batch_size: int, block_size: int, num_workers: int = 0,
                       n_batches: int = 200, seed: int = 0) -> float:
  """Batches per second the training pipeline delivers (after the first batch: worker start-up excluded)."""
  it = train_iter(prep, batch_size, block_size, seed, num_workers)
  try:
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
      next(it)
    return n_batches / (time.perf_counter() - t0)
  finally:
    it.close()
