"""Corpora as streams of text pieces, read in bounded memory: what prepare tokenizes.

A source yields `(piece, end)` pairs: a document's text in pieces of about `PIECE` characters, `end` on its last
piece. Pieces are cut where encoding them one by one gives exactly the ids of the whole document (see `cut`), so
a file of many GB is never one Python string. Every pass over a source reads it again from its files or the hub:
prepare makes one pass to hash and measure the documents (the split needs every document's hash), one to sample
BPE training text and one to encode (`minillm_jax.data.prepare`).
"""
from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from minillm_jax.config import UserError

PIECE = 1 << 16      # characters per piece (long documents are cut so the encoder's threads share them)
_LONG = 1 << 22      # a run this long without a clean cut is cut at a space, then anywhere
_READ = 1 << 20      # characters per read of a text file
_ROWS = 1024         # rows per batch of a Parquet file

Pieces = Iterator[tuple[str, bool]]


# ---- undecodable bytes: replaced by U+FFFD, like errors='replace', and counted ----

_BAD = [0]


def _count_bad(e: UnicodeDecodeError):
  _BAD[0] += 1
  return '\ufffd', e.end


codecs.register_error('minillm-count', _count_bad)


def bad_count() -> int:
  """Undecodable byte sequences replaced so far in this process (read it before and after a pass)."""
  return _BAD[0]


def decode(raw: bytes) -> tuple[str, int]:
  """UTF-8 with bad bytes replaced by U+FFFD; returns the text and how many sequences were replaced."""
  before = _BAD[0]
  text = raw.decode('utf-8', errors='minillm-count')
  return text, _BAD[0] - before


def is_binary(head: bytes) -> bool:
  """NUL bytes, or more than 30% undecodable sequences in the first 64 kB: not text (an image, an archive; random
  bytes decode to about half replacement characters, Latin-1 text to a few per cent)."""
  head = head[:1 << 16]
  if b'\0' in head:
    return True
  text = head.decode('utf-8', errors='replace')
  bad = text.count('\ufffd') - head.count('\ufffd'.encode())
  return bad > 0.3 * max(1, len(text))


# ---- cutting ----

def cut(text: str, start: int) -> int:
  """A cut at or after `start` (len(text) when there is none): before a newline that follows a non-space
  character. The byte-level BPE regex never joins such a pair into one pre-token and the whitespace run after
  the cut starts afresh in both cases, so the pieces encode to the ids of the whole (tested)."""
  k = text.find('\n', start)
  while k != -1 and text[k - 1].isspace():
    k = text.find('\n', k + 1)
  return len(text) if k == -1 else k


def _space_cut(text: str, start: int) -> int:
  """Before a single space between two non-spaces: every alternative of the GPT-2 regex takes one optional
  leading space, so this cut is exact too. -1 when there is none."""
  k = text.find(' ', start)
  while k != -1 and (k + 1 >= len(text) or text[k - 1].isspace() or text[k + 1].isspace()):
    k = text.find(' ', k + 1)
  return k


def pieces(chunks: Iterable[str]) -> Pieces:
  """One document, given as consecutive chunks of its text, as exact pieces of about PIECE characters. A run of
  more than 4M characters without a newline is cut at a space (exact), then anywhere (not exact for BPE)."""
  buf = ''
  for chunk in chunks:
    buf += chunk
    while len(buf) > PIECE:
      k = cut(buf, PIECE)
      if k == len(buf):  # no newline cut yet: wait for more text, unless the run is already very long
        if len(buf) < _LONG:
          break
        k = _space_cut(buf, PIECE)
        k = PIECE if k == -1 else k
      yield buf[:k], False
      buf = buf[k:]
  while len(buf) > PIECE:  # the document's tail: cut where the rule allows, keep the rest whole
    k = cut(buf, PIECE)
    if k == len(buf):
      break
    yield buf[:k], False
    buf = buf[k:]
  yield buf, True


def doc_pieces(doc: str) -> Pieces:
  return pieces((doc,))


def docs(pieces_: Iterable[tuple[str, bool]]) -> Iterator[str]:
  """The documents of a stream of pieces, each whole, one at a time (every document's last piece ends it)."""
  parts: list[str] = []
  for p, end in pieces_:
    parts.append(p)
    if end:
      yield ''.join(parts)
      parts = []


