"""The framework-neutral model interface behind generate, chat and evaluate: tokenize, prefill, decode steps,
score. `JaxBackend` (the Flax model, jitted: inference.jax_backend) and `TorchBackend` (torch_compat's mirror:
inference.torch_backend) implement it; `inference.load.load()` builds either from a workdir, a .pt file or a
Hugging Face directory.

Decoding contract, shared by both backends so that their greedy outputs agree token for token:
- a batch of prompts of different lengths runs in one preallocated KV cache with one scalar position for all
  rows; the cache holds cache_len positions (a power of two from 64 up to `context` that fits the longest
  prompt plus budget). The prefill covers the shortest prompt; after it each step feeds, per row, its own
  prompt token while the row is still inside its prompt and the sampled token afterwards (what the Llama
  reference `generate` does). Every row then sees exactly its unpadded context: no padding mask, no
  per-row positions, and learned absolute positions stay right.
- per-row budgets and stop token ids end rows; the batch ends when all rows are done or the cache is full
  (only a cache of `context` positions fills before its rows' budgets end).
  `generate_ids` then keeps the newest half of each row and prefills again (learned positions cannot run
  past the table).
- sampling: repetition penalty over the last `repetition_window` tokens (prompt included), then temperature,
  top-k, top-p; temperature 0 is greedy (argmax after the penalty).
"""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from minillm_jax.config import UserError
from minillm_jax.data.tokenizer import CHAT, Tok


@dataclasses.dataclass(frozen=True)
class SampleParams:
  temperature: float = 0.8  # 0 = greedy
  top_k: int | None = None  # None or 0: off
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  repetition_window: int = 64

  @classmethod
  def from_config(cls, s) -> SampleParams:
    return cls(float(s.temperature), s.top_k, float(s.top_p), float(s.repetition_penalty),
               int(s.repetition_window))

  def check(self) -> SampleParams:
    """UserError naming the bad value; returns self when all are usable."""
    if not self.temperature >= 0:
      raise UserError(f'temperature={self.temperature} must be >= 0 (0 = greedy)')
    if self.top_k is not None and self.top_k < 0:
      raise UserError(f'top_k={self.top_k} must be >= 0 (0 = off)')
    if not 0 < self.top_p <= 1:
      raise UserError(f'top_p={self.top_p} must be in (0, 1]')
    if not self.repetition_penalty > 0:
      raise UserError(f'repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)')
    if not 1 <= self.repetition_window < 2 ** 31:
      raise UserError(f'repetition_window={self.repetition_window} must be in [1, 2^31)')
    return self


def is_instruction_tuned(meta: dict, tok: Tok | None) -> bool:
  """Chat template only when the checkpoint says so and the tokenizer has all the chat tokens."""
  return bool(meta.get('instruction_tuned')) and tok is not None and all(
      tok.token_to_id(t) is not None for t in CHAT)


