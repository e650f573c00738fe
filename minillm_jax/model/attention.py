"""Causal self-attention kernels of the model: the dispatch per backend (accelerators: jax.nn's attention, on
cuDNN's flash attention where it applies; CPU: the C++ kernel of kernels/attention.py), the pure-JAX blockwise
CPU attention with a recomputing backward (no C++ compiler), and the attention over a KV cache for decoding.
Shape letters are the legend of minillm_jax.model.gpt."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from absl import logging

from minillm_jax.kernels import attention as cpu_attention


def attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH):
  """Causal self-attention, float32 logits and softmax. Accelerators use jax.nn.dot_product_attention
  (GQA-aware): cuDNN's fused flash attention where `accelerator_implementation` picks it (bfloat16 on an
  NVIDIA GPU), XLA's otherwise. On CPU, float32 takes the fused C++ kernel of cpu_attention: XLA:CPU has no
  fused attention, and the pure-JAX path below writes every score block to memory between its dots and the
  softmax, where the kernel keeps it in cache (BENCHMARKS.md, "Fused CPU attention"). Bfloat16 compute runs the same kernel on float32 copies of q, k, v: XLA:CPU's
  bfloat16 attention (the pure-JAX path) was the slower one even on AMX hosts (BENCHMARKS.md, "bfloat16
  compute on CPU"; "CPU kernels" for why no bfloat16 kernel remains)."""
  if jax.default_backend() != 'cpu':
    impl = accelerator_implementation(q_BxTxNxH, k_BxTxKxH)
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, is_causal=True, implementation=impl)
  if cpu_attention.available():
    f32 = lambda x: x.astype(jnp.float32)
    o = cpu_attention.causal_attention(f32(q_BxTxNxH), f32(k_BxTxKxH), f32(v_BxTxKxH))
    return o.astype(q_BxTxNxH.dtype)
  return blockwise_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)


def cudnn_eligible(platform: str, dtype, head_dim: int, compute_capability: str | None) -> bool:
  """Whether cuDNN's flash attention takes this causal self-attention (the checks of
  JAX's cuDNN fused-attention lowering for our case: no bias, no padding, causal mask): an NVIDIA GPU of
  compute capability 8.0 or later (Ampere; cuDNN's fused kernels start there), bfloat16 or float16 inputs
  (float32 has no cuDNN flash kernel), and a head dim that is a multiple of 8 up to 128 (256 from Hopper,
  9.0). `platform` is the backend's platform_version or device platform: 'cuda' must be in it (ROCm is not
  cuDNN)."""
  if 'cuda' not in platform.lower() or compute_capability is None:
    return False
  cc = tuple(int(x) for x in compute_capability.split('.')[:2])
  return (cc >= (8, 0) and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and head_dim % 8 == 0 and head_dim <= (256 if cc >= (9, 0) else 128))


def accelerator_implementation(q_BxTxNxH, k_BxSxKxH) -> str | None:
  """'cudnn' when cudnn_eligible and a standalone forward + backward of this shape traces and compiles on
  cuDNN (probed once per shape and dtype); None (XLA's attention) otherwise. A failure is logged once: some
  cuDNN builds refuse shapes or layouts the static checks accept, at compile time, where the train step
  itself could not catch it."""
  dev = jax.devices()[0]
  platform = f'{getattr(dev.client, "platform_version", "")} {dev.platform}'
  if not cudnn_eligible(platform, q_BxTxNxH.dtype, q_BxTxNxH.shape[-1], getattr(dev, 'compute_capability', None)):
    return None
  return 'cudnn' if _cudnn_compiles(tuple(q_BxTxNxH.shape), tuple(k_BxSxKxH.shape), jnp.dtype(q_BxTxNxH.dtype).name) else None


