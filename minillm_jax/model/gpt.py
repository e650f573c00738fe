"""The GPT model family (GPT-2 style and Llama style) in Flax NNX, one definition configured by ModelConfig.

Every dense layer is a 2-D matmul on the flattened rows [B*T, D] (`ops.mm`); with bfloat16 compute the
operands are bfloat16 and the accumulation float32. Parameters, the residual stream, norms, softmax and logits
stay float32. The custom-derivative ops live in minillm_jax.model.ops, attention in minillm_jax.model.attention.

Shape legend (suffixes such as x_BxTxD; one meaning per letter, in every file of the project):
  B batch rows            T positions of this call (queries)     S key/cache positions
  D d_model               F hidden width of a dense layer         V vocabulary
  N query heads           K key/value heads (GQA: K divides N)    G = N / K query heads per kv head
  H head dim              R = B*T flattened rows                  C = B*K cache rows
  M fused q/k/v heads (N + 2K)

`python -m minillm_jax.model --config=configs/tiny.py` prints a preset's parameter count and FLOPs per token.
"""
from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from flax import nnx

from minillm_jax.config import ModelConfig
from minillm_jax.model.attention import attention, cached_attention
from minillm_jax.model.ops import apply_rope, dropout, gelu, normalize, project, rope_tables, split_heads

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
Cache = list  # one {'k': [C, S, H], 'v': [C, S, H]} dict per layer


def _normal(rngs: nnx.Rngs, shape, std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


class Dense(nnx.Module):
  def __init__(self, d_in: int, d_out: int, bias: bool, std: float, rngs: nnx.Rngs):
    self.kernel = _normal(rngs, (d_in, d_out), std)
    self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32)) if bias else None

  def __call__(self, x_RxD, dtype) -> jax.Array:
    y_RxF = project(x_RxD, self.kernel[...], dtype)
    return y_RxF + self.bias[...] if self.bias is not None else y_RxF


class Norm(nnx.Module):
  """LayerNorm (optional bias) or RMSNorm, computed in float32."""

  def __init__(self, d: int, kind: str, bias: bool, eps: float):
    self.kind, self.eps = kind, eps
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((d,), jnp.float32)) if (bias and kind == 'layernorm') else None

  def __call__(self, x_RxD) -> jax.Array:
    x = normalize(x_RxD.astype(jnp.float32), self.scale[...], self.eps, self.kind == 'layernorm')
    return x + self.bias[...] if self.bias is not None else x


