"""What every torch format shares: the `Imported` record readers return, plain-data meta, the safe torch.load,
model configs read from files, and the overwrite-safe save."""
from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile

import numpy as np
import torch

from minillm_jax.config import ModelConfig, UserError


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


def model_config_from(d, where: str) -> ModelConfig:
  try:
    return ModelConfig.from_dict(dict(d))
  except (TypeError, ValueError) as e:
    raise UserError(f'{where}: bad model_config: {e}') from None


def keys(obj) -> list:
  return sorted(map(str, obj))[:8] if isinstance(obj, dict) else [type(obj).__name__]


def mkparent(path: str):
  if not path or os.path.isdir(path):
    raise UserError(f'--out={path!r} is {"a directory" if path else "empty"}; this format writes a file')
  if os.path.exists(path) and not zipfile.is_zipfile(path):  # a torch.save archive may be replaced, nothing else
    raise UserError(f'--out={path} exists and is not a torch checkpoint; refusing to overwrite it (pick a new '
                    'path)')
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)


def torch_save(obj, path: str):
  tmp = f'{path}.tmp{os.getpid()}'
  torch.save(obj, tmp)  # then one rename: an interrupted export never leaves a half-written file at `path`
  os.replace(tmp, path)
