"""Tokenizers, all stored as one HF `tokenizer.json` so every entry point loads any of them the same way.

- `train_bpe`: byte-level BPE (ByteLevel pre-tokenizer and decoder, 256-byte base alphabet): any UTF-8 text
  round-trips exactly, nothing is ever unknown.
- `build_char`: one token per character (a WordLevel model over single characters, a pre-tokenizer that
  isolates every character, a Fuse decoder that joins without spaces). A character missing from the vocabulary
  encodes to `<|unk|>` and decodes as the visible text '<|unk|>', never silently dropped.
- `load`: a tokenizer.json path, a directory with GPT-2 style vocab.json + merges.txt, `hub:<name>`, or `gpt2`
  (GPT-2's own BPE, `gpt2_path`: the HF cache, ~/.cache/minillm_jax/gpt2/, or the hub once, then kept there).

Ids 0..5 are always `<|endoftext|>`, `<|pad|>` and the chat tokens reserved for fine-tuning.

  python -m minillm_jax.tokenizer report --tokenizer=PATH --text=FILE   # compression, round trip, warnings
  python -m minillm_jax.tokenizer train --config=configs/tiny.py --out=tokenizer.json
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from minillm_jax.config import BPE_MAX_VOCAB, BPE_MIN_VOCAB, UserError
from minillm_jax.data import hub
from minillm_jax.workdir import write_atomic

EOT, PAD = '<|endoftext|>', '<|pad|>'
CHAT = ('<|system|>', '<|user|>', '<|assistant|>', '<|end|>')
SPECIALS = (EOT, PAD) + CHAT
UNK = '<|unk|>'  # char tokenizer only
_EOT_ALIASES = (EOT, '<|end_of_text|>', '</s>', '<eos>', '[SEP]')  # for tokenizers made elsewhere
assert BPE_MIN_VOCAB == 256 + len(SPECIALS)


class Tok:
  """A loaded tokenizer: exact encode/decode (special tokens kept), ids, JSON text and a content hash."""

  def __init__(self, tok: Tokenizer):
    self.tok = tok
    vocab = tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1  # ids need not be contiguous in foreign tokenizers
    eot = next((t for t in _EOT_ALIASES if t in vocab), None)
    if eot is None:
      raise UserError(f'the tokenizer has no end-of-text token (one of {", ".join(_EOT_ALIASES)}); '
                      f'add {EOT} as a special token')
    self.eot_id = vocab[eot]
    self.pad_id = vocab.get(PAD, self.eot_id)
    self.kind = _kind(json.loads(tok.to_str()), vocab)  # 'char' | 'bpe' (byte-level) | 'other'

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    # Rust threads (rayon) encode the texts in parallel.
    return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

  def encode_batch_np(self, texts: list[str]) -> list[np.ndarray]:
    """encode_batch as arrays; this project's char tokenizer maps code points through a table instead of running
    its per-character regex (same ids, much faster: data.encode's throughput in BENCHMARKS.md "Data")."""
    lut = self._char_lut
    if lut is None:
      return [np.asarray(ids, np.int64) for ids in self.encode_batch(texts)]
    out = []
    for t in texts:
      if '<|' in t:  # special tokens in the text are matched whole by the tokenizer: let it
        out.append(np.asarray(self.encode(t), np.int64))
        continue
      cp = np.frombuffer(t.encode('utf-32-le', 'surrogatepass'), np.uint32)
      out.append(np.where(cp < len(lut), lut[np.minimum(cp, len(lut) - 1)], self._unk_id))
    return out

  @functools.cached_property
  def _char_lut(self) -> np.ndarray | None:
    spec = json.loads(self.tok.to_str())
    pre = spec.get('pre_tokenizer') or {}
    if (self.kind != 'char' or spec.get('normalizer') or pre.get('type') != 'Split' or pre.get('behavior')
        != 'Isolated' or pre.get('invert') or (pre.get('pattern') or {}).get('Regex') != r'[\s\S]'):
      return None
    vocab = self.tok.get_vocab(with_added_tokens=False)
    self._unk_id = vocab.get(UNK, self.token_to_id(UNK))
    if self._unk_id is None:
      return None
    singles = {ord(t): i for t, i in vocab.items() if len(t) == 1}
    lut = np.full(max(singles, default=0) + 1, self._unk_id, np.int64)
    lut[list(singles)] = list(singles.values())
    return lut

  def encode_batch_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character spans of the text each token came from) per text."""
    return [(e.ids, e.offsets) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
    # Kept by default: exact round trip also for text that contains '<|endoftext|>' or chat markers.
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  def id_to_token(self, i: int) -> str | None:
    return self.tok.id_to_token(i)

  def token_to_id(self, t: str) -> int | None:
    return self.tok.token_to_id(t)

  def stream(self, skip_special: bool = False) -> StreamDecoder:
    return StreamDecoder(self, skip_special)

  def to_json_str(self) -> str:
    return self.tok.to_str()

  @classmethod
  def from_json_str(cls, s: str) -> Tok:
    try:
      return cls(Tokenizer.from_str(s))
    except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception for bad JSON
      raise UserError(f'not a valid tokenizer.json text: {_short(e)}') from None

  @classmethod
  def from_file(cls, path: str) -> Tok:
    try:
      with open(path, encoding='utf-8') as f:
        text = f.read()
    except OSError as e:
      raise UserError(f'cannot read tokenizer {path!r}: {e.strerror}') from None
    try:
      return cls.from_json_str(text)
    except UserError as e:
      raise UserError(f'{path}: {e} (a Hugging Face tokenizers file is expected)') from None

  def save(self, path: str):
    write_atomic(path, self.to_json_str())

  @functools.cached_property
  def hash(self) -> str:
    return hashlib.sha256(self.to_json_str().encode()).hexdigest()[:16]

  def __repr__(self):
    return f'Tok(kind={self.kind}, vocab_size={self.vocab_size}, eot_id={self.eot_id}, hash={self.hash})'


class StreamDecoder:
  """Token-by-token decoding for printing while sampling: `step(id)` returns the new text ('' while a
  multi-byte character is still incomplete)."""

  def __init__(self, tok: Tok, skip_special: bool = False):
    self._tok, self._ds = tok.tok, decoders.DecodeStream(skip_special_tokens=skip_special)

  def step(self, token_id: int) -> str:
    return self._ds.step(self._tok, int(token_id)) or ''


def _kind(spec: dict, vocab: dict[str, int]) -> str:
  model, pre = spec.get('model') or {}, spec.get('pre_tokenizer') or {}
  if model.get('type') == 'WordLevel':
    special = {t['content'] for t in spec.get('added_tokens', [])}
    if all(len(t) == 1 for t in vocab if t not in special):
      return 'char'
  # 'bpe' promises the GPT-2 split exactly (prepare cuts long documents relying on it): a plain ByteLevel
  # pre-tokenizer with its regex, no prefix space, no normalizer. Llama-3 style Sequence splits are 'other'.
  if (model.get('type') == 'BPE' and pre.get('type') == 'ByteLevel' and pre.get('use_regex', True)
      and not pre.get('add_prefix_space', False) and not spec.get('normalizer')):
    return 'bpe'
  return 'other'


def _short(e: BaseException) -> str:
  return ' '.join(str(e).split())[:300]


def dtype_for(vocab_size: int) -> np.dtype:
  """Smallest unsigned dtype for token files: uint16 when every id fits, else uint32."""
  if vocab_size <= 2**16:
    return np.dtype(np.uint16)
  if vocab_size <= 2**32:
    return np.dtype(np.uint32)
  raise UserError(f'vocabulary of {vocab_size} tokens does not fit the uint32 token files (max 2**32)')


def train_bpe(docs: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False) -> Tok:
  if not BPE_MIN_VOCAB <= vocab_size <= BPE_MAX_VOCAB:
    raise UserError(f'BPE vocab size {vocab_size} is outside [{BPE_MIN_VOCAB}, {BPE_MAX_VOCAB}]; '
                    'set data.vocab_size in that range')
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
  tok.train_from_iterator(docs, trainer)
  return Tok(tok)


def build_char(docs: Iterable[str]) -> Tok:
  chars = set()
  for d in docs:
    chars.update(d)
  vocab = {t: i for i, t in enumerate(SPECIALS + (UNK,))}
  for c in sorted(chars):
    vocab.setdefault(c, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')  # every code point alone
  tok.decoder = decoders.Fuse()  # join tokens as they are, no spaces in between
  tok.add_special_tokens(list(SPECIALS + (UNK,)))
  return Tok(tok)


def gpt2_dir(path: str) -> Tok:
  """A directory with GPT-2 style vocab.json + merges.txt (byte-level BPE)."""
  vocab, merges = os.path.join(path, 'vocab.json'), os.path.join(path, 'merges.txt')
  try:
    tok = Tokenizer(models.BPE.from_file(vocab, merges))
  except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception
    raise UserError(f'cannot read {vocab} + {merges}: {_short(e)}') from None
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  present = tok.get_vocab()
  tok.add_special_tokens([t for t in SPECIALS + _EOT_ALIASES if t in present])
  return Tok(tok)


def hub_tokenizer(name: str) -> Tok:
  try:
    from huggingface_hub import try_to_load_from_cache
    cached = try_to_load_from_cache(name, 'tokenizer.json')
  except Exception:  # noqa: BLE001 - a malformed repo id; the hub call below gives the real message
    cached = None
  if isinstance(cached, str):
    return Tok.from_file(cached)
  reason = hub.offline_reason()
  if reason:
    raise UserError(f'tokenizer hub:{name} is not in the local HF cache and the hub is unreachable ({reason}); '
                    'download it once online, or pass a tokenizer.json path')
  try:
    return Tok(Tokenizer.from_pretrained(name))
  except Exception as e:  # noqa: BLE001
    raise UserError(f'cannot load tokenizer hub:{name}: {_short(e)}') from None


GPT2_HUB = 'openai-community/gpt2'


def gpt2_home() -> str:
  return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'minillm_jax', 'gpt2')


def gpt2_path() -> str:
  """Where GPT-2's tokenizer is on this machine (a tokenizer.json, or a directory with vocab.json + merges.txt),
  fetched from the hub once (and kept in gpt2_home) when it is nowhere yet."""
  home = gpt2_home()
  for name in ('tokenizer.json', ''):
    p = os.path.join(home, name)
    if (name and os.path.isfile(p)) or (not name and all(os.path.isfile(os.path.join(home, f))
                                                          for f in ('vocab.json', 'merges.txt'))):
      return p
  try:
    from huggingface_hub import try_to_load_from_cache
    for repo in (GPT2_HUB, 'gpt2'):
      cached = try_to_load_from_cache(repo, 'tokenizer.json')
      if isinstance(cached, str):
        return cached
  except ImportError:
    pass
  reason = hub.offline_reason()
  if reason:
    raise UserError(f'data.tokenizer=gpt2: GPT-2\'s tokenizer is not on this machine and the hub is unreachable '
                    f'({reason}); run once with network, or put its vocab.json + merges.txt (or tokenizer.json) in '
                    f'{home}/, or set data.tokenizer to their path')
  try:
    tok = Tokenizer.from_pretrained(GPT2_HUB)
  except Exception as e:  # noqa: BLE001
    raise UserError(f'data.tokenizer=gpt2: cannot fetch {GPT2_HUB}: {_short(e)}') from None
  os.makedirs(home, exist_ok=True)
  write_atomic(os.path.join(home, 'tokenizer.json'), tok.to_str())
  return os.path.join(home, 'tokenizer.json')


def spec_kind(spec: str) -> str:
  """'char' | 'bpe' | 'gpt2' | 'file' | 'gpt2_dir' | 'hub'; UserError for anything else."""
  if spec in ('char', 'bpe', 'gpt2'):
    return spec
  if spec.startswith('hub:') and len(spec) > 4:
    return 'hub'
  path = os.path.expanduser(spec)
  if os.path.isfile(path):
    return 'file'
  if os.path.isdir(path):
    if all(os.path.isfile(os.path.join(path, f)) for f in ('vocab.json', 'merges.txt')):
      return 'gpt2_dir'
    if os.path.isfile(os.path.join(path, 'tokenizer.json')):
      return 'file'
    raise UserError(f'tokenizer directory {spec!r} has neither tokenizer.json nor vocab.json + merges.txt')
  if spec.endswith('.json') or os.sep in spec:
    raise UserError(f'tokenizer file {spec!r} does not exist')
  raise UserError(f'unknown tokenizer {spec!r}: use char, bpe, gpt2, a tokenizer.json path, a directory with '
                  'vocab.json + merges.txt, or hub:<name>')


def load(spec: str) -> Tok:
  """An existing tokenizer (char and bpe are built from a corpus by minillm_jax.prepare instead)."""
  kind = spec_kind(spec)
  if kind in ('char', 'bpe'):
    raise UserError(f'tokenizer {spec!r} is built from a corpus: run python -m minillm_jax.prepare --config=...')
  if kind == 'hub':
    return hub_tokenizer(spec[4:])
  path = gpt2_path() if kind == 'gpt2' else os.path.expanduser(spec)
  if os.path.isdir(path) and spec_kind(path) == 'gpt2_dir':
    return gpt2_dir(path)
  return Tok.from_file(os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path)


# ---- report: is this tokenizer segmenting text sensibly? ----

def report(tok: Tok, text: str) -> dict:
  ids = tok.encode(text)
  n = max(len(ids), 1)
  pieces = {i: tok.decode([i]) for i in set(ids)}
  decoded = tok.decode(ids)
  words, dwords = text.split(), decoded.split()
  r = {'kind': tok.kind, 'vocab_size': tok.vocab_size, 'chars': len(text), 'tokens': len(ids),
       'chars_per_token': len(text) / n, 'single_char_share': sum(len(pieces[i]) == 1 for i in ids) / n,
       'unk_share': 0.0, 'roundtrip': decoded == text,
       # The classic bug (Whitespace pre-tokenizer, no decoder) prints "O n ce u p on a t i me": the decoded
       # text falls apart into more whitespace-separated pieces than the original had.
       'word_split_ratio': len(dwords) / max(len(words), 1),
       'ascii_share': sum(c.isascii() for c in text) / max(len(text), 1), 'warnings': [], 'notes': []}
  unk = tok.token_to_id(UNK)
  if unk is not None:
    r['unk_share'] = ids.count(unk) / n
  if not r['roundtrip']:
    k = next((i for i, (a, b) in enumerate(zip(text, decoded)) if a != b), min(len(text), len(decoded)))
    r['warnings'].append(f'round trip fails at char {k}: {text[k:k + 40]!r} decodes as {decoded[k:k + 40]!r}')
  if tok.kind == 'char':
    r['notes'].append('character tokenizer: 1 token per character by design (not over-segmentation)')
    if r['unk_share']:
      r['warnings'].append(f'{ids.count(unk)} characters are not in the vocabulary and encode to {UNK}')
  elif r['word_split_ratio'] > 1.05:
    r['warnings'].append(f'over-segmented: decoding splits words ({" ".join(dwords[:12])!r} ...), '
                         f'{r["word_split_ratio"]:.2f} decoded pieces per word; the tokenizer probably uses a '
                         'Whitespace pre-tokenizer or lacks a decoder: use a byte-level BPE (tokenizer=bpe)')
  elif r['chars_per_token'] < 1.5 and r['ascii_share'] > 0.9 and len(ids) >= 100:
    r['warnings'].append(f'over-segmented: {r["chars_per_token"]:.2f} chars/token on mostly-ASCII text (a subword '
                         'tokenizer gives ~3-4); is the vocabulary tiny or trained on other text?')
  r['over_segmented'] = any(w.startswith('over-segmented') for w in r['warnings'])
  return r


def format_report(r: dict) -> str:
  lines = [f'tokenizer: {r["kind"]}, vocab {r["vocab_size"]}',
           f'text: {r["chars"]:,} chars -> {r["tokens"]:,} tokens',
           f'chars per token: {r["chars_per_token"]:.3f}',
           f'single-character tokens: {100 * r["single_char_share"]:.1f}%',
           f'round trip: {"exact" if r["roundtrip"] else "FAILS"}']
  if r['kind'] == 'char':
    lines.append(f'unknown characters: {100 * r["unk_share"]:.3f}%')
  lines += [f'note: {n}' for n in r['notes']] + [f'WARNING: {w}' for w in r['warnings']]
  return '\n'.join(lines)
