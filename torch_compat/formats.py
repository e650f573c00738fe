"""Which torch format a path holds, and reading or writing any of them: the native .pt (torch_compat.pt),
nanoGPT's ckpt.pt (torch_compat.nanogpt) and Hugging Face directories (torch_compat.hf). Every reader returns
a common.Imported; every writer takes (model config, flat Flax params, tokenizer.json text, meta). All weights
go through the one table in torch_compat.convert."""
from __future__ import annotations

import os

from minillm_jax.config import ModelConfig, UserError
from torch_compat import hf, nanogpt, pt
from torch_compat.common import Imported, keys, torch_load

__all__ = ['Imported', 'detect', 'load_any', 'save_any']


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
  raise UserError(f'{path}: unknown checkpoint layout (keys {keys(ckpt)}); expected a native .pt '
                  '(model, model_config) or a nanoGPT ckpt.pt (model, model_args)')


def load_any(path: str, allow_inexact: bool = False) -> Imported:
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, 'config.json')):
    path = os.path.join(path, 'ckpt.pt') if os.path.isfile(os.path.join(path, 'ckpt.pt')) else path
  if os.path.isdir(path):
    return hf.load_hf(path, allow_inexact=allow_inexact)
  ckpt = torch_load(path)
  if isinstance(ckpt, dict) and 'model_args' in ckpt:
    return nanogpt.load_nanogpt(path, ckpt)
  if isinstance(ckpt, dict) and 'model_config' in ckpt:
    return pt.load_pt(path, ckpt)
  raise UserError(f'{path}: unknown checkpoint layout (keys {keys(ckpt)}); expected a native .pt '
                  '(model, model_config), a nanoGPT ckpt.pt (model, model_args) or a Hugging Face directory')


def save_any(fmt: str, out: str, c: ModelConfig, flat: dict, tokenizer_json: str | None, meta: dict) -> None:
  writers = {'pt': pt.save_pt, 'nanogpt': nanogpt.save_nanogpt, 'hf': hf.save_hf}
  if fmt not in writers:
    raise UserError(f'--format={fmt!r}: use pt, nanogpt or hf')
  writers[fmt](out, c, flat, tokenizer_json, meta)
