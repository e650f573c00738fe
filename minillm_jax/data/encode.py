"""A text corpus into token files, streamed: memory stays bounded whatever the corpus size.

Three passes over the corpus's source (data.stream): one hashes and measures every document (the train/val split
needs all the hashes), one feeds a sample of the training text to the BPE trainer (at most
data.tokenizer_train_chars characters), one encodes with HF tokenizers' batch encoding (its Rust threads share the
pieces) and appends the ids to train.bin / val.bin, each document followed by <|endoftext|>.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from minillm_jax.config import UserError
from minillm_jax.data import corpora, stream
from minillm_jax.data import tokenizer as toklib

log = logging.getLogger(__name__)

_BATCH = 1 << 21  # characters per encode_batch call: bounds memory (ids and encodings) and paces the bar


def bpe_vocab_size(cfg: ConfigDict) -> int:
  v = cfg.data.vocab_size or cfg.model.vocab_size
  if v is None:
    raise UserError('data.tokenizer=bpe needs a vocabulary size: set data.vocab_size (or model.vocab_size)')
  return int(v)


def build_tokenizer(cfg: ConfigDict, alphabet: Iterable[str], train_text: Iterable[str]) -> toklib.Tok:
  """char: over `alphabet` (every character of the corpus, val included, so val characters are never <|unk|>);
  bpe: trained on `train_text` (pieces of the training documents); anything else loaded."""
  spec = cfg.data.tokenizer
  if spec == 'char':
    return toklib.build_char(alphabet)
  if spec == 'bpe':
    t0 = time.time()
    tok = toklib.train_bpe(train_text, bpe_vocab_size(cfg), show_progress=tty())
    log.info('trained BPE %d in %.1fs', tok.vocab_size, time.time() - t0)
    if tok.vocab_size < bpe_vocab_size(cfg):
      log.warning('BPE vocabulary stopped at %d tokens (asked for %d): the corpus has no more pairs seen twice',
                  tok.vocab_size, bpe_vocab_size(cfg))
    return tok
  return toklib.load(spec)


def tty() -> bool:
  return sys.stderr.isatty()


class _Writer:
  """Appends the ids of pieces to a token file, encoding them in batches of about _BATCH characters (HF
  tokenizers' batch encoding: its Rust threads share the pieces) and each document's end as <|endoftext|>."""

  def __init__(self, tok: toklib.Tok, path: Path, dtype: np.dtype, on_batch=lambda chars, tokens: None):
    self.tok, self.dtype, self.on_batch = tok, dtype, on_batch
    self.exact = tok.kind in ('char', 'bpe')  # other tokenizers get whole documents (up to _BATCH characters)
    self.f = open(path, 'wb')  # noqa: SIM115 - closed in close()
    self.pending: list[list] = []
    self.chars = self.n = self.docs = 0
    self.eot = np.array([tok.eot_id], dtype)

  def add(self, piece: str, end: bool):
    if not self.exact and self.pending and not self.pending[-1][1]:
      self.pending[-1][0] += piece
      self.pending[-1][1] = end
    else:
      self.pending.append([piece, end])
    self.chars += len(piece)
    self.docs += end
    if self.chars >= _BATCH:
      self.flush()

  def flush(self):
    if not self.pending:
      return
    out = []
    for (_, end), ids in zip(self.pending, self.tok.encode_batch_np([p for p, _ in self.pending])):
      out.append(np.asarray(ids, self.dtype))
      if end:
        out.append(self.eot)
    arr = np.concatenate(out)
    self.f.write(arr.tobytes())
    self.n += arr.size
    self.on_batch(self.chars, arr.size)
    self.pending, self.chars = [], 0

  def close(self) -> int:
    self.flush()
    self.f.flush()
    os.fsync(self.f.fileno())
    self.f.close()
    return self.n


def _bar(desc: str, total: int | None):
  return tqdm(total=total, unit='char', unit_scale=True, desc=desc, disable=not tty(), leave=False)


@dataclasses.dataclass
class Plan:
  """What the first pass found: the sources, every document's hash and size, and the train/val split."""
  train_src: stream.Source
  val_src: stream.Source | None
  sc: stream.Scan
  vsc: stream.Scan | None
  is_val: np.ndarray   # [documents of train_src]: True for validation (the 'docs' split)
  cut_at: int          # the 'chars' split of a single document: its first cut_at characters train; else -1
  how: str             # 'docs' | 'chars' | 'val_path' | 'hub_split'
  replaced: int        # undecodable byte sequences replaced

  def route(self) -> Iterator[tuple[str, str, bool]]:
    """(split, piece, end) for every piece of the training source, in one pass."""
    i = pos = 0
    for p, end in self.train_src.read():
      if self.cut_at < 0:
        yield ('val' if self.is_val[i] else 'train'), p, end
        i += end
      elif pos >= self.cut_at:
        yield 'val', p, end
      else:
        c = self.cut_at - pos
        if c >= len(p) and not end:
          yield 'train', p, False
        else:
          yield 'train', p[:c], True
          if len(p) > c or end:
            yield 'val', p[c:], end
      pos += len(p)

  @property
  def train_chars(self) -> int:
    return int(self.sc.chars[~self.is_val].sum()) if self.cut_at < 0 else self.cut_at

  @property
  def total_chars(self) -> int:
    return int(self.sc.chars.sum()) + (int(self.vsc.chars.sum()) if self.vsc else 0)

  def tokenizer(self, cfg: ConfigDict) -> tuple[toklib.Tok, float]:
    """(the tokenizer prepare builds for cfg, the share of training characters a BPE learned from)."""
    d = cfg.data
    rate = stream.sample_rate(int(d.tokenizer_train_chars), self.train_chars)
    if d.tokenizer == 'bpe' and rate < 1:
      log.info('BPE learns from a %.1f%% sample of the %d training characters (data.tokenizer_train_chars=%d)',
               100 * rate, self.train_chars, d.tokenizer_train_chars)
    alphabet = self.sc.alphabet | (self.vsc.alphabet if self.vsc else set())
    train = stream.sampled((p for s, p, _ in self.route() if s == 'train'), rate)
    return build_tokenizer(cfg, [''.join(sorted(alphabet))], train), rate


def plan(cfg: ConfigDict) -> Plan:
  """The first pass over cfg.data's corpus: hashes and sizes (and the alphabet for char), then the split."""
  d = cfg.data
  train_src, val_src, how = corpora.sources(d)
  char = d.tokenizer == 'char'
  with _bar('scan', None) as bar:
    sc = stream.scan(train_src, alphabet=char, progress=bar.update)
    vsc = stream.scan(val_src, alphabet=char, progress=bar.update) if val_src else None
  if not sc.n:
    raise UserError(f'corpus {train_src.name} is empty (no non-empty documents)')
  if vsc is not None and not vsc.n:
    raise UserError(f'the validation {"files" if how == "val_path" else "split"} of corpus {train_src.name} hold no '
                    'non-empty documents')
  replaced = sc.replaced + (vsc.replaced if vsc else 0) + train_src.info.pop('replaced_bytes', 0)
  if replaced and d.corpus in ('local', 'hub'):  # (embedded corpora say it when they are built)
    log.warning('corpus %s: %d undecodable byte sequence(s) replaced by U+FFFD (not UTF-8)', d.corpus, replaced)
  is_val, cut_at = np.zeros(sc.n, bool), -1
  if val_src is None and sc.n == 1:  # one document: its last val_fraction of characters is the validation set
    cut_at, how = round(int(sc.chars[0]) * (1 - d.val_fraction)), 'chars'
    log.info('one document: split by characters, the last %.0f%% is the validation set', 100 * d.val_fraction)
  elif val_src is None:
    is_val, how = stream.split_mask(sc.digests, sc.chars, d.val_fraction), 'docs'
  return Plan(train_src, val_src, sc, vsc, is_val, cut_at, how, replaced)


def val_docs(cfg: ConfigDict) -> Iterator[str]:
  """cfg.data's validation documents as prepare splits them, streamed: the first pass (plan) hashes the whole
  corpus in bounded memory, then documents are read only as far as the caller takes them (evaluate's
  perplexity scores the first --max_eval_tokens)."""
  p = plan(cfg)
  if p.val_src is not None:
    return stream.docs(p.val_src.read())
  return stream.docs((t, end) for s, t, end in p.route() if s == 'val')


def text_files(cfg: ConfigDict, tmp: Path) -> dict:
  """Writes train.bin, val.bin and tokenizer.json of a text corpus into tmp, streaming it (memory stays bounded
  whatever its size). Returns the manifest's fields."""
  pl = plan(cfg)
  tok, rate = pl.tokenizer(cfg)
  dtype = toklib.dtype_for(tok.vocab_size)
  t0, done = time.time(), [0, 0]
  with _bar('tokenize', pl.total_chars) as bar:
    w = {}

    def on_batch(chars: int, tokens: int):
      done[0] += chars
      done[1] += tokens
      bar.update(chars)
      secs = max(time.time() - t0, 1e-9)
      bar.set_postfix_str(f'{sum(x.docs for x in w.values()):,} docs, {done[0] / secs / 1e6:.1f} MB/s, '
                          f'{done[1] / secs / 1e6:.2f}M tok/s', refresh=False)
    w.update({s: _Writer(tok, tmp / f'{s}.bin', dtype, on_batch) for s in ('train', 'val')})
    for s, p, end in pl.route():
      w[s].add(p, end)
    for p, end in (pl.val_src.read() if pl.val_src else ()):
      w['val'].add(p, end)
    docs = {s: w[s].docs for s in w}
    n = {s: w[s].close() for s in w}
  secs, total = time.time() - t0, pl.total_chars
  log.info('tokenized %.1f MB of text in %.1fs: %.2f MB/s, %.2fM tokens/s', total / 1e6, secs,
           total / 1e6 / max(secs, 1e-9), (n['train'] + n['val']) / 1e6 / max(secs, 1e-9))
  tok.save(str(tmp / 'tokenizer.json'))
  return {'corpus': pl.train_src.name, 'corpus_info': pl.train_src.info, 'tok': tok, 'dtype': dtype.name,
          'n_train': n['train'], 'n_val': n['val'], 'n_train_docs': docs['train'], 'n_val_docs': docs['val'],
          'train_chars': pl.train_chars, 'val_chars': total - pl.train_chars, 'split': pl.how,
          'replaced_bytes': pl.replaced, 'tokenize_seconds': round(secs, 2),
          'bpe_sample_rate': rate if cfg.data.tokenizer == 'bpe' else None}