@functools.cache
def _cudnn_compiles(q_shape: tuple, k_shape: tuple, dtype: str) -> bool:
  def loss(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn').astype(jnp.float32).sum()
  args = [jax.ShapeDtypeStruct(s, dtype) for s in (q_shape, k_shape, k_shape)]
  try:
    jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile()
    return True
  except Exception as e:  # noqa: BLE001 - any refusal (trace, lowering, cuDNN graph build) means XLA's attention
    if not _warned:
      _warned.append(True)
      logging.warning('cuDNN flash attention unavailable for q %s, k %s %s (%s: %s); using XLA\'s attention',
                      q_shape, k_shape, dtype, type(e).__name__, ' '.join(str(e).split())[:200])
    return False


_warned: list = []  # cuDNN's refusal is logged once per process, not once per shape


def blockwise_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH):
  """The pure-JAX CPU attention (no C++ compiler for the fused kernel). Short sequences
  (T <= ATTN_BLOCK) are plain batched matmuls whose backward keeps the [T, T] probabilities (small there, so
  keeping them is cheaper than recomputing them); longer ones use the blockwise
  `causal_attention` with a recomputing backward."""
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxTxKxH.shape[2]
  if T <= ATTN_BLOCK:
    k_CxTxH, v_CxTxH = (x.transpose(0, 2, 1, 3).reshape(B * K, T, H) for x in (k_BxTxKxH, v_BxTxKxH))
    return _grouped_attention(q_BxTxNxH, k_CxTxH, v_CxTxH, jnp.tril(jnp.ones((T, T), bool)))
  q_BxKxGxTxH = q_BxTxNxH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
  kv = _materialized((k_BxTxKxH.transpose(0, 2, 1, 3), v_BxTxKxH.transpose(0, 2, 1, 3)), q_BxKxGxTxH)
  o_BxKxGxTxH = causal_attention(q_BxKxGxTxH, *kv)
  return o_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BxTxNxH.dtype)


def _materialized(xs, q):
  """xs written to memory once. Otherwise XLA:CPU fuses the k/v transpose (and RoPE) into each query block's
  key-prefix slice and recomputes it over the whole prefix, once per block; an optimization_barrier is
  dropped before fusion, and a cond with equal branches is simplified away. This cond's other branch is taken
  only when q is NaN, where it gives NaN as the attention would (BENCHMARKS.md, "Where the `tiny` step's time
  goes before the fused attention")."""
  q0 = q.reshape(-1)[0]
  return jax.lax.cond(~jnp.isnan(q0), lambda xs: xs, lambda xs: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), xs), xs)


def _bdot(a, b, b_contract: int, a_contract: int = 3):
  """Matmul batched over the leading (B, K) axes of 4-D a and b, float32 result."""
  return jax.lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((0, 1), (0, 1))),
                             preferred_element_type=jnp.float32)


def cached_attention(q_BxTxNxH, k_CxSxH, v_CxSxH, pos):
  """Queries at positions [pos, pos+T) against a cache laid out [C = B*K, S, H] whose [0, pos+T) is written.
  One batch axis with no unit dimensions: with [B, K, S, H] at batch 1, XLA:CPU copied every layer's cache on
  every decode step."""
  if cpu_attention.decode_supported(q_BxTxNxH, k_CxSxH):  # CPU float32 decode steps: the cache read in place
    return cpu_attention.decode_attention(q_BxTxNxH, k_CxSxH, v_CxSxH, pos)
  T, S = q_BxTxNxH.shape[1], k_CxSxH.shape[1]

  def upto(L):  # attention over the first L cache slots only
    return lambda: _grouped_attention(q_BxTxNxH, k_CxSxH[:, :L], v_CxSxH[:, :L],
                                      jnp.arange(L)[None, :] <= pos + jnp.arange(T)[:, None])

  # Decoding is bound by memory traffic, and the cache is read on every token: read only the shortest prefix
  # S/2^i (i < 5, at least 64 slots) that holds [0, pos+T); one switch branch runs (BENCHMARKS.md, "Where the
  # `tiny` step's time goes before the fused attention", decoding).
  Ls = sorted({max(T, S >> i) for i in range(5) if S >> i >= 64} | {S})
  return jax.lax.switch(jnp.sum(pos + T > jnp.array(Ls[:-1], jnp.int32)), [upto(L) for L in Ls])


