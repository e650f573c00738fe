"""Jitted sampling with the model's KV cache: one prefill of the (padded) prompt, then one token per step
inside a lax.while_loop, all in a fixed-size cache buffer, so nothing recompiles per token or prompt length.

When the context fills up, the newest half of it is re-prefilled and decoding continues (learned absolute
positions cannot run past max_positions).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minillm_jax.model import GPT


@dataclasses.dataclass(frozen=True)
class SampleParams:
  temperature: float = 0.8  # 0 = greedy
  top_k: int | None = None
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  repetition_window: int = 64

  @classmethod
  def from_config(cls, s) -> 'SampleParams':
    return cls(float(s.temperature), s.top_k, float(s.top_p), float(s.repetition_penalty),
               int(s.repetition_window))


def process_logits(logits_BxV, recent_BxW, sp: SampleParams):
  """Repetition penalty (CTRL/HF rule: positive logits divided, negative multiplied) over the recent-token
  window (-1 = empty slot), then temperature, top-k and top-p (nucleus) filtering."""
  x = logits_BxV.astype(jnp.float32)
  if sp.repetition_penalty != 1.0:
    seen_BxV = jnp.zeros(x.shape, bool).at[jnp.arange(x.shape[0])[:, None], recent_BxW].max(recent_BxW >= 0)
    x = jnp.where(seen_BxV, jnp.where(x > 0, x / sp.repetition_penalty, x * sp.repetition_penalty), x)
  if sp.temperature == 0:
    return x
  x = x / sp.temperature
  if sp.top_k is not None and sp.top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, sp.top_k)[0][:, -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if sp.top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
    srt = jnp.sort(x, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
    n_keep = jnp.sum(cum - jax.nn.softmax(srt, axis=-1) < sp.top_p, axis=-1, keepdims=True)
    thresh = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
    x = jnp.where(x < thresh, -jnp.inf, x)
  return x


def pick(logits_BxV, recent_BxW, sp: SampleParams, key):
  x = process_logits(logits_BxV, recent_BxW, sp)
  if sp.temperature == 0:
    return jnp.argmax(x, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,))
def _prefill(gdef, params, tokens_BxS, length):
  model = nnx.merge(gdef, params)
  B, S = tokens_BxS.shape
  logits, cache = model.decode(tokens_BxS, model.init_cache(B, S), 0)
  return jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False), cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3, 6))
def _decode(gdef, sp: SampleParams, params, cache, logits_BxV, pos, out_BxN, n_done, n_max, recent_BxW, key):
  """Samples from logits_BxV, feeds the token back, repeats while pos < cache size and n_done < n_max."""
  model = nnx.merge(gdef, params)
  S = cache[0]['k'].shape[1]

  def cond(c):
    return (c[3] < n_max) & (c[2] < S)

  def body(c):
    cache, logits, pos, n, out, recent, key = c
    key, sub = jax.random.split(key)
    tok_B = pick(logits, recent, sp, sub)
    out = jax.lax.dynamic_update_slice_in_dim(out, tok_B[:, None], n, axis=1)
    recent = jnp.concatenate([recent[:, 1:], tok_B[:, None]], axis=1)
    logits, cache = model.decode(tok_B[:, None], cache, pos)
    return cache, logits[:, 0], pos + 1, n + 1, out, recent, key

  cache, logits, pos, n, out, recent, key = jax.lax.while_loop(
      cond, body, (cache, logits_BxV, pos, n_done, out_BxN, recent_BxW, key))
  return cache, logits, pos, n, out, recent, key


def generate(model: GPT, prompt: list[int], max_new_tokens: int, sp: SampleParams, seed: int = 0,
             num_samples: int = 1) -> np.ndarray:
  """Token ids [num_samples, max_new_tokens] continuing `prompt` (cropped from the left to the context)."""
  c = model.c
  S = c.max_positions
  gdef, params = nnx.split(model)
  prompt = list(prompt)[-(S - 1):] or [0]
  B, W = num_samples, sp.repetition_window
  recent = np.full((B, W), -1, np.int32)
  tail = prompt[-W:]
  recent[:, W - len(tail):] = tail
  out = jnp.zeros((B, max_new_tokens), jnp.int32)
  key, n, recent = jax.random.key(seed), 0, jnp.asarray(recent)
  prompt_BxP = np.tile(np.asarray(prompt, np.int32), (B, 1))
  ctx_BxL = prompt_BxP
  while True:
    L = ctx_BxL.shape[1]
    padded_BxS = np.zeros((B, S), np.int32)
    padded_BxS[:, :L] = ctx_BxL
    logits, cache = _prefill(gdef, params, jnp.asarray(padded_BxS), L)
    cache, logits, pos, n, out, recent, key = _decode(gdef, sp, params, cache, logits, jnp.int32(L), out,
                                                      jnp.int32(n), jnp.int32(max_new_tokens), recent, key)
    n = int(n)
    if n >= max_new_tokens:
      return np.asarray(out)
    # context full: keep the newest half (prompt tail + generated so far) and re-prefill
    ctx_BxL = np.concatenate([prompt_BxP, np.asarray(out)[:, :n]], axis=1)[:, -(S // 2):]


def print_sample(workdir: str, step: str | int = 'best') -> str:
  """Samples the run's checkpoint with its config's `sample` section; prints and appends to samples.txt."""
  from minillm_jax import checkpoint, config as config_lib
  from minillm_jax.tokenizer import Tok
  mc, model, tok_json, meta = checkpoint.load_for_inference(workdir, step)
  tok = Tok.from_json_str(tok_json)
  s = config_lib.from_plain(meta['config']).sample
  ids = generate(model, tok.encode(s.prompt) or [tok.eot_id or 0], s.max_new_tokens, SampleParams.from_config(s),
                 seed=s.seed)[0].tolist()
  text = s.prompt + tok.decode(ids)
  print(f'--- sample (step {meta["step"]}, val loss {meta.get("val_loss")}) ---\n{text}\n---', flush=True)
  import os
  with open(os.path.join(workdir, 'samples.txt'), 'a') as f:
    f.write(f'--- step {meta["step"]} ---\n{text}\n')
  return text
