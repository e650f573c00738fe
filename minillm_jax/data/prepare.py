"""Tokenize a corpus once into flat token files, cached by content.

  python -m minillm_jax.prepare --config=configs/shakespeare_char.py

Cache layout: <data.cache_dir or <repo>/data/cache>/<corpus>-<tokenizer>-<key>/ with train.bin, val.bin (flat
uint16/uint32 ids, every document followed by <|endoftext|>), tokenizer.json and manifest.json. data.format=chat
writes packed windows of block_size + 1 tokens instead (data.chat_data.pack) and train.mask, val.mask beside them
(uint8, 1 where the token is an assistant reply's). The key hashes
the corpus content, the data settings that change the tokens and the tokenizer spec, so a changed corpus or
tokenizer prepares again and an unchanged one is reused at once. Text corpora are streamed (data.encode): memory
stays bounded whatever their size. A cache directory only appears by an atomic rename of a finished temp
directory: a killed prepare leaves no directory that looks complete, and the next prepare says it starts over.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from minillm_jax.config import UserError, default_config
from minillm_jax.data import chat_data, corpora, encode, instruct
from minillm_jax.data import tokenizer as toklib
from minillm_jax.data.template import render_ids, render_template

log = logging.getLogger(__name__)

VERSION = 1  # bump when the token file format or the tokenization procedure changes
_REPO = Path(__file__).resolve().parents[2]
# A source checkout keeps its caches in its data/cache (git-ignored); an installed wheel in the user cache dir.
DEFAULT_CACHE = (_REPO / 'data' / 'cache' if (_REPO / 'pyproject.toml').is_file() else
                 Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'minillm_jax' / 'tokens')
_STALE_TMP_S = 6 * 3600
_MARKER = '.minillm-prepare'  # written first into prepare's own temp dirs: {"pid", "host"}
_TMP_NAME = re.compile(r'\.tmp-.+-(\d+)-[0-9a-f]{8}')
_HASH_CHUNK = 1 << 24
PACK_SEED = 0  # the packing order of chat conversations (data.chat_data.pack)


@dataclasses.dataclass(frozen=True)
class Prepared:
  dir: Path
  train_path: Path
  val_path: Path
  tokenizer_path: Path
  dtype: np.dtype
  vocab_size: int
  n_train: int          # tokens
  n_val: int
  eot_id: int
  manifest: dict
  window: int = 0       # data.format=chat: tokens per packed row (block_size + 1); 0 for text

  @property
  def chat(self) -> bool:
    return self.window > 0

  def mask_path(self, split: str) -> Path:
    return self.dir / f'{split}.mask'

  def tokenizer(self) -> toklib.Tok:
    return toklib.Tok.from_file(str(self.tokenizer_path))

  def tokens(self, split: str) -> np.ndarray:
    """The whole split as a read-only memmap ('train' or 'val')."""
    path, n = (self.train_path, self.n_train) if split == 'train' else (self.val_path, self.n_val)
    return np.memmap(path, dtype=self.dtype, mode='r', shape=(n,))

  def masks(self, split: str) -> np.ndarray:
    """data.format=chat: the split's loss mask (uint8, one per token) as a read-only memmap."""
    return np.memmap(self.mask_path(split), dtype=np.uint8, mode='r',
                     shape=(self.n_train if split == 'train' else self.n_val,))


def cache_root(d: ConfigDict) -> Path:
  return Path(os.path.expanduser(d.cache_dir)) if d.cache_dir else DEFAULT_CACHE


