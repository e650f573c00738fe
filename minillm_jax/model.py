"""The GPT model family (GPT-2 style and Llama style) in Flax NNX, one definition configured by ModelConfig.

Layout choices that matter for speed (measured, see PERF_NOTES): every dense layer is a 2-D matmul on
[B*T, D], and `mm` feeds bf16 operands with float32 accumulation in forward and backward (AMX on CPU,
tensor cores on GPU). Parameters and the residual stream stay float32; norms, softmax and logits are float32.

Run `python -m minillm_jax.model --config=configs/tiny.py` for a preset's parameter count and FLOPs per token.
"""
from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from minillm_jax import cpu_attention
from minillm_jax.config import ModelConfig

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
Cache = list  # one {'k': [B*K,S,H], 'v': [B*K,S,H]} dict per layer


def _dot(a, b):
  return jax.lax.dot(a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def mm(a_NxD: jax.Array, b_DxF: jax.Array) -> jax.Array:
  """a @ b with float32 accumulation and a float32 result, whatever the operand dtype."""
  return _dot(a_NxD, b_DxF)


def _mm_fwd(a, b):
  return _dot(a, b), (a, b)


def _mm_bwd(res, g_NxF):
  # Both gradient matmuls in canonical (row-major, untransposed) form with the operand dtype, so XLA:CPU
  # picks its fast (AMX for bf16) kernels instead of a transposing dot.
  a, b = res
  g = g_NxF.astype(a.dtype)
  return _dot(g, b.T).astype(a.dtype), _dot(a.T, g).astype(b.dtype)


mm.defvjp(_mm_fwd, _mm_bwd)


def _normal(rngs: nnx.Rngs, shape, std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


def dropout(x, rate: float, key):
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Dense(nnx.Module):
  def __init__(self, d_in: int, d_out: int, bias: bool, std: float, rngs: nnx.Rngs):
    self.kernel = _normal(rngs, (d_in, d_out), std)
    self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32)) if bias else None

  def __call__(self, x_NxD, dtype) -> jax.Array:
    y_NxF = mm(x_NxD.astype(dtype), self.kernel[...].astype(dtype))
    return y_NxF + self.bias[...] if self.bias is not None else y_NxF


class Norm(nnx.Module):
  """LayerNorm (optional bias) or RMSNorm, computed in float32."""

  def __init__(self, d: int, kind: str, bias: bool, eps: float):
    self.kind, self.eps = kind, eps
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((d,), jnp.float32)) if (bias and kind == 'layernorm') else None

  def __call__(self, x_NxD) -> jax.Array:
    x = normalize(x_NxD.astype(jnp.float32), self.scale[...], self.eps, self.kind == 'layernorm')
    return x + self.bias[...] if self.bias is not None else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def normalize(x_NxD, scale_D, eps: float, center: bool):
  """(x - mean if center) * rsqrt(mean square + eps) * scale, with the textbook backward: two row reductions
  and one elementwise pass over the saved x_hat. XLA's autodiff of the forward made more passes and cost 1.2-1.8x
  as much (13 norms of a `tiny` step: 440-580 ms against 320-530)."""
  return _normalize_fwd(x_NxD, scale_D, eps, center)[0]


def _normalize_fwd(x, scale, eps, center):
  if center:
    x = x - x.mean(-1, keepdims=True)
  r = jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps)
  xh = x * r
  return xh * scale, (xh, r, scale)


def _normalize_bwd(eps, center, res, g):
  xh, r, scale = res
  gs = g * scale
  dx = gs - (gs * xh).mean(-1, keepdims=True) * xh
  if center:
    dx = dx - gs.mean(-1, keepdims=True)
  return dx * r, (g * xh).reshape(-1, xh.shape[-1]).sum(0)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


