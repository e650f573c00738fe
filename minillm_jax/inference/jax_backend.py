"""The JAX side of the backend interface: `JaxBackend`, jitted sampling with the model's KV cache (the decoding
contract is in inference.backend's docstring).

Compiled functions per (batch, cache length) shape (backend.cache_len: a few powers of two), and nothing per
sampling setting: `_prefill` runs the shortest prompt through the cache in chunks of 16, 32 or CHUNK tokens
(prefill_chunk: three shapes, not one per prompt length; a while_loop over chunks at a traced position), `_run`
samples and feeds one token per iteration of a lax.while_loop until a step limit, every row done, or a full
cache. Sampling parameters are traced values, so chat's /temp does not recompile, and streaming (step limit 1)
runs the very computation a full decode runs.

Also here: `generate` (a batch of samples of one prompt) and `measure_decode` / `measure_naive` for bench.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minillm_jax.data.tokenizer import Tok
from minillm_jax.inference.backend import (
  Backend,
  SampleParams,
  cache_len,
  check_weights,
  pow2_at_least,
  sp_arrays,
)
from minillm_jax.kernels import matmul as cpu_matmul
from minillm_jax.model import GPT

CHUNK = 64        # largest prefill chunk (tokens); positions past the prompt in the last chunk are rewritten later
MAX_STOP_IDS = 8  # stop ids are padded to this many, so their count never changes a shape


def process_logits(logits_BxV, seq_BxS, pos, sp: dict):
  """Repetition penalty (CTRL/HF rule: positive logits divided, negative multiplied) over the tokens at
  positions [pos - window, pos) of seq, then temperature, top-k and top-p (the smallest set of tokens whose
  probability reaches top_p). `sp` holds traced scalars (see backend.sp_arrays); top_k 0 = off."""
  x = logits_BxV.astype(jnp.float32)
  B, V = x.shape
  S = seq_BxS.shape[1]

  def penalize(x):
    ar = jnp.arange(S)
    in_win = (ar >= pos - sp['window']) & (ar < pos)
    seen_BxV = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], seq_BxS].max(jnp.broadcast_to(in_win, (B, S)))
    p = sp['penalty']
    return jnp.where(seen_BxV, jnp.where(x > 0, x / p, x * p), x)

  x = jax.lax.cond(sp['penalty'] != 1.0, penalize, lambda x: x, x)
  t = sp['temperature']
  x = jnp.where(t > 0, x / jnp.where(t > 0, t, 1.0), x)
  k = jnp.where((sp['top_k'] > 0) & (sp['top_k'] < V), sp['top_k'], V)

  def filt(x):  # one descending sort serves both top-k and top-p
    srt = -jnp.sort(-x, axis=-1)
    srt = jnp.where(jnp.arange(V) < k, srt, -jnp.inf)
    probs = jax.nn.softmax(srt, axis=-1)
    n_keep = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < sp['top_p'], axis=-1, keepdims=True)
    thresh = jnp.take_along_axis(srt, jnp.clip(n_keep, 1, k) - 1, axis=-1)
    return jnp.where(x < thresh, -jnp.inf, x)

  return jax.lax.cond((t > 0) & ((k < V) | (sp['top_p'] < 1.0)), filt, lambda x: x, x)


def bf16_weights(params: nnx.State, tied: bool) -> nnx.State:
  """`params` with every matrix the matmuls read (the Dense kernels, and the embedding when the head is tied to
  it) stored in bfloat16: the model still computes in float32 (model.project), on weights rounded to bfloat16.
  Batch-1 decoding reads every weight once per token, so this halves its bytes (BENCHMARKS.md, "bfloat16
  decode weights")."""
  def cast(path, x):
    name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]  # (the path ends in .value)
    hit = x.ndim == 2 and x.dtype == jnp.float32 and (name == 'kernel' or (tied and name == 'wte'))
    return x.astype(jnp.bfloat16) if hit else x
  return jax.tree.map_with_path(cast, params)


