"""Access to the Hugging Face hub and the `datasets` library: a reachability probe that fails fast offline,
the datasets module configured quietly, and hub dataset rows. Corpora and tokenizers build on these."""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

from minillm_jax.config import UserError
from minillm_jax.data import stream


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


def _local(name: str) -> bool:
  """A dataset folder on disk given as the hub name (the hub's file layout: data/train-*.parquet, train.jsonl,
  validation.jsonl, ...): loaded without any network."""
  return os.path.isdir(os.path.expanduser(name))


def _what(name: str, split: str, config: str, revision: str) -> str:
  return (f'hub dataset {name!r}' + (f' subset {config!r}' if config else '') + f' split {split!r}' +
          (f' revision {revision!r}' if revision else ''))


def explain(e: BaseException, name: str, what: str, config: str, offline: str | None) -> UserError:
  """One line for what the datasets client raised: offline and not cached, gated, a loading script, a missing
  subset or split, anything else shortened."""
  msg = ' '.join(str(e).split())
  low = msg.lower()
  if offline:
    return UserError(f'{what} is not in the local HF cache and the hub is unreachable: {offline}; prepare it once '
                     'with network, or use data.corpus=local')
  if 'gated' in low or ('401' in low and 'auth' in low) or 'must be authenticated' in low:
    return UserError(f'{what} is gated: accept its terms at https://huggingface.co/datasets/{name} and log in '
                     '(hf auth login, or set HF_TOKEN)')
  if 'dataset scripts are no longer supported' in low or ('loading script' in low and 'support' in low):
    return UserError(f'{what} is defined by a loading script, which the datasets library no longer runs; use its '
                     'Parquet conversion (data.hub_revision=refs/convert/parquet) or download its files and use '
                     'data.corpus=local')
  if 'config' in low and ('not found' in low or 'available' in low or 'missing' in low):
    hint = ('set data.hub_config to one of its subsets' if not config else
            f'data.hub_config={config!r} is not one of its subsets')
    return UserError(f'cannot load {what}: {hint}: {msg[:240]}')
  if 'unknown split' in low or 'bad split' in low:
    return NoSplit(f'cannot load {what}: no such split ({msg[:200]}); set data.hub_split (or data.hub_val_split)')
  return UserError(f'cannot load {what}: {type(e).__name__}: {msg[:200]}')


class NoSplit(UserError):
  pass


def _load(name: str, split: str, config: str, revision: str, streaming: bool):
  """`datasets.load_dataset` for one split (a Dataset, or an IterableDataset when streaming), errors explained.
  Offline it loads only from the local cache and fails at once otherwise (the client would retry with backoff)."""
  reason = None if _local(name) else offline_reason()
  datasets = datasets_module(offline=reason is not None or _local(name))
  what = _what(name, split, config, revision)
  kw = {'name': config or None, 'revision': revision or None}
  try:
    return datasets.load_dataset(os.path.expanduser(name) if _local(name) else name, split=split,
                                 streaming=streaming and reason is None, **kw)
  except Exception as e:  # noqa: BLE001 - ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
    raise explain(e, name, what, config, reason) from None


def val_split(name: str, config: str, revision: str, train_split: str) -> str:
  """The dataset's own validation split ('validation', 'valid' or 'val'; '' when it has none)."""
  reason = None if _local(name) else offline_reason()
  if reason:  # offline: the cached copy says which splits it has (and one that is not cached fails at once)
    for s in ('validation', 'valid', 'val'):
      try:
        _load(name, s, config, revision, streaming=False)
        return s
      except NoSplit:
        continue
      except UserError:  # not cached: say it of the split the user asked for
        raise explain(OSError(), name, _what(name, train_split, config, revision), config, reason) from None
    return ''
  datasets = datasets_module(offline=_local(name))
  try:
    names = datasets.get_dataset_split_names(os.path.expanduser(name) if _local(name) else name,
                                             config_name=config or None, revision=revision or None)
  except Exception as e:  # noqa: BLE001
    raise explain(e, name, _what(name, train_split, config, revision), config, reason) from None
  return next((s for s in ('validation', 'valid', 'val') if s in names and s != train_split), '')


def text_reader(name: str, split: str, field: str, config: str = '', revision: str = '',
                streaming: bool = False) -> Callable[[], stream.Pieces]:
  """The reader of a hub dataset's text rows (field `field`): from the downloaded Arrow files in batches, or
  streamed from the hub without a full download (`streaming`, where the dataset allows it)."""
  what = _what(name, split, config, revision)

  def read() -> stream.Pieces:
    ds = _load(name, split, config, revision, streaming)
    names = ds.column_names
    if names is not None and field not in names:
      raise UserError(f'{what} has no field {field!r} (fields: {", ".join(names)}); set data.text_field')
    try:
      if names is not None and not streaming:  # column batches straight from the memory-mapped Arrow files
        rows = ({field: v} for b in ds.select_columns([field]).iter(batch_size=1024) for v in b[field])
        yield from stream._rows_text(what, rows, field)
      else:
        yield from stream._rows_text(what, iter(ds), field)
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001 - a dropped connection mid-stream
      raise explain(e, name, what, config, None) from None
  return read


def dataset_records(name: str, split: str, max_docs: int, config: str = '', revision: str = '') -> list[dict]:
  """All rows (or the first max_docs, streamed when online) of a hub dataset as dicts: chat records."""
  online = not _local(name) and offline_reason() is None
  ds = _load(name, split, config, revision, streaming=bool(max_docs) and online)
  if max_docs:
    return [r for _, r in zip(range(max_docs), ds)]
  return ds.to_list()