def rope_tables(pos_T: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin [T, H] for the rotate-half convention (the one HF Llama/GPT-NeoX weights use)."""
  inv = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  f_TxH2 = pos_T.astype(jnp.float32)[:, None] * inv[None, :]
  f_TxH = jnp.concatenate([f_TxH2, f_TxH2], axis=-1)
  return jnp.cos(f_TxH), jnp.sin(f_TxH)


def apply_rope(x_BxTxNxH, cos_TxH, sin_TxH):
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rot = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos_TxH[:, None, :] + rot * sin_TxH[:, None, :]).astype(x_BxTxNxH.dtype)


class Attention(nnx.Module):
  def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
    self.c = c
    hd = c.head_dim
    self.qkv = Dense(c.d_model, (c.n_head + 2 * c.n_kv_head) * hd, c.bias, c.init_std, rngs)
    self.proj = Dense(c.n_head * hd, c.d_model, c.bias, c.init_std / math.sqrt(2 * c.n_layer), rngs)

  def __call__(self, x_NxD, B: int, T: int, rope, cache: dict | None, pos, key) -> tuple[jax.Array, dict | None]:
    c, dt = self.c, DTYPES[self.c.dtype]
    N, K, H = c.n_head, c.n_kv_head, c.head_dim
    qkv = self.qkv(x_NxD, dt).astype(dt).reshape(B, T, N + 2 * K, H)
    q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = qkv[:, :, :N], qkv[:, :, N:N + K], qkv[:, :, N + K:]
    if rope is not None:
      q_BxTxNxH, k_BxTxKxH = apply_rope(q_BxTxNxH, *rope), apply_rope(k_BxTxKxH, *rope)
    if cache is not None:  # write this chunk at [pos, pos+T) of the preallocated cache, attend to [0, pos+T)
      cache = {n: jax.lax.dynamic_update_slice(
                   cache[n], x.transpose(0, 2, 1, 3).reshape(B * K, T, H).astype(cache[n].dtype), (0, pos, 0))
               for n, x in (('k', k_BxTxKxH), ('v', v_BxTxKxH))}
      o_BxTxNxH = cached_attention(q_BxTxNxH, cache['k'].astype(dt), cache['v'].astype(dt), pos)
    elif key is not None and c.dropout > 0:
      o_BxTxNxH = _attention_with_dropout(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, c.dropout, key)
    else:
      o_BxTxNxH = attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
    return self.proj(o_BxTxNxH.reshape(B * T, N * H), dt), cache


def attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH):
  """Causal self-attention, float32 logits and softmax. Accelerators use jax.nn.dot_product_attention
  (GQA-aware; implementation='cudnn' can be plugged in there for flash attention). On CPU, float32 takes the
  fused C++ kernel of cpu_attention (tiny, T=1024, one layer forward and backward: 256 ms against 540 ms for
  the pure-JAX path below and about 300 ms for torch's SDPA; shakespeare_char: 1.6 against 5.2 ms)."""
  if jax.default_backend() != 'cpu':
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, is_causal=True)
  if cpu_attention.supported(q_BxTxNxH):
    return cpu_attention.causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
  return blockwise_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)


def blockwise_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH):
  """The pure-JAX CPU attention (bfloat16 compute, or no C++ compiler for the fused kernel). Short sequences
  (T <= ATTN_BLOCK) are plain batched matmuls whose backward keeps the [T, T] probabilities (small there, and
  5-10% faster per shakespeare_char step than recomputing them); longer ones use the blockwise
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
  key-prefix slice and recomputes it over the prefix, 4.5x in all (1.25 s of a 13 s `tiny` step); an
  optimization_barrier is dropped before fusion, and a cond with equal branches is simplified away. This cond's
  other branch is taken only when q is NaN, where it gives NaN as the attention would (10 interleaved step pairs:
  8 faster, median ratio 0.89-0.91)."""
  q0 = q.reshape(-1)[0]
  return jax.lax.cond(~jnp.isnan(q0), lambda xs: xs, lambda xs: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), xs), xs)


def _bdot(a, b, b_contract: int, a_contract: int = 3):
  """Matmul batched over the leading (B, K) axes of 4-D a and b, float32 result."""
  return jax.lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((0, 1), (0, 1))),
                             preferred_element_type=jnp.float32)