def _grouped_attention(q_BxTxNxH, k_CxSxH, v_CxSxH, mask_TxS):
  """Softmax attention of q against keys/values laid out [C = B*K, S, H] (K kv heads, G = N/K queries each)."""
  B, T, N, H = q_BxTxNxH.shape
  C, S = k_CxSxH.shape[0], k_CxSxH.shape[1]
  K = C // B
  G = N // K
  q_CxGTxH = q_BxTxNxH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(C, G * T, H)
  s = jax.lax.dot_general(q_CxGTxH, k_CxSxH, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.float32)
  s = (s * (1.0 / math.sqrt(H))).reshape(C, G, T, S)
  s = jnp.where(mask_TxS, s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(v_CxSxH.dtype).reshape(C, G * T, S)
  o = jax.lax.dot_general(p, v_CxSxH, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
  return o.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BxTxNxH.dtype)


ATTN_BLOCK = 128  # query rows per block: measured fastest of 64/128/256 for T=1024 on CPU


def _causal_block(q_BxKxGxTxH, k_BxKxSxH, a: int, b: int):
  """Scaled scores of query rows [a, b) against keys [0, b) (the later keys are all masked), masked."""
  B, K, G, _, H = q_BxKxGxTxH.shape
  qb = q_BxKxGxTxH[:, :, :, a:b].reshape(B, K, G * (b - a), H)
  s = _bdot(qb, k_BxKxSxH[:, :, :b], 3).reshape(B, K, G, b - a, b) * (1.0 / math.sqrt(H))
  causal_nxb = jnp.arange(b)[None, :] <= jnp.arange(a, b)[:, None]
  return qb, s, causal_nxb


@jax.custom_vjp
def causal_attention(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH):
  """Causal attention in blocks of query rows, each against only the keys it can see (about half the work of
  a full T x T product), flash-style: the backward recomputes the probabilities from a saved logsumexp instead
  of keeping [T, T] per head alive, whose memory grows with T^2."""
  return _causal_fwd(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH)[0]


def _causal_fwd(q, k, v):
  B, K, G, T, H = q.shape
  outs, lses = [], []
  for a in range(0, T, ATTN_BLOCK):
    b = min(a + ATTN_BLOCK, T)
    _, s, causal = _causal_block(q, k, a, b)
    s = jnp.where(causal, s, -jnp.inf)
    m = s.max(-1, keepdims=True)
    e = jnp.exp(s - m)
    l = e.sum(-1, keepdims=True)
    o = _bdot(e.astype(v.dtype).reshape(B, K, G * (b - a), b), v[:, :, :b], 2).reshape(B, K, G, b - a, H)
    outs.append(o / l)  # normalising the [n, H] output, not the [n, b] probabilities
    lses.append(m + jnp.log(l))
  o = jnp.concatenate(outs, 3).astype(q.dtype)
  return o, (q, k, v, o, jnp.concatenate(lses, 3))


def _causal_bwd(res, do_BxKxGxTxH):
  q, k, v, o, lse = res
  B, K, G, T, H = q.shape
  do = do_BxKxGxTxH.astype(jnp.float32)
  delta = (do * o.astype(jnp.float32)).sum(-1, keepdims=True)  # rowsum(dO * O) = rowsum(P * dP)
  dqs, dks, dvs = [], [], []  # block i's dK, dV cover keys [0, b_i)
  for a in range(0, T, ATTN_BLOCK):
    b = min(a + ATTN_BLOCK, T)
    n = b - a
    qb, s, causal = _causal_block(q, k, a, b)
    p = jnp.where(causal, jnp.exp(s - lse[:, :, :, a:b]), 0.0)
    dob = do[:, :, :, a:b].reshape(B, K, G * n, H).astype(v.dtype)
    dp = _bdot(dob, v[:, :, :b], 3).reshape(B, K, G, n, b)
    ds = (p * (dp - delta[:, :, :, a:b]) * (1.0 / math.sqrt(H))).astype(q.dtype).reshape(B, K, G * n, b)
    dqs.append(_bdot(ds, k[:, :, :b], 2).reshape(B, K, G, n, H))
    dks.append(_bdot(ds, qb, 2, a_contract=2))
    dvs.append(_bdot(p.astype(v.dtype).reshape(B, K, G * n, b), dob, 2, a_contract=2))
  # Summed per key block, each from the query blocks that see it: one small fusion per block. Accumulating
  # with dk.at[:, :, :b].add rewrote the whole [B, K, T, H] buffer once per block (BENCHMARKS.md, "Where the
  # `tiny` step's time goes before the fused attention").
  def per_key_block(parts):
    return jnp.concatenate([sum(x[:, :, a:a + ATTN_BLOCK] for x in parts[a // ATTN_BLOCK:])
                            for a in range(0, T, ATTN_BLOCK)], 2)
  return jnp.concatenate(dqs, 3).astype(q.dtype), per_key_block(dks).astype(k.dtype), per_key_block(dvs).astype(v.dtype)


causal_attention.defvjp(_causal_fwd, _causal_bwd)