def pick(logits_BxV, seq_BxS, pos, sp: dict, key):
  x = process_logits(logits_BxV, seq_BxS, pos, sp)
  # a cond, not a where: a greedy step then skips drawing the Gumbel noise of categorical (BENCHMARKS.md,
  # "Where the `tiny` step's time goes before the fused attention", decoding)
  return jax.lax.cond(sp['temperature'] > 0, lambda x: jax.random.categorical(key, x, axis=-1).astype(jnp.int32),
                      lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), x)


def prefill_chunk(n_pre: int, S: int) -> int:
  """The prefill's chunk: the smallest of 16, 32, CHUNK tokens covering the shortest prompt (CHUNK for longer
  ones), at most the cache. A whole chunk is computed however little of it the prompt fills, so a 32-token
  prompt in a 64-token chunk would cost twice its tokens (BENCHMARKS.md, "Serving"); three sizes keep the
  compiled shapes few."""
  return min(pow2_at_least(min(n_pre, CHUNK), 16), S)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill(gdef, params, seq_BxS, n_pre, chunk_len: int):
  """Runs positions [0, n_pre) in chunk_len-token chunks; returns the logits at n_pre - 1 and the cache."""
  model = nnx.merge(gdef, params)
  B, S = seq_BxS.shape
  cache = model.init_cache(B, S)
  logits0 = jnp.zeros((B, model.c.vocab_size), jnp.float32)

  def body(c):
    i, cache, last = c
    # the last chunk slides back inside the buffer; rewrites are identical
    start = jnp.minimum(i * chunk_len, S - chunk_len)
    chunk = jax.lax.dynamic_slice_in_dim(seq_BxS, start, chunk_len, axis=1)
    logits, cache = model.decode(chunk, cache, start)
    j = n_pre - 1 - start
    row = jax.lax.dynamic_index_in_dim(logits, jnp.clip(j, 0, chunk_len - 1), axis=1, keepdims=False)
    return i + 1, cache, jnp.where((j >= 0) & (j < chunk_len), row, last)

  _, cache, last = jax.lax.while_loop(lambda c: c[0] * chunk_len < n_pre, body,
                                      (jnp.int32(0), cache, logits0))
  return last, cache


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _run(gdef, params, st: dict, n_steps):
  model = nnx.merge(gdef, params)
  S = st['seq'].shape[1]
  limit = st['pos'] + n_steps

  def cond(st):
    return (st['pos'] < jnp.minimum(limit, S)) & ~jnp.all(st['done'])

  def body(st):
    st = dict(st)
    pos = st['pos']
    key, sub = jax.random.split(st['key'])
    sampled = pick(st['logits'], st['seq'], pos, st['sp'], sub)
    in_prompt = pos < st['plen']
    tok = jnp.where(in_prompt, jax.lax.dynamic_index_in_dim(st['seq'], pos, 1, keepdims=False), sampled)
    new = ~in_prompt & ~st['done']
    st['seq'] = jax.lax.dynamic_update_slice_in_dim(st['seq'], tok[:, None], pos, axis=1)
    st['n'] = st['n'] + new
    st['budget'] = st['budget'] - new
    hit = jnp.any(tok[:, None] == st['stop'][None, :], axis=-1)
    st['done'] = st['done'] | (new & (hit | (st['budget'] <= 0)))
    with cpu_matmul.decoding():
      logits, st['cache'] = model.decode(tok[:, None], st['cache'], pos)
    st['logits'], st['pos'], st['key'] = logits[:, 0], pos + 1, key
    return st

  return jax.lax.while_loop(cond, body, st)


