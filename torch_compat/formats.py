"""Checkpoint files in torch formats, both directions: the native .pt, nanoGPT's ckpt.pt and (via
torch_compat.hf) Hugging Face directories. Every reader returns an `Imported`; every writer takes (model
config, flat Flax params, tokenizer.json text, meta). All weights go through the one table in
torch_compat.convert.

Native .pt: {model: mirror state_dict, model_config: ModelConfig.to_dict(), tokenizer: tokenizer.json text,
meta: {step, val_loss, config, ...}}, plain types and tensors only, so torch.load(weights_only=True) reads it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import zipfile

import numpy as np
import torch

from minillm_jax.config import ModelConfig, UserError
from torch_compat import convert

NANOGPT_EPS = 1e-5  # nanoGPT's LayerNorm hard-codes F.layer_norm(..., 1e-5)


@dataclasses.dataclass
class Imported:
  fmt: str                       # pt | nanogpt | hf-gpt2 | hf-llama | hf-neox
  model_config: ModelConfig
  flat: dict[str, np.ndarray]    # Flax flat params
  tokenizer_json: str            # '' when the source has none
  meta: dict                     # plain; 'config' is the run's plain config when the source is ours
  notes: list[str] = dataclasses.field(default_factory=list)  # inexact conversions the user allowed

  @property
  def cfg_plain(self) -> dict | None:
    cfg = self.meta.get('config')
    return cfg if isinstance(cfg, dict) and cfg else None


def plain(obj, where: str = 'meta'):
  """A copy made of dict/list/str/int/float/bool/None (numpy scalars and arrays unwrapped), which
  torch.load(weights_only=True) and JSON accept; anything else raises UserError naming where it is."""
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  if isinstance(obj, (np.generic, np.ndarray)):
    return obj.tolist()
  if isinstance(obj, dict):
    return {str(k): plain(v, f'{where}.{k}') for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [plain(v, f'{where}[{i}]') for i, v in enumerate(obj)]
  raise UserError(f'{where} holds a {type(obj).__name__}; only plain data can be saved')


def export_meta(meta: dict) -> dict:
  """The part of a checkpoint's meta worth carrying: step, val_loss, the run config and plain scalars."""
  keep = {k: v for k, v in meta.items() if k not in ('tokenizer', 'model_config')}
  return plain(keep)


def torch_load(path: str):
  """torch.load(weights_only=True) with one-line errors; a pickled object other than plain data is refused."""
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # torch wraps every weights-only failure in the same preamble; the line after 'WeightsUnpickler error:'
    # says what it was. Only a GLOBAL (a class or function to import) means code; anything else is a bad file.
    msg = str(e).split('WeightsUnpickler error:', 1)[-1]
    why = next((ln.strip() for ln in msg.splitlines() if ln.strip()), '').split('. Please use')[0]
    if 'global' in why.lower():
      raise UserError(f'refusing to load {path}: it holds pickled objects other than tensors and plain data, '
                      f'which could run code ({why[:160]}); re-save it with plain dicts and tensors only') from None
    raise UserError(f'{path} is not a readable torch checkpoint (corrupt, or not a torch.save file: '
                    f'{why[:120] or type(e).__name__})') from None
  except FileNotFoundError:
    raise UserError(f'{path} does not exist') from None
  except (RuntimeError, EOFError, OSError) as e:
    first = str(e).strip().splitlines()[0].split('. ')[0][:200] if str(e).strip() else 'the file ends early'
    raise UserError(f'{path} is not a readable torch checkpoint: {first}') from None


# ---------------------------------------------------------------------------------------------- native .pt

def save_pt(path: str, c: ModelConfig, flat: dict, tokenizer_json: str | None, meta: dict) -> None:
  ckpt = {'model': convert.flax_to_torch(c, flat, 'pt'), 'model_config': c.to_dict(),
          'tokenizer': tokenizer_json or '', 'meta': export_meta(meta)}
  _mkparent(path)
  _torch_save(ckpt, path)


