"""Access to the Hugging Face hub and the `datasets` library: a reachability probe that fails fast offline,
the datasets module configured quietly, and hub dataset rows. Corpora and tokenizers build on these."""
from __future__ import annotations

import logging
import os
import socket

from minillm_jax.config import UserError


def offline_reason() -> str | None:
  """Why the HF hub cannot be reached right now (offline variables, no DNS/TCP), None when it looks reachable.
  Checked up front because the hub clients otherwise retry with backoff before failing."""
  for var in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'TRANSFORMERS_OFFLINE'):
    if os.environ.get(var, '').upper() in ('1', 'ON', 'YES', 'TRUE'):
      return f'{var}={os.environ[var]} is set'
  if any(os.environ.get(v) for v in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy')):
    return None  # behind a proxy a direct probe says nothing; let the client try
  host = os.environ.get('HF_ENDPOINT', 'https://huggingface.co').split('://')[-1].split('/')[0]
  try:
    socket.create_connection((host.split(':')[0], 443), timeout=3).close()
  except OSError as e:
    return f'no network ({host}: {e.strerror or type(e).__name__})'
  return None


def datasets_module(offline: bool):
  if offline:  # as HF_HUB_OFFLINE=1 would, without changing the environment of the user's process
    import huggingface_hub.constants
    huggingface_hub.constants.HF_HUB_OFFLINE = True  # datasets.config copies it at import
  logging.getLogger('datasets').setLevel(logging.WARNING)  # its import logs "JAX version ... available"
  import datasets
  if offline:
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
  datasets.disable_progress_bars()
  # its loaders log a parse error (twice: its handler and absl's) before raising it; we report the exception once
  datasets.logging.set_verbosity(datasets.logging.CRITICAL)
  return datasets


def column(ds, field: str, where: str) -> list[str]:
  if field not in ds.column_names:
    raise UserError(f'{where} has no field {field!r} (fields: {", ".join(ds.column_names)}); set data.text_field')
  return [t for t in ds[field] if isinstance(t, str) and t]


def _rows(name: str, split: str, max_docs: int, config: str = '', revision: str = ''):
  """The rows of a hub dataset: a list of the first max_docs row dicts (streamed) or the whole `datasets.Dataset`.
  Without network it loads only from the local cache and fails at once otherwise (the datasets client would retry
  with backoff). `config`: the subset (e.g. one of OpenCoder-LLM/opc-sft-stage2's four); `revision`: a branch, tag
  or commit."""
  reason = offline_reason()
  datasets = datasets_module(offline=reason is not None)
  what = f'hub dataset {name!r}' + (f' subset {config!r}' if config else '') + f' split {split!r}' + (
      f' revision {revision!r}' if revision else '')
  kw = {'name': config or None, 'revision': revision or None}
  try:
    if max_docs and reason is None:  # stream just the first rows instead of downloading everything
      return [r for _, r in zip(range(max_docs), datasets.load_dataset(name, split=split, streaming=True, **kw))]
    return datasets.load_dataset(name, split=split, **kw)
  except Exception as e:  # noqa: BLE001 - ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
    if reason:
      raise UserError(f'{what} is not in the local HF cache and the hub is unreachable: {reason}; prepare it once '
                      'with network, or use data.corpus=local') from None
    msg = " ".join(str(e).split())[:200]
    hint = '; set data.hub_config to one of its subsets' if 'config' in msg.lower() and not config else ''
    raise UserError(f'cannot load {what}: {type(e).__name__}: {msg}{hint}') from None


def dataset_docs(name: str, split: str, field: str, max_docs: int, config: str = '', revision: str = ''
                 ) -> list[str]:
  """Non-empty text rows of field `field` of a hub dataset (see _rows)."""
  ds = _rows(name, split, max_docs, config, revision)
  if isinstance(ds, list):
    rows = [r.get(field) for r in ds]
    if rows and all(r is None for r in rows):
      raise UserError(f'hub dataset {name} has no field {field!r}; set data.text_field')
    return [t for t in rows if isinstance(t, str) and t]
  return column(ds, field, f'hub dataset {name}')


def dataset_records(name: str, split: str, max_docs: int, config: str = '', revision: str = '') -> list[dict]:
  """All rows (or the first max_docs) of a hub dataset as dicts: chat records (see _rows)."""
  ds = _rows(name, split, max_docs, config, revision)
  return ds if isinstance(ds, list) else ds.to_list()
