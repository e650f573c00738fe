"""nanoGPT's ckpt.pt, both directions: its GPT-2 layout and model_args, with our config riding along so that a
round trip restores everything."""
from __future__ import annotations

import dataclasses
import math

import torch

from minillm_jax.config import ModelConfig, UserError
from torch_compat import convert
from torch_compat.common import (
  Imported,
  export_meta,
  mkparent,
  model_config_from,
  plain,
  torch_load,
  torch_save,
)

NANOGPT_EPS = 1e-5  # nanoGPT's LayerNorm hard-codes F.layer_norm(..., 1e-5)


def nanogpt_problems(c: ModelConfig) -> list[str]:
  """What nanoGPT's GPT cannot represent about this config (empty when it can)."""
  p = []
  if c.pos != 'learned':
    p.append(f'pos={c.pos} (nanoGPT has learned positions only)')
  if c.norm != 'layernorm':
    p.append(f'norm={c.norm} (nanoGPT has LayerNorm only)')
  if c.norm_eps != NANOGPT_EPS:
    p.append(f'norm_eps={c.norm_eps} (nanoGPT fixes 1e-5)')
  if c.mlp != 'gelu':
    p.append(f'mlp={c.mlp} (nanoGPT has a GELU MLP only)')
  if c.d_ff != 4 * c.d_model:
    p.append(f'd_ff={c.d_ff} (nanoGPT fixes 4*d_model={4 * c.d_model})')
  if not c.tie_embeddings:
    p.append('tie_embeddings=False (nanoGPT always ties lm_head to wte)')
  if c.n_kv_head != c.n_head:
    p.append(f'n_kv_head={c.n_kv_head} < n_head={c.n_head} (nanoGPT has no grouped-query attention)')
  return p


def save_nanogpt(path: str, c: ModelConfig, flat: dict, tokenizer_json: str | None, meta: dict) -> None:
  """nanoGPT's ckpt.pt layout, loadable by its sample.py (and train.py --init_from=resume only after adding an
  optimizer entry). nanoGPT's block_size sizes its position table, so it is our max_positions."""
  bad = nanogpt_problems(c)
  if bad:
    raise UserError(f'nanoGPT cannot represent this model: {"; ".join(bad)}. Use --format=pt or --format=hf')
  m = export_meta(meta)
  val = m.get('val_loss')
  ckpt = {
      'model': convert.flax_to_torch(c, flat, 'nanogpt'),
      'model_args': {'n_layer': c.n_layer, 'n_head': c.n_head, 'n_embd': c.d_model,
                     'block_size': c.max_positions, 'bias': c.bias, 'vocab_size': c.vocab_size,
                     'dropout': c.dropout},
      'iter_num': int(m.get('step') or 0),
      'best_val_loss': float(val) if isinstance(val, (int, float)) and math.isfinite(val) else 1e9,
      # nanoGPT keeps its flat run config here; ours rides along so an import restores everything
      'config': {'minillm_model_config': c.to_dict(), 'minillm_meta': m,
                 'minillm_tokenizer': tokenizer_json or ''},
  }
  mkparent(path)
  torch_save(ckpt, path)


def load_nanogpt(path: str, ckpt: dict | None = None) -> Imported:
  ckpt = torch_load(path) if ckpt is None else ckpt
  a = ckpt.get('model_args') if isinstance(ckpt, dict) else None
  need = ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size')
  if not isinstance(a, dict) or 'model' not in ckpt or any(k not in a for k in need):
    raise UserError(f'{path} is not a nanoGPT checkpoint (needs model and model_args with {need})')
  extra = (ckpt.get('config') or {}) if isinstance(ckpt.get('config'), dict) else {}
  try:
    c = model_config_from({
        'vocab_size': int(a['vocab_size']), 'n_layer': int(a['n_layer']), 'n_head': int(a['n_head']),
        'n_kv_head': int(a['n_head']), 'd_model': int(a['n_embd']), 'd_ff': 4 * int(a['n_embd']),
        'block_size': int(a['block_size']), 'max_positions': int(a['block_size']), 'pos': 'learned',
        'norm': 'layernorm', 'norm_eps': NANOGPT_EPS, 'mlp': 'gelu', 'bias': bool(a.get('bias', True)),
        'tie_embeddings': True, 'dropout': float(a.get('dropout', 0.0))}, f'{path} (model_args)')
  except (TypeError, ValueError) as e:  # int('x'), float(None)
    raise UserError(f'{path}: bad model_args ({e})') from None
  ours = extra.get('minillm_model_config')
  if isinstance(ours, dict):  # written by save_nanogpt: keeps block_size, init_std, dtype
    c2 = model_config_from(ours, path)
    same = dataclasses.replace(c2, block_size=c.block_size, dropout=c.dropout, init_std=c.init_std,
                               dtype=c.dtype)
    if same == c:
      c = c2
  sd = convert.strip_prefixes(ckpt['model'])  # torch.compile leaves '_orig_mod.' on every name
  head, wte = sd.get('lm_head.weight'), sd.get('transformer.wte.weight')
  if head is not None and wte is not None and not torch.equal(head, wte):
    c = dataclasses.replace(c, tie_embeddings=False)  # a hand-edited nanoGPT with its own head: keep it exact
  flat = convert.torch_to_flax(c, sd, 'nanogpt')
  meta = dict(extra.get('minillm_meta') or {})
  meta.setdefault('step', int(ckpt.get('iter_num') or 0))
  best = ckpt.get('best_val_loss')
  if isinstance(best, (int, float)) and best < 1e9 and 'val_loss' not in meta:  # 1e9: nanoGPT's 'none yet'
    meta['val_loss'] = float(best)
  if 'config' not in meta and extra and 'minillm_meta' not in extra:
    meta['nanogpt_config'] = plain(extra, 'config')
  return Imported('nanogpt', c, flat, extra.get('minillm_tokenizer') or '', meta)
