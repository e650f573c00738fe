"""What every torch format shares: the `Imported` record readers return, plain-data meta, the safe torch.load,
model configs read from files, and the overwrite-safe save."""
from __future__ import annotations

import dataclasses
import os
import pickle
import re
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


_GLOBAL = re.compile(r'GLOBAL\s+([\w.<>]+)')


def torch_load(path: str):
  """torch.load(weights_only=True) with one-line errors; a pickled object other than plain data is refused.
  torch's own message advises weights_only=False, which would run the file's code: it is never passed on."""
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # Only a GLOBAL (a class or function to import: torch says 'Unsupported global: GLOBAL x' or 'Trying to load
    # unsupported GLOBAL x', by version) means code; anything else is a bad file.
    g = _GLOBAL.search(str(e))
    if g:
      raise UserError(f'refusing to load {path}: it holds pickled objects other than tensors and plain data '
                      f'({g.group(1)[:80]}), which could run code when loaded; re-save it with plain dicts and '
                      'tensors only') from None
    msg = str(e).split('WeightsUnpickler error:', 1)[-1] if 'WeightsUnpickler error:' in str(e) else ''
    why = next((ln.strip() for ln in msg.splitlines() if ln.strip()), '').split('. Please use')[0]
    why = '' if 'weights_only' in why.lower() else why  # torch's advice to load unsafely is not a reason
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


def is_torch_archive(path: str) -> bool:
  """True for a zip as torch.save writes it: every entry under one top folder `<name>/`, among them
  `<name>/data.pkl` and `<name>/version` (or `<name>/.data/version`). A .docx, .xlsx or .jar is a zip too."""
  try:
    with zipfile.ZipFile(path) as z:
      names = z.namelist()
  except (zipfile.BadZipFile, OSError, ValueError):
    return False
  tops = {n.split('/', 1)[0] for n in names}
  if len(tops) != 1 or not all('/' in n for n in names):
    return False
  top = tops.pop()
  return f'{top}/data.pkl' in names and bool({f'{top}/version', f'{top}/.data/version'} & set(names))


def mkparent(path: str):
  if not path or os.path.isdir(path):
    raise UserError(f'--out={path!r} is {"a directory" if path else "empty"}; this format writes a file')
  if os.path.exists(path) and not is_torch_archive(path):  # a torch.save archive may be replaced, nothing else
    raise UserError(f'--out={path} exists and is not a torch checkpoint; refusing to overwrite it (pick a new '
                    'path)')
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)


def torch_save(obj, path: str):
  tmp = f'{path}.tmp{os.getpid()}'
  torch.save(obj, tmp)  # then one rename: an interrupted export never leaves a half-written file at `path`
  os.replace(tmp, path)