# ---- sources ----

@dataclasses.dataclass
class Source:
  """A corpus that can be read any number of times: `read()` starts a pass."""
  name: str
  read: Callable[[], Pieces]
  info: dict = dataclasses.field(default_factory=dict)


def from_docs(name: str, docs: list[str], info: dict | None = None) -> Source:
  return Source(name, lambda: (p for d in docs if d for p in doc_pieces(d)), info or {})


def chained(name: str, parts: list[Callable[[], Pieces]], max_docs: int = 0, info: dict | None = None) -> Source:
  """Several readers one after the other; with max_docs, the first max_docs documents only."""
  def read() -> Pieces:
    n = 0
    for part in parts:
      for p, end in part():
        yield p, end
        n += end
        if max_docs and n >= max_docs:
          return
  return Source(name, read, info or {})


# ---- local files ----

def text_file(path: str) -> Pieces:
  """A text or source file as one document, read in chunks (UTF-8, bad bytes replaced and counted, newlines
  normalised to \\n as Python's text mode does)."""
  with open(path, encoding='utf-8', errors='minillm-count', newline=None) as f:
    yield from pieces(iter(lambda: f.read(_READ), ''))


def file_kind(path: str) -> str:
  """'binary' | 'empty' | 'text' from the file's first 64 kB (an empty file is only whitespace)."""
  try:
    with open(path, 'rb') as f:
      head = f.read(1 << 16)
  except OSError as e:
    raise UserError(f'cannot read {path}: {e.strerror}') from None
  if is_binary(head):
    return 'binary'
  if len(head) < 1 << 16 and not head.strip():
    return 'empty'
  return 'text'


def _field_error(path: str, field: str, fields: Iterable[str]) -> UserError:
  return UserError(f'{path} has no field {field!r} (fields: {", ".join(fields) or "none"}); set data.text_field')


def _type_error(path: str, field: str, kinds: set[str], fields: Iterable[str]) -> UserError:
  return UserError(f'field {field!r} of {path} holds {"/".join(sorted(kinds)) or "null"} values, not text; set '
                   f'data.text_field to a field of strings (fields: {", ".join(fields)})')


def _rows_text(path: str, rows: Iterable[dict], field: str) -> Pieces:
  """The non-empty strings of `field` in dict rows; refuses a file where no row has the field or none is text."""
  n_rows = n_text = 0
  kinds, fields = set(), []
  for row in rows:
    if not isinstance(row, dict):
      raise UserError(f'{path}: rows must be JSON objects, found {type(row).__name__}')
    n_rows += 1
    if n_rows == 1:
      fields = list(row)
    v = row.get(field)
    if isinstance(v, str):
      n_text += 1
      if v:
        yield from doc_pieces(v)
    elif v is not None:
      kinds.add(type(v).__name__)
  if n_rows and not n_text:
    raise _type_error(path, field, kinds, fields) if kinds else _field_error(path, field, fields)


def _jsonl_rows(path: str) -> Iterator[dict]:
  with open(path, encoding='utf-8', errors='minillm-count') as f:
    for i, line in enumerate(f, 1):
      if line.strip():
        try:
          yield json.loads(line)
        except json.JSONDecodeError as e:
          raise UserError(f'{path}:{i}: not valid JSON ({e.msg}); one JSON object per line is expected') from None


def _json_rows(path: str) -> Iterator[dict]:
  """A .json file: a list of objects, an object of columns, or JSON lines. Read whole unless it is JSON lines
  (use .jsonl for large data)."""
  with open(path, encoding='utf-8', errors='minillm-count') as f:
    text = f.read()
  try:
    data = json.loads(text)
  except json.JSONDecodeError:
    del text
    yield from _jsonl_rows(path)
    return
  if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
    keys = list(data)
    data = [dict(zip(keys, vals)) for vals in zip(*data.values())]
  if not isinstance(data, list):
    raise UserError(f'{path}: expected a list of objects, an object of columns or JSON lines')
  yield from data