def start(gdef, params, prompts: Sequence[Sequence[int]], budgets: Sequence[int], sp: dict, seed: int,
          stop_ids: Sequence[int], context: int) -> dict:
  """Decoding state after the prefill (see backend.Backend.prefill), in a cache of cache_len positions."""
  B, S = len(prompts), cache_len(prompts, budgets, context)
  seq = np.zeros((B, S), np.int32)
  for b, p in enumerate(prompts):
    seq[b, :len(p)] = p
  plen = np.array([len(p) for p in prompts], np.int32)
  stop = np.full((MAX_STOP_IDS,), -1, np.int32)
  stop_ids = list(stop_ids)[:MAX_STOP_IDS]
  stop[:len(stop_ids)] = stop_ids
  seq_j = jnp.asarray(seq)
  n_pre = int(plen.min())
  logits, cache = _prefill(gdef, params, seq_j, jnp.int32(n_pre), prefill_chunk(n_pre, S))
  budget = jnp.asarray(np.asarray(budgets, np.int32))
  return {'cache': cache, 'seq': seq_j, 'plen': jnp.asarray(plen), 'pos': jnp.int32(n_pre), 'logits': logits,
          'n': jnp.zeros((B,), jnp.int32), 'budget': budget, 'done': budget <= 0, 'stop': jnp.asarray(stop),
          'key': jax.random.key(seed),
          'sp': {'temperature': jnp.float32(sp['temperature']), 'top_k': jnp.int32(sp['top_k']),
                 'top_p': jnp.float32(sp['top_p']), 'penalty': jnp.float32(sp['penalty']),
                 'window': jnp.int32(sp['window'])}}


def run(gdef, params, st: dict, n_steps: int) -> dict:
  return _run(gdef, params, st, jnp.int32(min(n_steps, 2**30)))


def poll(st: dict) -> tuple[list[list[int]], list[bool], bool]:
  seq, plen, n = np.asarray(st['seq']), np.asarray(st['plen']), np.asarray(st['n'])
  new = [seq[b, plen[b]:plen[b] + n[b]].tolist() for b in range(seq.shape[0])]
  return new, np.asarray(st['done']).tolist(), int(st['pos']) >= seq.shape[1]


@functools.partial(jax.jit, static_argnums=(0,))
def _nll(gdef, params, tokens_BxT):
  model = nnx.merge(gdef, params)
  logp = jax.nn.log_softmax(model(tokens_BxT[:, :-1]), axis=-1)
  return -jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)[..., 0]


def nll(gdef, params, tokens_BxT) -> np.ndarray:
  return np.asarray(_nll(gdef, params, jnp.asarray(tokens_BxT, jnp.int32)))


class JaxBackend(Backend):
  name = 'jax'

  def __init__(self, model, tok: Tok | None = None, meta: dict | None = None, source: str = '',
               weights: str = 'float32'):
    super().__init__(tok, meta or {}, model.c.block_size, source)
    self.model = model
    self.gdef, self.params = nnx.split(model)
    self.vocab = model.c.vocab_size
    self.weights = check_weights(weights)
    if weights == 'bfloat16':
      self.params = bf16_weights(self.params, model.c.tie_embeddings)

  def prefill(self, prompts, budgets, sp, seed, stop_ids):
    return start(self.gdef, self.params, prompts, budgets, sp_arrays(sp, self.vocab), seed, stop_ids,
                        self.context)

  def decode(self, state, n_steps):
    return run(self.gdef, self.params, state, n_steps)

  def poll(self, state):
    return poll(state)

  def nll(self, tokens_BxT):
    return nll(self.gdef, self.params, tokens_BxT)


def generate(model: GPT, prompt: list[int], max_new_tokens: int, sp: SampleParams, seed: int = 0,
             num_samples: int = 1, weights: str = 'float32') -> np.ndarray:
  """Token ids [num_samples, max_new_tokens] continuing `prompt` (cropped from the left to the context)."""
  be = JaxBackend(model, weights=weights)
  ids, _ = be.crop(list(prompt) or [0])
  out = be.complete_ids([ids] * num_samples, max_new_tokens, sp, seed)
  return np.asarray(out, np.int32).reshape(num_samples, max_new_tokens)


# ---------------------------------------------------------------------------------------------- bench

def _prompts(model: GPT, batch: int, prompt_len: int, seed: int) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return rng.integers(0, model.c.vocab_size, (batch, prompt_len)).tolist()


