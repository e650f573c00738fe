"""Batched decoding for the server: one thread owns the backend and decodes the waiting requests together.

Batch-level batching, not step-level: a backend's decoding state is one KV cache with one position shared by
all rows (inference.backend), so a row cannot join a batch that is running. The scheduler takes the oldest
waiting request, adds the waiting requests that decode alike (the same SampleParams and stop token ids: the
backend takes one of each per batch) in arrival order up to `max_batch` rows (a request with n > 1 is n rows
of its prompt), and decodes them to the end in chunks of `chunk` steps, handing each row's new text to its
request after every chunk. Its limit: a request that arrives while a batch runs waits for that whole batch
(up to its longest row), and requests with other sampling settings wait for their own batch. A sampled
request with a seed decodes alone (the backend draws one random stream for the whole batch; alone, the same
request gives the same text). Greedy rows ignore seeds and batch freely.

A row ends at its stop token, its stop string (TextStream) or its budget; rows whose request went away
(`Job.cancel`) are dropped, and the batch stops as soon as no row is left to serve. Batches are padded to a
power of two rows (copies of the shortest prompt with a budget of 0) so the jitted backend compiles a few
batch shapes rather than one per batch size.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import sys
import threading
import time
import traceback
from collections.abc import Callable

from minillm_jax.inference.backend import MIN_CACHE, Backend, SampleParams, pow2_at_least
from minillm_jax.inference.text import TextStream

# events a Job's emit receives, from the scheduler thread:
#   ('text', index, piece)                  new text of choice `index`
#   ('done', index, finish_reason, tokens)  choice `index` ended: 'stop' or 'length', tokens generated
#   ('error', message)                      the batch failed; no more events follow
Emit = Callable[[tuple], None]


class QueueFull(Exception):
  """More requests are waiting than the server takes (HTTP 429)."""


@dataclasses.dataclass(eq=False)
class Job:
  prompt_ids: list[int]
  max_tokens: int
  sp: SampleParams
  emit: Emit
  n: int = 1
  seed: int | None = None
  stop: tuple[str, ...] = ()
  stop_ids: tuple[int, ...] = ()
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

  def cancel(self) -> None:
    self.cancelled.set()

  def key(self) -> tuple:
    """Jobs with equal keys may share a batch."""
    seeded = self.seed is not None and self.sp.temperature > 0
    return (self.sp, self.stop_ids, ('alone', id(self)) if seeded else None)


def bucket(rows: int, max_batch: int) -> int:
  """The batch size a number of rows is padded to: the next power of two, at most max_batch."""
  return min(pow2_at_least(rows), max(rows, max_batch))


class Scheduler:
  def __init__(self, be: Backend, max_batch: int = 16, max_queue: int = 64, chunk: int = 4,
               wait_s: float = 0.01, seed: int = 0, log=None):
    self.be, self.max_batch, self.max_queue, self.chunk, self.wait_s = be, max_batch, max_queue, chunk, wait_s
    self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    self.seeds = itertools.count(seed)  # unseeded batches: a new seed each
    self.queue: collections.deque[Job] = collections.deque()
    self.cv = threading.Condition()
    self.stopping = False
    self.stats = {'requests': 0, 'batches': 0, 'rows': 0, 'max_rows_in_batch': 0, 'cancelled': 0,
                  'errors': 0, 'queued': 0, 'running': 0}
    self.thread = threading.Thread(target=self._loop, name='scheduler', daemon=True)

  def start(self) -> Scheduler:
    self.thread.start()
    return self

  def stop(self) -> None:
    with self.cv:
      self.stopping = True
      self.cv.notify_all()

  def submit(self, job: Job) -> None:
    with self.cv:
      if len(self.queue) >= self.max_queue:
        raise QueueFull(f'{len(self.queue)} requests are waiting (--max_queue={self.max_queue}); retry later')
      self.queue.append(job)
      self.stats['requests'] += 1
      self.stats['queued'] = len(self.queue)
      self.cv.notify()

  def _take(self) -> list[Job]:
    """The next batch: the oldest live job and the waiting jobs that share its key, up to max_batch rows."""
    with self.cv:
      while not self.stopping:
        while self.queue and self.queue[0].cancelled.is_set():
          self.queue.popleft()
          self.stats['cancelled'] += 1
        if self.queue:
          break
        self.cv.wait()
      if self.stopping:
        return []
    # Requests sent together arrive a few ms apart: wait while the queue still grows (a quiet gap of wait_s ends
    # it, as do max_batch rows or 10 gaps' time), so a burst becomes one batch rather than a small one and a
    # large one behind it. A lone request waits one gap.
    deadline, seen = time.monotonic() + 10 * self.wait_s, -1
    while time.monotonic() < deadline:
      with self.cv:
        n, rows = len(self.queue), sum(j.n for j in self.queue)
      if n == seen or rows >= self.max_batch:
        break
      seen = n
      time.sleep(self.wait_s)
    with self.cv:
      first = self.queue.popleft()
      batch, rows, key = [first], first.n, first.key()
      for job in list(self.queue):
        if job.key() == key and not job.cancelled.is_set() and rows + job.n <= self.max_batch:
          self.queue.remove(job)
          batch.append(job)
          rows += job.n
      self.stats['queued'] = len(self.queue)
    return batch

  def _loop(self) -> None:
    while True:
      jobs = self._take()
      if not jobs:
        return
      self.stats['running'] = sum(j.n for j in jobs)
      try:
        self.run_batch(jobs)
      except Exception as e:  # noqa: BLE001 - one failed batch must not stop the server
        self.stats['errors'] += 1
        self.log(f'batch failed: {traceback.format_exc()}')
        for job in jobs:
          job.emit(('error', f'{type(e).__name__}: {e}'))
      finally:
        self.stats['running'] = 0

  def run_batch(self, jobs: list[Job]) -> None:
    """Decodes the jobs as one batch (same key), emitting every row's text after each chunk of steps."""
    t0 = time.perf_counter()
    rows = [(job, i) for job in jobs for i in range(job.n)]
    first = jobs[0]
    B = bucket(len(rows), self.max_batch)
    shortest = min((job.prompt_ids for job in jobs), key=len)
    prompts = [job.prompt_ids for job, _ in rows] + [shortest] * (B - len(rows))
    budgets = [job.max_tokens for job, _ in rows] + [0] * (B - len(rows))
    seed = first.seed if first.key()[2] is not None else next(self.seeds)
    st = self.stats
    st['batches'] += 1
    st['rows'] += len(rows)
    st['max_rows_in_batch'] = max(st['max_rows_in_batch'], len(rows))
    streams = [TextStream(self.be, job.stop, job.stop_ids) for job, _ in rows]
    seen = [0] * len(rows)        # tokens of each row handled so far
    ended = [False] * len(rows)   # finished, or its job cancelled
    state = self.be.prefill(prompts, budgets, first.sp, seed, list(first.stop_ids))
    calls = 0
    while True:
      for r, (job, _) in enumerate(rows):
        if not ended[r] and job.cancelled.is_set():
          ended[r] = True
      if all(ended):
        break
      state = self.be.decode(state, self.chunk)
      calls += 1
      new, done, full = self.be.poll(state)
      for r, (job, i) in enumerate(rows):
        if ended[r]:
          continue
        ts, out = streams[r], []
        for t in new[r][seen[r]:]:
          seen[r] += 1
          out.append(ts.feed(t))
          if ts.stopped:
            break
        if not ts.stopped and (done[r] or full):
          out.append(ts.finish())
        piece = ''.join(out)
        if piece:
          job.emit(('text', i, piece))
        if ts.stopped or done[r] or full:
          ended[r] = True
          job.emit(('done', i, 'stop' if ts.stopped else 'length', seen[r]))
    gone = sum(job.cancelled.is_set() for job in jobs)
    st['cancelled'] += gone
    self.log(f'batch {st["batches"]}: {len(rows)} rows from {len(jobs)} requests (padded to {B}), '
             f'{sum(seen)} tokens, {calls} decode calls of {self.chunk} steps, {time.perf_counter() - t0:.2f}s'
             + (f', {gone} cancelled' if gone else ''))

  def warmup(self, all_sizes: bool = False) -> None:
    """Compiles the decoding of one row in the smallest cache (or of every padded batch size in every cache
    length, backend.cache_len, with every prefill chunk, jax_backend.prefill_chunk) now, before a request pays
    for it. Two decode calls: the jitted step compiles again for the state a first call returns."""
    sizes, lengths = [1], [min(MIN_CACHE, self.be.context)]
    while all_sizes and sizes[-1] < self.max_batch:
      sizes.append(bucket(sizes[-1] + 1, self.max_batch))
    while all_sizes and lengths[-1] < self.be.context:
      lengths.append(min(2 * lengths[-1], self.be.context))
    prompts = [1, 17, 33] if all_sizes else [1]  # one prompt length per prefill chunk (16, 32, 64)
    greedy = SampleParams(temperature=0.0)
    for b in sizes:
      for n in lengths:  # a prompt of p tokens with a budget of n - p decodes in a cache of n
        for p in (p for p in prompts if p < n):
          st = self.be.prefill([[self.be.tok.eot_id] * p] * b, [n - p] * b, greedy, 0, [])
          self.be.poll(self.be.decode(self.be.decode(st, 1), 1))