class Attention(nnx.Module):
  def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
    self.c = c
    hd = c.head_dim
    self.qkv = Dense(c.d_model, (c.n_head + 2 * c.n_kv_head) * hd, c.bias, c.init_std, rngs)
    self.proj = Dense(c.n_head * hd, c.d_model, c.bias, c.init_std / math.sqrt(2 * c.n_layer), rngs)

  def __call__(self, x_RxD, B: int, T: int, rope, cache: dict | None, pos, key) -> tuple[jax.Array, dict | None]:
    c, dt = self.c, DTYPES[self.c.dtype]
    N, K, H = c.n_head, c.n_kv_head, c.head_dim
    qkv = self.qkv(x_RxD, dt).astype(dt).reshape(B, T, N + 2 * K, H)
    q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = split_heads(qkv, N, K)
    if rope is not None:
      q_BxTxNxH, k_BxTxKxH = apply_rope(q_BxTxNxH, *rope), apply_rope(k_BxTxKxH, *rope)
    if cache is not None:  # write this chunk at [pos, pos+T) of the preallocated cache, attend to [0, pos+T)
      cache = {n: jax.lax.dynamic_update_slice(
                   cache[n], x.transpose(0, 2, 1, 3).reshape(B * K, T, H).astype(cache[n].dtype), (0, pos, 0))
               for n, x in (('k', k_BxTxKxH), ('v', v_BxTxKxH))}
      o_BxTxNxH = cached_attention(q_BxTxNxH, cache['k'].astype(dt), cache['v'].astype(dt), pos)
    elif key is not None and c.dropout > 0:
      o_BxTxNxH = _remat_core(_attention_with_dropout, c)(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, c.dropout, key)
    else:
      o_BxTxNxH = _remat_core(attention, c)(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
    return self.proj(o_BxTxNxH.reshape(B * T, N * H), dt), cache


def _remat_core(fn, c: ModelConfig):
  """model.remat=attention: the attention core (from q, k, v to its output) recomputed in the backward, its
  inputs saved and nothing inside it. Without a fused kernel (XLA's attention on a GPU without cuDNN, dropout)
  the core's [B, N, T, T] scores and probabilities are the one activation growing with T^2, more than the rest
  of the block at T = 1024; the projections, norms and MLP (linear in T, and their matmuls the costly part to
  redo) stay saved, so the extra cost is one attention forward per layer. Flash-style kernels (the CPU ones,
  cuDNN) keep only O, the logsumexp and their inputs, so there it saves little."""
  if c.remat != 'attention':
    return fn
  return jax.checkpoint(fn, static_argnums=(3,)) if fn is _attention_with_dropout else jax.checkpoint(fn)


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

  def __call__(self, x_RxD, dt) -> jax.Array:
    h_RxF = self.fc(x_RxD, dt)
    if self.kind == 'swiglu':
      gate, up = jnp.split(h_RxF, 2, axis=-1)
      h_RxF = jax.nn.silu(gate) * up
    else:
      h_RxF = gelu(h_RxF)
    return self.proj(h_RxF, dt)


class Block(nnx.Module):
  def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
    self.ln1 = Norm(c.d_model, c.norm, c.bias, c.norm_eps)
    self.attn = Attention(c, rngs)
    self.ln2 = Norm(c.d_model, c.norm, c.bias, c.norm_eps)
    self.mlp = MLP(c, rngs)
    self.rate, self.dt = c.dropout, DTYPES[c.dtype]

  def __call__(self, x_RxD, B, T, rope, cache, pos, key):
    k1, k2, k3 = jax.random.split(key, 3) if key is not None else (None, None, None)
    a_RxD, cache = self.attn(self.ln1(x_RxD), B, T, rope, cache, pos, k1)
    x_RxD = x_RxD + dropout(a_RxD, self.rate, k2)
    x_RxD = x_RxD + dropout(self.mlp(self.ln2(x_RxD), self.dt), self.rate, k3)
    return x_RxD, cache


def _remat_block(block: Block, x_RxD, B: int, T: int, rope, key):
  """model.remat=block: the backward recomputes the whole block from its input, and the forward keeps only
  that input [R, D] per layer (the parameters are resident anyway). What the plain step keeps per layer (norm
  outputs, q/k/v, attention output and statistics, the MLP's [R, F] hidden activations) lives for one block
  at a time instead of all n_layer, at the price of one more forward of every block (about a third of a
  step's FLOPs). nothing_saveable, not a dots policy: the matmuls here are custom-derivative ops (ops.mm, the
  CPU kernels) whose residuals no primitive-based policy can name, and a dots policy would keep the [R, F]
  outputs that dominate the block. prevent_cse stays on: the blocks are a Python loop, not a scan, and XLA's
  CSE would otherwise merge the recomputation back into the forward."""
  def run(blk, x, rope, key):
    return blk(x, B, T, rope, None, 0, key)[0]
  return nnx.remat(run, policy=jax.checkpoint_policies.nothing_saveable)(block, x_RxD, rope, key)


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
    # gradients (BENCHMARKS.md, "Fused CPU attention", RoPE tables).
    with jax.ensure_compile_time_eval() if isinstance(pos, int) else contextlib.nullcontext():
      pos_T = pos + jnp.arange(T)
      rope = rope_tables(pos_T, c.head_dim, c.rope_theta) if c.pos == 'rope' else None
    x_BxTxD = jnp.take(self.wte[...], tokens_BxT, axis=0).astype(jnp.float32)  # (bfloat16 when tied, decoding)
    if self.wpe is not None:
      x_BxTxD = x_BxTxD + jnp.take(self.wpe[...], pos_T, axis=0)[None]
    keys = list(jax.random.split(key, c.n_layer + 1)) if key is not None else [None] * (c.n_layer + 1)
    x_RxD = dropout(x_BxTxD.reshape(B * T, c.d_model), c.dropout, keys[-1])
    new_cache = []
    for i, block in enumerate(self.blocks):
      if cache is None and c.remat == 'block':
        x_RxD, layer_cache = _remat_block(block, x_RxD, B, T, rope, keys[i]), None
      else:
        x_RxD, layer_cache = block(x_RxD, B, T, rope, None if cache is None else cache[i], pos, keys[i])
      new_cache.append(layer_cache)
    h_RxD = self.ln_f(x_RxD)
    tied = self.head is None
    logits_RxV = project(h_RxD, self.wte[...] if tied else self.head.kernel[...], DTYPES[c.dtype], transposed=tied)
    return logits_RxV.reshape(B, T, c.vocab_size), (new_cache if cache is not None else None)


def init_model(c: ModelConfig, seed: int = 0) -> GPT:
  """Freshly initialised weights, made by one compiled program: built eagerly, every parameter's random init
  would compile its own small program, and those compiles add up at start-up. Same values either way."""
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