def measure_decode(model: GPT, batch: int, prompt_len: int, new_tokens: int, seed: int = 0,
                   repeats: int = 1, weights: str = 'float32') -> dict:
  """KV-cache decoding speed, greedy, compile excluded (one warm-up). ttft_s: prefill plus the first sampled
  token; tokens_per_s: batch * (new_tokens - 1) / the time of the remaining steps (best of `repeats`)."""
  if prompt_len + new_tokens > model.c.block_size:
    raise ValueError(f'prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the context '
                     f'{model.c.block_size}')
  be = JaxBackend(model, weights=weights)
  prompts = _prompts(model, batch, prompt_len, seed)
  sp = sp_arrays(SampleParams(temperature=0.0), model.c.vocab_size)

  def once():
    t0 = time.perf_counter()
    st = start(be.gdef, be.params, prompts, [new_tokens] * batch, sp, seed, (), be.context)
    st = run(be.gdef, be.params, st, 1)
    jax.block_until_ready(st['seq'])
    t1 = time.perf_counter()
    st = run(be.gdef, be.params, st, new_tokens)
    jax.block_until_ready(st['seq'])
    t2 = time.perf_counter()
    assert int(np.asarray(st['n']).min()) == new_tokens
    return t1 - t0, t2 - t1

  t0 = time.perf_counter()
  once()
  compile_s = time.perf_counter() - t0
  runs = [once() for _ in range(max(1, repeats))]
  ttft, rest = min(r[0] for r in runs), min(r[1] for r in runs)
  return {'method': 'kv_cache', 'batch': batch, 'prompt_len': prompt_len, 'new_tokens': new_tokens,
          'ttft_s': ttft, 'decode_s': rest, 'total_s': ttft + rest, 'first_call_s': compile_s,
          'tokens_per_s': batch * (new_tokens - 1) / rest, 'ms_per_step': 1e3 * rest / max(1, new_tokens - 1)}


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _naive_steps(gdef, params, buf_BxS, pos, n):
  """The naive way: the full forward over the whole (fixed-size) buffer for every new token, greedy."""
  model = nnx.merge(gdef, params)

  def body(i, buf):
    p = pos + i
    logits = model(buf)
    nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, p - 1, axis=1, keepdims=False), axis=-1)
    return jax.lax.dynamic_update_slice_in_dim(buf, nxt.astype(buf.dtype)[:, None], p, axis=1)

  return jax.lax.fori_loop(0, n, body, buf_BxS)


def measure_naive(model: GPT, batch: int, prompt_len: int, new_tokens: int, seed: int = 0,
                  timed_tokens: int | None = None) -> dict:
  """Re-running the full forward per token on a fixed [batch, prompt_len + new_tokens] buffer (one compile;
  causal attention keeps the padding from changing earlier logits). Every step costs the same, so only
  `timed_tokens` steps (default all) are timed and tokens/s extrapolates exactly; ttft_s is one step."""
  S = prompt_len + new_tokens
  if S > model.c.block_size:
    raise ValueError(f'prompt_len + new_tokens = {S} exceeds the context {model.c.block_size}')
  gdef, params = nnx.split(model)
  n = min(timed_tokens or new_tokens, new_tokens)
  buf = np.zeros((batch, S), np.int32)
  buf[:, :prompt_len] = _prompts(model, batch, prompt_len, seed)
  t0 = time.perf_counter()
  jax.block_until_ready(_naive_steps(gdef, params, jnp.asarray(buf), jnp.int32(prompt_len), jnp.int32(1)))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(_naive_steps(gdef, params, jnp.asarray(buf), jnp.int32(prompt_len), jnp.int32(1)))
  ttft = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(_naive_steps(gdef, params, jnp.asarray(buf), jnp.int32(prompt_len), jnp.int32(n)))
  dt = time.perf_counter() - t0
  return {'method': 'naive_full_forward', 'batch': batch, 'prompt_len': prompt_len, 'new_tokens': new_tokens,
          'timed_tokens': n, 'ttft_s': ttft, 'decode_s': dt * new_tokens / n, 'first_call_s': compile_s,
          'tokens_per_s': batch * n / dt, 'ms_per_step': 1e3 * dt / n}