def _parquet_text(path: str, field: str) -> Pieces:
  import pyarrow.parquet as pq
  try:
    f = pq.ParquetFile(path)
  except Exception as e:  # noqa: BLE001 - arrow raises several types for a damaged file
    raise UserError(f'cannot read Parquet file {path}: {" ".join(str(e).split())[:200]}') from None
  names = f.schema_arrow.names
  if field not in names:
    raise _field_error(path, field, names)
  kind = f.schema_arrow.field(field).type
  if not (str(kind) in ('string', 'large_string', 'string_view')):
    raise _type_error(path, field, {str(kind)}, names)
  for batch in f.iter_batches(batch_size=_ROWS, columns=[field]):
    for v in batch.column(0).to_pylist():
      if v:
        yield from doc_pieces(v)


def file_reader(path: str, kind: str, field: str) -> Callable[[], Pieces]:
  """The reader of one local file: kind 'text' (one document), 'json' or 'parquet' (one per row)."""
  if kind == 'text':
    return lambda: text_file(path)
  if kind == 'parquet':
    return lambda: _parquet_text(path, field)
  rows = _jsonl_rows if Path(path).suffix == '.jsonl' else _json_rows
  return lambda: _rows_text(path, rows(path), field)


# ---- one pass: what the split and the tokenizer need ----

@dataclasses.dataclass
class Scan:
  digests: np.ndarray   # [N] 'S32': sha256 of each document's UTF-8 text
  chars: np.ndarray     # [N] int64: characters per document
  alphabet: set[str]    # every character seen (only when asked for)
  replaced: int         # undecodable byte sequences replaced

  @property
  def n(self) -> int:
    return len(self.chars)


def scan(src: Source, alphabet: bool = False, progress: Callable[[int], None] = lambda n: None) -> Scan:
  digests, chars, letters = bytearray(), [], set()
  h, n, before = hashlib.sha256(), 0, bad_count()
  for p, end in src.read():
    h.update(p.encode('utf-8', 'surrogatepass'))
    n += len(p)
    if alphabet:
      letters.update(p)
    progress(len(p))
    if end:
      digests += h.digest()
      chars.append(n)
      h, n = hashlib.sha256(), 0
  return Scan(np.frombuffer(bytes(digests), dtype='S32'), np.asarray(chars, np.int64), letters,
              bad_count() - before)


def split_mask(digests: np.ndarray, chars: np.ndarray, val_fraction: float) -> np.ndarray:
  """Which documents go to validation: whole documents in hash order (stable when documents are added or
  reordered) until val holds val_fraction of the characters; at least one val document when there are two or
  more, identical documents always on the same side, and a document that alone would overshoot the target twice
  over is skipped. (A single document is cut by characters instead: prepare does it.)"""
  n = len(chars)
  val = np.zeros(n, bool)
  order = np.argsort(digests, kind='stable')  # by hash; equal hashes keep document order
  sd = digests[order]
  starts = np.flatnonzero(np.r_[True, sd[1:] != sd[:-1]]) if n else np.zeros(0, np.int64)
  if len(starts) > 1:
    groups = np.split(order, starts[1:])
  else:  # every document identical: each one its own group, in document order
    groups = [np.array([i]) for i in range(n)]
  size = np.array([int(chars[g].sum()) for g in groups])
  target, got = val_fraction * float(size.sum()), 0
  for g, k in zip(groups, size):
    if got >= target:
      break
    if got + k <= 2 * target:
      val[g] = True
      got += k
  if not val.any() and groups:
    val[groups[int(np.argmin(size))]] = True
  if val.all():  # only when val_fraction is near 1: keep something to train on
    val[groups[-1]] = False
  return val


def sha256s(docs: list[str]) -> np.ndarray:
  return np.array([hashlib.sha256(d.encode('utf-8', 'surrogatepass')).digest() for d in docs], dtype='S32')


def sample_rate(budget: int, chars: int) -> float:
  return 1.0 if not budget or chars <= budget else budget / chars


def sampled(pieces_: Iterable[str], rate: float) -> Iterator[str]:
  """Pieces kept with probability `rate`, decided by their content hash (deterministic, spread over the whole
  corpus, no random access)."""
  if rate >= 1:
    yield from pieces_
    return
  bar = int(rate * 2**64)
  for p in pieces_:
    if int.from_bytes(hashlib.blake2b(p.encode('utf-8', 'surrogatepass'), digest_size=8).digest(), 'big') < bar:
      yield p