def _tokenizer_key(cfg: ConfigDict) -> tuple[str, dict]:
  """(short name for the directory, everything that determines the tokenizer)."""
  spec = cfg.data.tokenizer
  kind = toklib.spec_kind(spec)
  if kind == 'char':
    return 'char', {'kind': 'char', 'specials': toklib.SPECIALS + (toklib.UNK,)}
  if kind == 'bpe':
    v = encode.bpe_vocab_size(cfg)
    spec = {'kind': 'bpe', 'vocab_size': v, 'min_frequency': 2, 'specials': toklib.SPECIALS}
    budget = int(cfg.data.tokenizer_train_chars)
    # the budget binds only on big corpora: keyed for user data, or when changed (the embedded caches keep names)
    if cfg.data.corpus in ('local', 'hub') or budget != default_config().data.tokenizer_train_chars:
      spec['train_chars'] = budget
    return f'bpe{v}', spec
  if kind == 'hub':
    return 'hub', {'kind': 'hub', 'name': spec[4:]}
  path = toklib.gpt2_path() if kind == 'gpt2' else os.path.expanduser(spec)
  if kind == 'gpt2':
    kind = toklib.spec_kind(path)
  names = ('vocab.json', 'merges.txt') if kind == 'gpt2_dir' else ('tokenizer.json',)
  digest = hashlib.sha256()
  for f in [os.path.join(path, n) for n in names] if os.path.isdir(path) else [path]:
    try:
      with open(f, 'rb') as fh:
        digest.update(fh.read())
    except OSError as e:
      raise UserError(f'cannot read tokenizer file {f}: {e.strerror}') from None
  return ('gpt2' if spec == 'gpt2' else 'file'), {'kind': kind, 'sha256': digest.hexdigest()}


def cache_key(cfg: ConfigDict) -> tuple[str, dict]:
  """(directory name, the keyed settings). Raises UserError for an unknown corpus/tokenizer or missing path."""
  d = cfg.data
  tname, tspec = _tokenizer_key(cfg)  # first: an unknown tokenizer fails before any corpus is read
  fp = instruct.fingerprint() if d.corpus == 'python_instruct' else corpora.fingerprint(d)
  parts = {'version': VERSION, 'corpus': d.corpus, 'corpus_fingerprint': fp,
           'tokenizer': tspec, 'val_fraction': float(d.val_fraction), 'max_docs': int(d.max_docs)}
  if d.val_path:  # (these keys only exist when set, so other caches keep their names)
    parts['val_fingerprint'] = corpora._local_sha(d.val_path, d.text_field, 'data.val_path')
  if d.format == 'chat':  # (text caches keep their names: these keys only exist for chat)
    parts.update(format='chat', window=cfg.model.block_size + 1, template=render_template(
        [{'role': r, 'content': ''} for r in ('system', 'user', 'assistant')]), pack_seed=PACK_SEED)
  key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
  return f'{d.corpus}-{tname}-{key}', parts


def file_digest(path: Path, dtype: np.dtype) -> tuple[str, int]:
  """(blake2b-128 of the file, its largest id): one pass in 16 MB chunks (about 0.2 s for 100 MB)."""
  h, top = hashlib.blake2b(digest_size=16), -1
  with open(path, 'rb') as f:
    while chunk := f.read(_HASH_CHUNK):
      h.update(chunk)
      ids = np.frombuffer(chunk, dtype=dtype, count=len(chunk) // dtype.itemsize)
      if ids.size:
        top = max(top, int(ids.max()))
  return h.hexdigest(), top


def _open(out: Path) -> Prepared | None:
  """A finished cache directory, or None when it is missing or damaged (sizes, content hash, ids beyond the
  vocabulary: the cache is derived data, so a damaged one is said in one line and prepared again)."""
  try:
    m = json.loads((out / 'manifest.json').read_text())
    dtype = np.dtype(m['dtype'])
    for split in ('train', 'val'):
      if (out / f'{split}.bin').stat().st_size != m[f'n_{split}'] * dtype.itemsize:
        raise ValueError(f'{split}.bin size does not match the manifest')
    if not (out / 'tokenizer.json').is_file():
      raise ValueError('tokenizer.json missing')
    window = int(m.get('window', 0))
    for split in ('train', 'val'):
      digest, top = file_digest(out / f'{split}.bin', dtype)
      if m.get(f'{split}_blake2b') not in (None, digest):  # caches made before the hash was recorded: sizes only
        raise ValueError(f'{split}.bin content does not match the hash in manifest.json')
      if top >= m['vocab_size']:
        raise ValueError(f'{split}.bin holds token id {top}, beyond the vocabulary of {m["vocab_size"]}')
      if window:
        if m[f'n_{split}'] % window:
          raise ValueError(f'{split}.bin is not a whole number of {window}-token windows')
        digest, top = file_digest(out / f'{split}.mask', np.dtype(np.uint8))
        if m[f'{split}_mask_blake2b'] != digest or top > 1:
          raise ValueError(f'{split}.mask content does not match the hash in manifest.json')
  except (FileNotFoundError, NotADirectoryError):  # not prepared yet (or cache_dir unusable: makedirs says so)
    return None
  except (OSError, ValueError, KeyError, TypeError) as e:
    log.warning('token cache %s is damaged (%s); rebuilding it', out, e)
    return None
  return Prepared(dir=out, train_path=out / 'train.bin', val_path=out / 'val.bin',
                  tokenizer_path=out / 'tokenizer.json', dtype=dtype, vocab_size=m['vocab_size'],
                  n_train=m['n_train'], n_val=m['n_val'], eot_id=m['eot_id'], manifest=m, window=window)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):
    return True
  return True