def cached_attention(q_BxTxNxH, k_CxSxH, v_CxSxH, pos):
  """Queries at positions [pos, pos+T) against a cache laid out [C = B*K, S, H] whose [0, pos+T) is written.
  One batch axis with no unit dimensions: with [B, K, S, H] at batch 1, XLA:CPU copied every layer's cache on
  every decode step (half of the `tiny` decode time)."""
  T, S = q_BxTxNxH.shape[1], k_CxSxH.shape[1]

  def upto(L):  # attention over the first L cache slots only
    return lambda: _grouped_attention(q_BxTxNxH, k_CxSxH[:, :L], v_CxSxH[:, :L],
                                      jnp.arange(L)[None, :] <= pos + jnp.arange(T)[:, None])

  # Decoding is bound by memory traffic, and the cache of `tiny` (25 MB at batch 1) is read on every token: read
  # only the shortest prefix S/2^i (i < 5, at least 64 slots) that holds [0, pos+T); one switch branch runs.
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
  of keeping [T, T] per head alive (at T=1024 that was 1.6 GB and 5x torch's time)."""
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
  # with dk.at[:, :, :b].add rewrote the whole [B, K, T, H] buffer once per block (0.4 s of a `tiny` step).
  def per_key_block(parts):
    return jnp.concatenate([sum(x[:, :, a:a + ATTN_BLOCK] for x in parts[a // ATTN_BLOCK:])
                            for a in range(0, T, ATTN_BLOCK)], 2)
  return jnp.concatenate(dqs, 3).astype(q.dtype), per_key_block(dks).astype(k.dtype), per_key_block(dvs).astype(v.dtype)


causal_attention.defvjp(_causal_fwd, _causal_bwd)


@jax.custom_jvp
def gelu(x):
  """Exact (erf) GELU, as torch nn.GELU and nanoGPT. Written with erf and an explicit derivative: jax.nn.gelu's
  erfc form costs XLA:CPU an exp per element in both passes."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
  x, = primals
  cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
  pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
  return x * cdf, (cdf + x * pdf) * tangents[0]


def _attention_with_dropout(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, rate: float, key):
  """Reference attention with dropout on the probabilities (training with model.dropout > 0 only)."""
  B, T, N, H = q_BxTxNxH.shape
  S, K = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  q = q_BxTxNxH.reshape(B, T, K, N // K, H)
  s_BxKxGxTxS = jnp.einsum('btkgh,bskh->bkgts', q, k_BxSxKxH.astype(q.dtype),
                           preferred_element_type=jnp.float32) / math.sqrt(H)
  s_BxKxGxTxS = jnp.where(jnp.tril(jnp.ones((T, S), bool)), s_BxKxGxTxS, jnp.finfo(jnp.float32).min)
  p = dropout(jax.nn.softmax(s_BxKxGxTxS, axis=-1), rate, key).astype(q.dtype)
  o = jnp.einsum('bkgts,bskh->btkgh', p, v_BxSxKxH.astype(q.dtype), preferred_element_type=jnp.float32)
  return o.reshape(B, T, N, H).astype(q.dtype)


class MLP(nnx.Module):
  def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
    self.kind = c.mlp
    width = 2 * c.d_ff if c.mlp == 'swiglu' else c.d_ff  # swiglu: [gate | up] in one matmul
    self.fc = Dense(c.d_model, width, c.bias, c.init_std, rngs)
    self.proj = Dense(c.d_ff, c.d_model, c.bias, c.init_std / math.sqrt(2 * c.n_layer), rngs)

  def __call__(self, x_NxD, dt) -> jax.Array:
    h_NxF = self.fc(x_NxD, dt)
    if self.kind == 'swiglu':
      gate, up = jnp.split(h_NxF, 2, axis=-1)
      h_NxF = jax.nn.silu(gate) * up
    else:
      h_NxF = gelu(h_NxF)
    return self.proj(h_NxF, dt)


class Block(nnx.Module):
  def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
    self.ln1 = Norm(c.d_model, c.norm, c.bias, c.norm_eps)
    self.attn = Attention(c, rngs)
    self.ln2 = Norm(c.d_model, c.norm, c.bias, c.norm_eps)
    self.mlp = MLP(c, rngs)
    self.rate, self.dt = c.dropout, DTYPES[c.dtype]

  def __call__(self, x_NxD, B, T, rope, cache, pos, key):
    k1, k2, k3 = jax.random.split(key, 3) if key is not None else (None, None, None)
    a_NxD, cache = self.attn(self.ln1(x_NxD), B, T, rope, cache, pos, k1)
    x_NxD = x_NxD + dropout(a_NxD, self.rate, k2)
    x_NxD = x_NxD + dropout(self.mlp(self.ln2(x_NxD), self.dt), self.rate, k3)
    return x_NxD, cache


class GPT(nnx.Module):
  def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
    self.c = c
    self.wte = _normal(rngs, (c.vocab_size, c.d_model), c.init_std)
    self.wpe = _normal(rngs, (c.max_positions, c.d_model), c.init_std) if c.pos == 'learned' else None
    self.blocks = nnx.List([Block(c, rngs) for _ in range(c.n_layer)])
    self.ln_f = Norm(c.d_model, c.norm, c.bias, c.norm_eps)
    self.head = None if c.tie_embeddings else Dense(c.d_model, c.vocab_size, False, c.init_std, rngs)

  def __call__(self, tokens_BxT: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] float32. `key` turns dropout on (training); None is deterministic."""
    return self._forward(tokens_BxT, None, 0, key)[0]

  def decode(self, tokens_BxT: jax.Array, cache: Cache, pos) -> tuple[jax.Array, Cache]:
    """Runs tokens at positions [pos, pos+T) against the KV cache; returns logits [B,T,V] and the new cache."""
    return self._forward(tokens_BxT, cache, pos, None)

  def init_cache(self, batch: int, length: int | None = None) -> Cache:
    c = self.c
    shape = (batch * c.n_kv_head, length or c.max_positions, c.head_dim)
    z = lambda: jnp.zeros(shape, DTYPES[c.dtype])  # distinct buffers, so a cache can be donated
    return [{'k': z(), 'v': z()} for _ in range(c.n_layer)]

  def _forward(self, tokens_BxT, cache, pos, key):
    c = self.c
    B, T = tokens_BxT.shape
    # Known positions (training, full forward): positions and RoPE tables computed once at trace time and
    # embedded. Traced, XLA:CPU fuses cos/sin into every use and evaluates them per element of q, k and their
    # gradients (0.6 s of a 10 s `tiny` step).
    with jax.ensure_compile_time_eval() if isinstance(pos, int) else contextlib.nullcontext():
      pos_T = pos + jnp.arange(T)
      rope = rope_tables(pos_T, c.head_dim, c.rope_theta) if c.pos == 'rope' else None
    x_BxTxD = jnp.take(self.wte[...], tokens_BxT, axis=0)
    if self.wpe is not None:
      x_BxTxD = x_BxTxD + jnp.take(self.wpe[...], pos_T, axis=0)[None]
    keys = list(jax.random.split(key, c.n_layer + 1)) if key is not None else [None] * (c.n_layer + 1)
    x_NxD = dropout(x_BxTxD.reshape(B * T, c.d_model), c.dropout, keys[-1])
    new_cache = []
    for i, block in enumerate(self.blocks):
      x_NxD, layer_cache = block(x_NxD, B, T, rope, None if cache is None else cache[i], pos, keys[i])
      new_cache.append(layer_cache)
    h_NxD = self.ln_f(x_NxD).astype(DTYPES[c.dtype])
    w_DxV = self.wte[...].T if self.head is None else self.head.kernel[...]
    logits_NxV = mm(h_NxD, w_DxV.astype(h_NxD.dtype))
    return logits_NxV.reshape(B, T, c.vocab_size), (new_cache if cache is not None else None)


def init_model(c: ModelConfig, seed: int = 0) -> GPT:
  """Freshly initialised weights, made by one compiled program: built eagerly, every parameter's random init
  compiles its own small program (2 s of a 2-core start-up for `shakespeare_char`). Same values either way."""
  return nnx.jit(lambda: GPT(c, nnx.Rngs(params=seed)))()


def param_counts(c: ModelConfig) -> dict[str, int]:
  """Parameter counts without allocating the weights (nnx.eval_shape)."""
  abstract = nnx.eval_shape(lambda: GPT(c, nnx.Rngs(params=0)))
  total = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  emb = c.vocab_size * c.d_model + (c.max_positions * c.d_model if c.pos == 'learned' else 0)
  return {'total': total, 'non_embedding': total - emb - (0 if c.tie_embeddings else c.vocab_size * c.d_model)}


def flops_per_token(c: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
  """Matmul FLOPs per token (PaLM appendix B): 2 per weight multiply-add plus attention scores and mixing,
  counted over the full (unmasked) context; training is 3x forward."""
  T = seq_len or c.block_size
  D, F, L, hd = c.d_model, c.d_ff, c.n_layer, c.head_dim
  attn_w = D * (c.n_head + 2 * c.n_kv_head) * hd + c.n_head * hd * D
  mlp_w = D * F * (3 if c.mlp == 'swiglu' else 2)
  weights = L * (attn_w + mlp_w) + D * c.vocab_size
  fwd = 2 * weights + L * 2 * 2 * T * c.n_head * hd
  return {'forward': float(fwd), 'train': 3.0 * fwd}


def _main(argv):
  del argv
  from minillm_jax import cli
  cfg = cli.config()
  note = ''
  if cfg.model.vocab_size is None and cfg.data.vocab_size is None:
    note = ' (vocab_size comes from the tokenizer at prepare time; counted here with 91, the characters of the embedded Shakespeare text)'
  c = cli.model_config_or_exit(cfg, 91)
  n, f = param_counts(c), flops_per_token(c)
  print(f'parameters      {n["total"]:,}')
  print(f'non-embedding   {n["non_embedding"]:,}')
  print(f'FLOPs/token     {f["forward"]:,.0f} forward, {f["train"]:,.0f} train (context {c.block_size})')
  print(f'shape           {c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads ({c.n_kv_head} kv), d_ff '
        f'{c.d_ff}, vocab {c.vocab_size}, pos {c.pos}, norm {c.norm}, mlp {c.mlp}, bias {c.bias}, '
        f'tied {c.tie_embeddings}{note}')


if __name__ == '__main__':
  from minillm_jax import cli
  cli.define_config(default=None)
  cli.run(_main)
