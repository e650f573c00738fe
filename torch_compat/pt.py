"""The native .pt: {model: mirror state_dict, model_config: ModelConfig.to_dict(), tokenizer: tokenizer.json text,
meta: {step, val_loss, config, ...}}, plain types and tensors only, so torch.load(weights_only=True) reads it."""
from __future__ import annotations

from minillm_jax.config import ModelConfig, UserError
from torch_compat import convert
from torch_compat.common import (
  Imported,
  export_meta,
  keys,
  mkparent,
  model_config_from,
  torch_load,
  torch_save,
)


def save_pt(path: str, c: ModelConfig, flat: dict, tokenizer_json: str | None, meta: dict) -> None:
  ckpt = {'model': convert.flax_to_torch(c, flat, 'pt'), 'model_config': c.to_dict(),
          'tokenizer': tokenizer_json or '', 'meta': export_meta(meta)}
  mkparent(path)
  torch_save(ckpt, path)


def load_pt(path: str, ckpt: dict | None = None) -> Imported:
  ckpt = torch_load(path) if ckpt is None else ckpt
  if not isinstance(ckpt, dict) or not {'model', 'model_config'} <= set(ckpt):
    raise UserError(f'{path} is not a native .pt (needs keys model, model_config; found {keys(ckpt)})')
  c = model_config_from(ckpt['model_config'], path)
  flat = convert.torch_to_flax(c, ckpt['model'], 'pt')
  return Imported('pt', c, flat, ckpt.get('tokenizer') or '', ckpt.get('meta') or {})
