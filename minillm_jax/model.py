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

from minillm_jax import cpu_matmul
from minillm_jax.attention import attention, cached_attention
from minillm_jax.config import ModelConfig

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
Cache = list  # one {'k': [B*K,S,H], 'v': [B*K,S,H]} dict per layer


def _dot(a, b):
  return jax.lax.dot(a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def mm(a_NxD: jax.Array, b_DxF: jax.Array) -> jax.Array:
  """a @ b with float32 accumulation and a float32 result, whatever the operand dtype. Float32 on CPU runs on
  OpenBLAS (cpu_matmul: about 1.3x XLA:CPU's dots on the train step's shapes)."""
  return _mm_fwd(a_NxD, b_DxF)[0]


def _mm_fwd(a, b):
  return (cpu_matmul.matmul(a, b) if cpu_matmul.supported(a, b) else _dot(a, b)), (a, b)


def _mm_bwd(res, g_NxF):
  # XLA: both gradient matmuls in canonical (row-major, untransposed) form with the operand dtype, so XLA:CPU
  # picks its fast (AMX for bf16) kernels instead of a transposing dot. OpenBLAS reads transposes in place.
  a, b = res
  g = g_NxF.astype(a.dtype)
  if cpu_matmul.supported(a, b):
    return cpu_matmul.matmul(g, b, tb=True), cpu_matmul.matmul(a, g, ta=True)
  if cpu_matmul.transpose_supported(a) and cpu_matmul.transpose_supported(b):
    # XLA folds a transpose of its own into the dot, and then widens the bfloat16 dot to float32 (`tiny`, one
    # step's loss and gradients: 7.6-8.9 s against 11.2-14.6 s)
    return _dot(g, cpu_matmul.transposed(b)).astype(a.dtype), _dot(cpu_matmul.transposed(a), g).astype(b.dtype)
  return _dot(g, b.T).astype(a.dtype), _dot(a.T, g).astype(b.dtype)


mm.defvjp(_mm_fwd, _mm_bwd)


def project(x_NxD: jax.Array, w: jax.Array, dt, transposed: bool = False) -> jax.Array:
  """x @ w (w.T when transposed) computed in dt. Weights stored in bfloat16 under a float32 model (decoding
  with sample.bf16_weights) stay float32 math on bfloat16-rounded weights: few rows read them as stored
  (cpu_matmul.gemv_bf16, half the bytes per token), otherwise they are widened for the dot."""
  if w.dtype == jnp.bfloat16 and dt == jnp.float32 and cpu_matmul.gemv_supported(x_NxD, w):
    return cpu_matmul.gemv_bf16(x_NxD.astype(dt), w, tb=transposed)
  w = w.astype(dt)
  if transposed:  # (the tied head) as in mm's backward: an opaque transpose keeps a bfloat16 dot bfloat16
    w = cpu_matmul.transposed(w) if cpu_matmul.transpose_supported(w) else w.T
  return mm(x_NxD.astype(dt), w)


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
    y_NxF = project(x_NxD, self.kernel[...], dtype)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def split_heads(qkv_BxTxMxH, N: int, K: int):
  """q, k, v = the first N, next K and last K heads. Its backward is one concatenate: the slices' own transpose
  is three zero pads summed, which XLA:CPU fuses in bfloat16 with a round trip through float32 per add
  (1.7 ms per layer of a 42 ms shakespeare_char bfloat16 step)."""
  return qkv_BxTxMxH[:, :, :N], qkv_BxTxMxH[:, :, N:N + K], qkv_BxTxMxH[:, :, N + K:]


split_heads.defvjp(lambda qkv, N, K: (split_heads(qkv, N, K), None),
                   lambda N, K, _, g: (jnp.concatenate(g, axis=2),))


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
    q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = split_heads(qkv, N, K)
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
    x_BxTxD = jnp.take(self.wte[...], tokens_BxT, axis=0).astype(jnp.float32)  # (bfloat16 when tied, decoding)
    if self.wpe is not None:
      x_BxTxD = x_BxTxD + jnp.take(self.wpe[...], pos_T, axis=0)[None]
    keys = list(jax.random.split(key, c.n_layer + 1)) if key is not None else [None] * (c.n_layer + 1)
    x_NxD = dropout(x_BxTxD.reshape(B * T, c.d_model), c.dropout, keys[-1])
    new_cache = []
    for i, block in enumerate(self.blocks):
      x_NxD, layer_cache = block(x_NxD, B, T, rope, None if cache is None else cache[i], pos, keys[i])
      new_cache.append(layer_cache)
    h_NxD = self.ln_f(x_NxD)
    tied = self.head is None
    logits_NxV = project(h_NxD, self.wte[...] if tied else self.head.kernel[...], DTYPES[c.dtype], transposed=tied)
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
  fwd = 2 * _matrix_params(c) + c.n_layer * 2 * 2 * T * c.n_head * c.head_dim
  return {'forward': float(fwd), 'train': 3.0 * fwd}


def decode_bytes(c: ModelConfig, batch: int, cached: float, weight_bytes: int = 4) -> float:
  """The least memory one KV-cache decode step reads: every matrix once (`weight_bytes` per element: 2 when
  stored in bfloat16), the vectors (norms, biases) in float32, `batch` embedding rows, and K and V of `cached`
  positions per row in the cache's dtype. Batch-1 decoding is bound by it (bench: the read floor, MBU)."""
  matrices, head = _matrix_params(c), c.d_model * c.vocab_size  # the head: a matrix, not non-embedding
  vectors = param_counts(c)['non_embedding'] - (matrices - head)
  rows = batch * c.d_model * (2 if c.pos == 'learned' else 1)
  kv = batch * c.n_layer * 2 * c.n_kv_head * c.head_dim * cached * jnp.dtype(DTYPES[c.dtype]).itemsize
  return float(matrices * weight_bytes + 4 * (vectors + rows) + kv)


def _matrix_params(c: ModelConfig) -> int:
  """Elements of the matrices a token multiplies by: attention, MLP, and the head (D x vocab)."""
  D, hd = c.d_model, c.head_dim
  attn_w = D * (c.n_head + 2 * c.n_kv_head) * hd + c.n_head * hd * D
  mlp_w = D * c.d_ff * (3 if c.mlp == 'swiglu' else 2)
  return c.n_layer * (attn_w + mlp_w) + D * c.vocab_size


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