def load_pt(path: str, ckpt: dict | None = None) -> Imported:
  ckpt = torch_load(path) if ckpt is None else ckpt
  if not isinstance(ckpt, dict) or not {'model', 'model_config'} <= set(ckpt):
    raise UserError(f'{path} is not a native .pt (needs keys model, model_config; found {_keys(ckpt)})')
  c = model_config_from(ckpt['model_config'], path)
  flat = convert.torch_to_flax(c, ckpt['model'], 'pt')
  return Imported('pt', c, flat, ckpt.get('tokenizer') or '', ckpt.get('meta') or {})


def model_config_from(d, where: str) -> ModelConfig:
  try:
    return ModelConfig.from_dict(dict(d))
  except (TypeError, ValueError) as e:
    raise UserError(f'{where}: bad model_config: {e}') from None


# ------------------------------------------------------------------------------------------------- nanoGPT

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
  _mkparent(path)
  _torch_save(ckpt, path)


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


# ------------------------------------------------------------------------------------------ detect, dispatch

def detect(path: str) -> str:
  """'hf' for a directory with config.json, 'nanogpt' or 'pt' for a torch file (or a nanoGPT out_dir)."""
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, 'config.json')):
      return 'hf'
    if os.path.isfile(os.path.join(path, 'ckpt.pt')):
      return 'nanogpt'
    raise UserError(f'{path} is a directory without config.json (Hugging Face) or ckpt.pt (nanoGPT)')
  ckpt = torch_load(path)
  if isinstance(ckpt, dict) and 'model_args' in ckpt:
    return 'nanogpt'
  if isinstance(ckpt, dict) and 'model_config' in ckpt:
    return 'pt'
  raise UserError(f'{path}: unknown checkpoint layout (keys {_keys(ckpt)}); expected a native .pt '
                  '(model, model_config) or a nanoGPT ckpt.pt (model, model_args)')


def load_any(path: str, allow_inexact: bool = False) -> Imported:
  from torch_compat import hf
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, 'config.json')):
    path = os.path.join(path, 'ckpt.pt') if os.path.isfile(os.path.join(path, 'ckpt.pt')) else path
  if os.path.isdir(path):
    return hf.load_hf(path, allow_inexact=allow_inexact)
  ckpt = torch_load(path)
  if isinstance(ckpt, dict) and 'model_args' in ckpt:
    return load_nanogpt(path, ckpt)
  if isinstance(ckpt, dict) and 'model_config' in ckpt:
    return load_pt(path, ckpt)
  raise UserError(f'{path}: unknown checkpoint layout (keys {_keys(ckpt)}); expected a native .pt '
                  '(model, model_config), a nanoGPT ckpt.pt (model, model_args) or a Hugging Face directory')


def save_any(fmt: str, out: str, c: ModelConfig, flat: dict, tokenizer_json: str | None, meta: dict) -> None:
  from torch_compat import hf
  writers = {'pt': save_pt, 'nanogpt': save_nanogpt, 'hf': hf.save_hf}
  if fmt not in writers:
    raise UserError(f'--format={fmt!r}: use pt, nanogpt or hf')
  writers[fmt](out, c, flat, tokenizer_json, meta)


def _keys(obj) -> list:
  return sorted(map(str, obj))[:8] if isinstance(obj, dict) else [type(obj).__name__]


def _mkparent(path: str):
  if not path or os.path.isdir(path):
    raise UserError(f'--out={path!r} is {"a directory" if path else "empty"}; this format writes a file')
  if os.path.exists(path) and not zipfile.is_zipfile(path):  # a torch.save archive may be replaced, nothing else
    raise UserError(f'--out={path} exists and is not a torch checkpoint; refusing to overwrite it (pick a new '
                    'path)')
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)


def _torch_save(obj, path: str):
  tmp = f'{path}.tmp{os.getpid()}'
  torch.save(obj, tmp)  # then one rename: an interrupted export never leaves a half-written file at `path`
  os.replace(tmp, path)
