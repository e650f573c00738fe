"""Plain-PyTorch mirror of minillm_jax.model.GPT: the same family, flags and numerics, and no JAX import, so
chat and eval tools run in an environment with torch alone.

Built from the plain model-config dict (the keys of ModelConfig.to_dict()). Its state_dict uses nanoGPT's
names (transformer.wte, transformer.h.{i}.attn.c_attn, ..., lm_head) with the fused layouts of the Flax model:
c_attn rows are [q heads | k heads | v heads] and, for SwiGLU, c_fc rows are [gate | up]. A tied head has no
lm_head entry. torch_compat.convert holds the one table from Flax names to these.
It computes in the dtype of its parameters (float32 as loaded; `.to(torch.bfloat16)` for speed), with norms
and RoPE in float32 and float32 logits returned; the config's `dtype` (Flax's training dtype) is unused, and its
`remat` (optional) = 'block' recomputes each block in the backward while training (torch.utils.checkpoint).

  model, tokenizer_json, meta = load('model.pt')        # the native .pt written by torch_compat.export
  out = model.generate(torch.tensor([[1, 2, 3]]), 20)   # greedy; temperature/top_k for sampling
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

CONFIG_KEYS = ('vocab_size', 'n_layer', 'n_head', 'n_kv_head', 'd_model', 'd_ff', 'block_size',
               'max_positions', 'pos', 'rope_theta', 'norm', 'norm_eps', 'mlp', 'bias', 'tie_embeddings',
               'dropout')
Cache = list  # one {'k': [B,K,S,H], 'v': [B,K,S,H]} dict per layer, written in place


def pick_device(name: str | None = None) -> torch.device:
  """`name` if given, else MPS > CUDA > CPU."""
  if name:
    return torch.device(name)
  mps = getattr(torch.backends, 'mps', None)
  if mps is not None and mps.is_available():
    return torch.device('mps')
  if torch.cuda.is_available():
    return torch.device('cuda')
  return torch.device('cpu')


def check_config(cfg: dict) -> dict:
  missing = [k for k in CONFIG_KEYS if k not in cfg]
  if missing:
    raise ValueError(f'model config lacks {missing}; expected the keys of ModelConfig.to_dict()')
  bad = {k: cfg[k] for k, ok in (('pos', ('learned', 'rope')), ('norm', ('layernorm', 'rmsnorm')),
                                  ('mlp', ('gelu', 'swiglu'))) if cfg[k] not in ok}
  if bad:
    raise ValueError(f'unsupported model config values {bad}')
  if cfg['d_model'] % cfg['n_head'] or cfg['n_head'] % cfg['n_kv_head']:
    raise ValueError(f'need n_head | d_model and n_kv_head | n_head, got d_model={cfg["d_model"]}, '
                     f'n_head={cfg["n_head"]}, n_kv_head={cfg["n_kv_head"]}')
  return dict(cfg)


class Norm(nn.Module):
  """LayerNorm (optional bias) or RMSNorm in float32, the formulas of the Flax Norm."""

  def __init__(self, d: int, kind: str, bias: bool, eps: float):
    super().__init__()
    self.kind, self.eps = kind, eps
    self.weight = nn.Parameter(torch.ones(d))
    self.bias = nn.Parameter(torch.zeros(d)) if (bias and kind == 'layernorm') else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    if self.kind == 'layernorm':
      xf = xf - xf.mean(-1, keepdim=True)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
    if self.bias is not None:
      y = y + self.bias.float()
    return y.to(x.dtype)


def rope_tables(pos_T: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
  """cos, sin [T, H], rotate-half convention, computed in float32 exactly as the Flax rope_tables."""
  inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=pos_T.device) / head_dim)
  f_TxH2 = pos_T.float()[:, None] * inv[None, :]
  f_TxH = torch.cat([f_TxH2, f_TxH2], dim=-1)
  return f_TxH.cos(), f_TxH.sin()


def apply_rope(x_BxNxTxH: torch.Tensor, cos_TxH: torch.Tensor, sin_TxH: torch.Tensor) -> torch.Tensor:
  x = x_BxNxTxH.float()
  x1, x2 = x.chunk(2, dim=-1)
  rot = torch.cat([-x2, x1], dim=-1)
  return (x * cos_TxH + rot * sin_TxH).to(x_BxNxTxH.dtype)


class Attention(nn.Module):
  def __init__(self, c: dict):
    super().__init__()
    self.n, self.k, self.hd = c['n_head'], c['n_kv_head'], c['d_model'] // c['n_head']
    self.c_attn = nn.Linear(c['d_model'], (self.n + 2 * self.k) * self.hd, bias=c['bias'])
    self.c_proj = nn.Linear(self.n * self.hd, c['d_model'], bias=c['bias'])
    self.p = c['dropout']

  def forward(self, x_BxTxD, rope, cache: dict | None, pos: int) -> torch.Tensor:
    B, T, _ = x_BxTxD.shape
    N, K, H = self.n, self.k, self.hd
    q, k, v = self.c_attn(x_BxTxD).view(B, T, N + 2 * K, H).transpose(1, 2).split([N, K, K], dim=1)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    causal, mask = True, None
    if cache is not None:  # write [pos, pos+T) of the preallocated buffer, attend to all written so far
      cache['k'][:, :, pos:pos + T] = k.to(cache['k'].dtype)
      cache['v'][:, :, pos:pos + T] = v.to(cache['v'].dtype)
      k, v = cache['k'][:, :, :pos + T].to(q.dtype), cache['v'][:, :, :pos + T].to(q.dtype)
      causal = False
      if T > 1:  # a single new token sees every cached one; a chunk needs the causal mask shifted by pos
        ar = torch.arange(pos + T, device=x_BxTxD.device)
        mask = ar[None, :] <= pos + ar[:T, None]
    if K != N:  # GQA: query head n reads kv head n // (N/K), as the Flax model and HF repeat_kv
      k, v = k.repeat_interleave(N // K, dim=1), v.repeat_interleave(N // K, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                       dropout_p=self.p if self.training else 0.0)
    return self.c_proj(y.transpose(1, 2).reshape(B, T, N * H))


class MLP(nn.Module):
  def __init__(self, c: dict):
    super().__init__()
    self.swiglu = c['mlp'] == 'swiglu'
    self.c_fc = nn.Linear(c['d_model'], (2 if self.swiglu else 1) * c['d_ff'], bias=c['bias'])  # [gate | up]
    self.c_proj = nn.Linear(c['d_ff'], c['d_model'], bias=c['bias'])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.c_fc(x)
    if self.swiglu:
      gate, up = h.chunk(2, dim=-1)
      h = F.silu(gate) * up
    else:
      h = F.gelu(h)  # exact erf GELU, as the Flax model
    return self.c_proj(h)


class Block(nn.Module):
  def __init__(self, c: dict):
    super().__init__()
    args = (c['d_model'], c['norm'], c['bias'], c['norm_eps'])
    self.ln_1, self.attn, self.ln_2, self.mlp = Norm(*args), Attention(c), Norm(*args), MLP(c)
    self.drop = nn.Dropout(c['dropout'])

  def forward(self, x, rope, cache, pos):
    x = x + self.drop(self.attn(self.ln_1(x), rope, cache, pos))
    return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
  def __init__(self, cfg: dict):
    super().__init__()
    c = self.cfg = check_config(cfg)
    parts = {'wte': nn.Embedding(c['vocab_size'], c['d_model']), 'drop': nn.Dropout(c['dropout']),
                 'h': nn.ModuleList([Block(c) for _ in range(c['n_layer'])]),
                 'ln_f': Norm(c['d_model'], c['norm'], c['bias'], c['norm_eps'])}
    if c['pos'] == 'learned':
      parts['wpe'] = nn.Embedding(c['max_positions'], c['d_model'])
    self.transformer = nn.ModuleDict(parts)
    self.lm_head = None if c['tie_embeddings'] else nn.Linear(c['d_model'], c['vocab_size'], bias=False)
    self._init_weights(c.get('init_std', 0.02))

  def _init_weights(self, std: float):
    """The Flax init: normal(std) weights, projections into the residual scaled by 1/sqrt(2L), zero biases."""
    for name, p in self.named_parameters():
      if name.endswith('bias'):
        nn.init.zeros_(p)
      elif '.ln_' in name or 'ln_f' in name:
        nn.init.ones_(p)
      else:
        scale = 1 / math.sqrt(2 * self.cfg['n_layer']) if name.endswith('c_proj.weight') else 1.0
        nn.init.normal_(p, 0.0, std * scale)

  @property
  def device(self) -> torch.device:
    return self.transformer.wte.weight.device

  def forward(self, idx_BxT: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] float32 for tokens at positions [0, T)."""
    return self._forward(idx_BxT, None, 0)

  def init_cache(self, batch: int, length: int | None = None, dtype: torch.dtype | None = None) -> Cache:
    c = self.cfg
    shape = (batch, c['n_kv_head'], length or c['max_positions'], c['d_model'] // c['n_head'])
    dt = dtype or self.transformer.wte.weight.dtype
    return [{'k': torch.zeros(shape, dtype=dt, device=self.device),
             'v': torch.zeros(shape, dtype=dt, device=self.device)} for _ in range(c['n_layer'])]

  def decode(self, idx_BxT: torch.Tensor, cache: Cache, pos: int) -> tuple[torch.Tensor, Cache]:
    """Logits [B,T,V] for tokens at positions [pos, pos+T) against the KV cache, which is updated in place."""
    end, S = pos + idx_BxT.shape[1], cache[0]['k'].shape[2]
    if end > S:
      raise ValueError(f'positions up to {end} exceed the cache length {S}')
    return self._forward(idx_BxT, cache, pos), cache

  def _forward(self, idx_BxT, cache, pos: int) -> torch.Tensor:
    c, tr = self.cfg, self.transformer
    T = idx_BxT.shape[1]
    if pos + T > c['max_positions']:
      raise ValueError(f'positions up to {pos + T} exceed max_positions={c["max_positions"]}')
    pos_T = torch.arange(pos, pos + T, device=idx_BxT.device)
    x = tr.wte(idx_BxT)
    if c['pos'] == 'learned':
      x = x + tr.wpe(pos_T)[None]
    rope = rope_tables(pos_T, c['d_model'] // c['n_head'], c['rope_theta']) if c['pos'] == 'rope' else None
    x = tr.drop(x)
    # model.remat=block: each block recomputed in the backward from its input (torch.utils.checkpoint), as the
    # Flax model does; only while training with gradients, never for decoding. Off by default.
    remat = c.get('remat', 'none') == 'block' and self.training and cache is None and torch.is_grad_enabled()
    for i, block in enumerate(tr.h):
      if remat:
        x = torch.utils.checkpoint.checkpoint(block, x, rope, None, pos, use_reentrant=False)
      else:
        x = block(x, rope, None if cache is None else cache[i], pos)
    h = tr.ln_f(x)
    w_VxD = tr.wte.weight if self.lm_head is None else self.lm_head.weight
    return F.linear(h, w_VxD).float()

  @torch.no_grad()
  def generate(self, idx_BxT: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Prefill then one token at a time through the KV cache; temperature 0 is greedy. Returns [B, T+new],
    stopping early at max_positions (positions past it do not exist for learned embeddings)."""
    idx_BxT = idx_BxT.to(self.device)
    B, T = idx_BxT.shape
    total = min(T + max_new_tokens, self.cfg['max_positions'])
    cache = self.init_cache(B, total)
    logits, _ = self.decode(idx_BxT, cache, 0)
    out, pos = [idx_BxT], T
    while pos < total:
      nxt = _pick(logits[:, -1], temperature, top_k, generator)
      out.append(nxt)
      if pos + 1 == total:
        break
      logits, _ = self.decode(nxt, cache, pos)
      pos += 1
    return torch.cat(out, dim=1)


def _pick(logits_BxV: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
  if temperature <= 0:
    return logits_BxV.argmax(-1, keepdim=True)
  logits_BxV = logits_BxV / temperature
  if top_k:
    kth = torch.topk(logits_BxV, min(top_k, logits_BxV.shape[-1])).values[:, -1:]
    logits_BxV = logits_BxV.masked_fill(logits_BxV < kth, float('-inf'))
  return torch.multinomial(logits_BxV.softmax(-1), 1, generator=generator)


def load(path: str, device: str | None = None) -> tuple[GPT, str, dict]:
  """(model in eval mode on `device` or the best available one, tokenizer.json text, meta) from a native
  .pt, read with torch.load(weights_only=True): pickled objects other than tensors and plain data are
  refused."""
  ckpt = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(ckpt, dict) or 'model_config' not in ckpt or 'model' not in ckpt:
    raise ValueError(f'{path} is not a native minillm .pt (needs model and model_config keys)')
  model = GPT(ckpt['model_config'])
  model.load_state_dict(ckpt['model'])
  return model.to(pick_device(device)).eval(), ckpt.get('tokenizer') or '', ckpt.get('meta') or {}
