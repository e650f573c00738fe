"""The model's differentiable building blocks with hand-written derivatives or dispatch: `mm` (matmuls on
OpenBLAS or XLA), `project` (dense layers, bfloat16-stored weights), `normalize`, `gelu`, `split_heads`,
RoPE and dropout. The architecture that uses them is minillm_jax.model.gpt; shape letters are its legend."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from minillm_jax.kernels import matmul as cpu_matmul


def _dot(a, b):
  return jax.lax.dot(a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def mm(a_RxD: jax.Array, b_DxF: jax.Array) -> jax.Array:
  """a @ b with float32 accumulation and a float32 result, whatever the operand dtype. Float32 on CPU runs on
  OpenBLAS (cpu_matmul), faster than XLA:CPU's dots on the train step's shapes (BENCHMARKS.md, "OpenBLAS
  matmuls")."""
  return _mm_fwd(a_RxD, b_DxF)[0]


def _mm_fwd(a, b):
  return (cpu_matmul.matmul(a, b) if cpu_matmul.supported(a, b) else _dot(a, b)), (a, b)


def _mm_bwd(res, g_RxF):
  # XLA: both gradient matmuls in canonical (row-major, untransposed) form with the operand dtype, so XLA:CPU
  # picks its fast (AMX for bf16) kernels instead of a transposing dot. OpenBLAS reads transposes in place.
  a, b = res
  g = g_RxF.astype(a.dtype)
  if cpu_matmul.supported(a, b):
    return cpu_matmul.matmul(g, b, tb=True), cpu_matmul.matmul(a, g, ta=True)
  if cpu_matmul.transpose_supported(a) and cpu_matmul.transpose_supported(b):
    # XLA folds a transpose of its own into the dot, and then widens the bfloat16 dot to float32
    # (BENCHMARKS.md, "bfloat16 compute on CPU")
    return _dot(g, cpu_matmul.transposed(b)).astype(a.dtype), _dot(cpu_matmul.transposed(a), g).astype(b.dtype)
  return _dot(g, b.T).astype(a.dtype), _dot(a.T, g).astype(b.dtype)


mm.defvjp(_mm_fwd, _mm_bwd)


def project(x_RxD: jax.Array, w: jax.Array, dt, transposed: bool = False) -> jax.Array:
  """x @ w (w.T when transposed) computed in dt. Weights stored in bfloat16 under a float32 model (decoding
  with sample.bf16_weights) stay float32 math on bfloat16-rounded weights: few rows read them as stored
  (cpu_matmul.gemv_bf16, half the bytes per token), otherwise they are widened for the dot."""
  if w.dtype == jnp.bfloat16 and dt == jnp.float32 and cpu_matmul.gemv_supported(x_RxD, w):
    return cpu_matmul.gemv_bf16(x_RxD.astype(dt), w, tb=transposed)
  x_RxD, w = x_RxD.astype(dt), w.astype(dt)
  if transposed and cpu_matmul.decode_supported(x_RxD, w):  # read in place, no transposed copy (no gradient)
    return cpu_matmul.matmul(x_RxD, w, tb=True)
  if transposed:  # (the tied head) as in mm's backward: an opaque transpose keeps a bfloat16 dot bfloat16
    w = cpu_matmul.transposed(w) if cpu_matmul.transpose_supported(w) else w.T
  return mm(x_RxD, w)


def dropout(x, rate: float, key):
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def normalize(x_RxD, scale_D, eps: float, center: bool):
  """(x - mean if center) * rsqrt(mean square + eps) * scale, with the textbook backward: two row reductions
  and one elementwise pass over the saved x_hat. XLA's autodiff of the forward made more passes over the
  activations (BENCHMARKS.md, "Where the `tiny` step's time goes before the fused attention")."""
  return _normalize_fwd(x_RxD, scale_D, eps, center)[0]


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
  (BENCHMARKS.md, "bfloat16 attention on AMX and the q/k/v split")."""
  return qkv_BxTxMxH[:, :, :N], qkv_BxTxMxH[:, :, N:N + K], qkv_BxTxMxH[:, :, N + K:]


split_heads.defvjp(lambda qkv, N, K: (split_heads(qkv, N, K), None),
                   lambda N, K, _, g: (jnp.concatenate(g, axis=2),))


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