def _clean_stale(root: Path, name: str = ''):
  """Removes temp dirs a killed prepare left: only prepare's own (its name pattern and the marker it writes
  first), and only when the process that made it is gone (same host) or, from another host, older than 6 h.
  Anything else named .tmp-* under the cache root is the user's and stays."""
  now = time.time()
  for p in root.glob('.tmp-*'):
    try:
      match = _TMP_NAME.fullmatch(p.name)
      if not match or p.is_symlink() or not p.is_dir():
        continue
      mark = json.loads((p / _MARKER).read_text())
      if not isinstance(mark, dict) or mark.get('pid') != int(match.group(1)):
        continue
      if mark.get('host') == socket.gethostname():
        if _pid_alive(mark['pid']):
          continue
      elif now - p.stat().st_mtime <= _STALE_TMP_S:
        continue
      shutil.rmtree(p, ignore_errors=True)
      if name and p.name.startswith(f'.tmp-{name}-'):
        log.warning('an earlier prepare of %s was interrupted (pid %s); starting over', name, match.group(1))
    except (OSError, ValueError):
      pass


def _chat_files(cfg: ConfigDict, tmp: Path) -> dict:
  """data.format=chat: conversations rendered with the chat template (ids + assistant mask), each followed by
  <|endoftext|>, packed into windows of block_size + 1 tokens (data.chat_data.pack): train/val .bin and .mask."""
  d, window = cfg.data, cfg.model.block_size + 1
  train, val, info = chat_data.conversations(d)
  text = {s: [render_template(c, add_generation_prompt=False) for c in convs] for s, convs in
          (('train', train), ('val', val))}
  tok = encode.build_tokenizer(cfg, text['train'] + text['val'], text['train'])
  if tok.pad_id is None:
    raise UserError(f'data.tokenizer={d.tokenizer} has no <|pad|> token to fill the packed chat windows; use a '
                    'tokenizer made by this project (char, bpe) or fine-tune from a run that has one')
  dtype = toklib.dtype_for(tok.vocab_size)
  out = {'corpus': d.corpus, 'corpus_info': info, 'tok': tok, 'dtype': dtype.name, 'format': 'chat',
         'window': window, 'split': 'conversations'}
  for split, convs in (('train', train), ('val', val)):
    units = []
    for c in tqdm(convs, desc=f'render {split}', unit='conv', disable=not encode.tty(), leave=False):
      ids, mask = render_ids(tok, c)
      units.append((ids + [tok.eot_id], mask + [0]))
    ids, mask, stats = chat_data.pack(units, window, tok.pad_id, PACK_SEED)
    _write_array(tmp / f'{split}.bin', ids.astype(dtype))
    _write_array(tmp / f'{split}.mask', mask)
    out[f'n_{split}'] = int(ids.size)
    out[f'{split}_mask_blake2b'] = file_digest(tmp / f'{split}.mask', np.dtype(np.uint8))[0]
    out[f'{split}_packing'] = stats
    out[f'n_{split}_docs'] = len(convs)
    if stats['dropped']:
      log.warning('%s: %d of %d conversations are longer than block_size + 1 = %d tokens and were dropped (%d '
                  'tokens); raise model.block_size to keep them', split, stats['dropped'], len(convs), window,
                  stats['dropped_tokens'])
  tok.save(str(tmp / 'tokenizer.json'))
  return out