class Backend(abc.ABC):
  """A loaded model plus tokenizer. Subclasses implement prefill/decode/poll/nll; the rest is shared."""
  name = 'base'
  weights = 'float32'  # how the matrices are stored (JaxBackend: WEIGHTS)

  def __init__(self, tok: Tok | None, meta: dict, context: int, source: str = ''):
    self.tok, self.meta, self.context, self.source = tok, dict(meta or {}), int(context), source
    self.step = meta.get('step') if meta else None

  @property
  def instruction_tuned(self) -> bool:
    return is_instruction_tuned(self.meta, self.tok)

  def describe(self) -> str:
    step = f' step {self.step}' if self.step is not None else ''
    dt = f', {self.weights} weights' if self.weights != 'float32' else ''
    return f'{self.source}{step} ({self.name} backend{dt}, context {self.context})'

  # -- the framework part --
  @abc.abstractmethod
  def prefill(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int], sp: SampleParams, seed: int,
              stop_ids: Sequence[int]) -> Any:
    """Decoding state after running the prompts (each 1..context-1 tokens) through the cache."""

  @abc.abstractmethod
  def decode(self, state: Any, n_steps: int) -> Any:
    """Runs up to n_steps decode steps (fewer when every row is done or the cache is full)."""

  @abc.abstractmethod
  def poll(self, state: Any) -> tuple[list[list[int]], list[bool], bool]:
    """(tokens generated per row since the prefill, row done flags, cache full)."""

  @abc.abstractmethod
  def nll(self, tokens_BxT: np.ndarray) -> np.ndarray:
    """Negative log-likelihood in nats [B, T-1] of tokens[:, 1:] given the tokens before them."""

  # -- shared --
  def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sp: SampleParams, seed: int = 0,
                   stop_ids: Sequence[int] = (), chunk: int | None = None) -> Iterator[list[list[int]]]:
    """Yields, after each decode call, every row's tokens generated since the previous yield (so a step costs
    what it adds, however long the generation): `chunk=1` streams token by token, None decodes to the end in
    one call. Concatenated, a row's yields are its whole continuation (a stop token ends its row and is
    included); complete_ids collects them. Prompts must fit (len < context); see crop()."""
    S = self.context
    rows = [list(p) for p in prompts]
    if any(not 0 < len(p) < S for p in rows):
      raise ValueError(f'prompts need 1..{S - 1} tokens; crop them first')
    counts = [0] * len(rows)  # tokens generated (and yielded) per row so far
    done = [max_new_tokens <= 0] * len(rows)
    restarts = 0
    while not all(done):
      budgets = [0 if d else max_new_tokens - n for d, n in zip(done, counts)]
      state = self.prefill(rows, budgets, sp, seed + restarts, stop_ids)
      since = [[] for _ in rows]  # per row: generated since this prefill (at most the context)
      while True:
        state = self.decode(state, chunk or S)
        new, row_done, full = self.poll(state)
        delta = []
        for i, n in enumerate(new):
          delta.append(list(n[len(since[i]):]))
          since[i] = n
          counts[i] += len(delta[i])
        done = [d or rd for d, rd in zip(done, row_done)]
        yield delta
        if all(done) or full:
          break
      # cache full: keep the newest half of each row (prompt tail + generated) and prefill again
      rows = [(r + list(g))[-(S // 2):] for r, g in zip(rows, since)]
      restarts += 1

  def complete_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sp: SampleParams, seed: int = 0,
                   stop_ids: Sequence[int] = ()) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    for delta in self.generate_ids(prompts, max_new_tokens, sp, seed, stop_ids):
      for o, d in zip(out, delta):
        o.extend(d)
    return out

  def crop(self, ids: Sequence[int], reserve: int = 1) -> tuple[list[int], int]:
    """(ids cut from the left to at most context - reserve tokens, number of tokens dropped)."""
    keep = max(1, self.context - max(1, reserve))
    ids = list(ids)
    return ids[-keep:], max(0, len(ids) - keep)


MIN_CACHE = 64


def pow2_at_least(n: int, lo: int = 1) -> int:
  """The smallest power of two (times lo, itself one) that is >= n: the padded sizes decoding compiles."""
  c = lo
  while c < n:
    c *= 2
  return c


def cache_len(prompts: Sequence[Sequence[int]], budgets: Sequence[int], context: int) -> int:
  """The KV cache a batch decodes in: the next power of two (at least MIN_CACHE) holding every row's prompt and
  budget, at most `context`. Each decode step reads every row's whole cache, so at a large batch a short
  request in a full-context cache would read mostly empty positions (BENCHMARKS.md, "Serving"); powers of two
  keep the compiled shapes few."""
  need = max(len(p) + max(0, int(b)) for p, b in zip(prompts, budgets))
  return min(pow2_at_least(need, MIN_CACHE), context)


def sp_arrays(sp: SampleParams, vocab: int) -> dict:
  """The sampling parameters as plain numbers, top_k 0 = off (both backends read this)."""
  return {'temperature': float(sp.temperature), 'top_k': int(min(sp.top_k or 0, vocab)), 'top_p': float(sp.top_p),
          'penalty': float(sp.repetition_penalty), 'window': int(sp.repetition_window)}


WEIGHTS = ('float32', 'bfloat16')  # how the JAX backend stores the matrices it decodes with


def check_weights(weights: str) -> str:
  if weights not in WEIGHTS:
    raise UserError(f'--weights={weights!r}: use {" or ".join(WEIGHTS)}')
  return weights