def _write_array(path: Path, a: np.ndarray):
  with open(path, 'wb') as f:
    f.write(a.tobytes())
    f.flush()
    os.fsync(f.fileno())


def _build(cfg: ConfigDict, root: Path, name: str, parts: dict) -> None:
  d = cfg.data
  t0 = time.time()
  root.mkdir(parents=True, exist_ok=True)
  _clean_stale(root, name)
  tmp = root / f'.tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  tmp.mkdir()
  try:
    (tmp / _MARKER).write_text(json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}))
    got = _chat_files(cfg, tmp) if d.format == 'chat' else encode.text_files(cfg, tmp)
    tok = got.pop('tok')
    digests = {f'{split}_blake2b': file_digest(tmp / f'{split}.bin', np.dtype(got['dtype']))[0]
               for split in ('train', 'val')}
    source = {k: d[k] for k in ('path', 'code_path', 'books_path', 'val_path', 'hub_name', 'hub_config',
                                'hub_revision', 'hub_split', 'text_field', 'code_weight')}  # as first seen
    m = {'name': name, 'key': parts, 'source': source,
         'tokenizer': {'spec': d.tokenizer, 'kind': tok.kind, 'hash': tok.hash}, 'vocab_size': tok.vocab_size,
         'eot_id': tok.eot_id, 'pad_id': tok.pad_id, **got, **digests,
         'seconds': round(time.time() - t0, 2), 'created': time.strftime('%Y-%m-%dT%H:%M:%S')}
    # The manifest goes last and the rename publishes the directory: both are what "complete" means.
    (tmp / _MARKER).unlink()
    (tmp / 'manifest.json').write_text(json.dumps(m, indent=2, default=str))
    out = root / name
    try:
      os.rename(tmp, out)
    except OSError:  # a concurrent prepare finished first (or a damaged dir is in the way): keep a good one
      if _open(out) is not None:
        shutil.rmtree(tmp, ignore_errors=True)
      else:
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log.info('prepared %s in %.1fs: %d train + %d val tokens', out, time.time() - t0, m['n_train'], m['n_val'])


def prepare(cfg: ConfigDict) -> Prepared:
  """Token files for cfg.data, built on first use; checks both splits hold a model.block_size + 1 window."""
  root = cache_root(cfg.data)
  name, parts = cache_key(cfg)
  prep = _open(root / name)
  if prep is None:
    _build(cfg, root, name, parts)
    prep = _open(root / name)
    if prep is None:
      raise UserError(f'the cache {root / name} was written but cannot be read back; is the disk full?')
  need = cfg.model.block_size + 1
  for split, n in (('train', prep.n_train), ('val', prep.n_val)):
    if n < need and prep.chat:
      st = prep.manifest[f'{split}_packing']
      raise UserError(f'the {split} split of corpus {cfg.data.corpus} keeps no conversation: all {st["dropped"]} '
                      f'are longer than model.block_size + 1 = {need} tokens; raise model.block_size')
    if n < need:
      hint = 'raise data.val_fraction, ' if split == 'val' else ''
      raise UserError(f'the {split} split of corpus {cfg.data.corpus} has {n} tokens, fewer than model.block_size'
                      f' + 1 = {need}; {hint}use more text or lower model.block_size')
  return prep
