"""`python -m minillm_jax.prepare --config=configs/shakespeare_char.py`: tokenize a corpus once into the token
cache (train does it too). The cache and its layout: minillm_jax.data.prepare and WORKSPACE.md."""
from __future__ import annotations

import time

from minillm_jax import cli
from minillm_jax.data import prepare


def main(argv):
  del argv
  cfg = cli.config()
  t0 = time.time()
  p = prepare.prepare(cfg)
  m = p.manifest
  if p.chat:
    print(f'{p.dir}\n  corpus {m["corpus"]} (chat): {m["n_train_docs"]} train / {m["n_val_docs"]} val conversations'
          f'\n  tokenizer {m["tokenizer"]["kind"]} vocab {p.vocab_size} ({m["tokenizer"]["hash"]}), {p.dtype.name}')
    for split in ('train', 'val'):
      st = m[f'{split}_packing']
      print(f'  {split}: {st["rows"]:,} windows of {p.window} tokens, {st["conversations"]:,} conversations kept, '
            f'{st["dropped"]:,} dropped as longer than a window ({st["dropped_tokens"]:,} tokens), '
            f'{st["assistant_tokens"]:,} assistant tokens, {100 * st["pad_fraction"]:.1f}% padding')
    print(f'  {time.time() - t0:.2f}s (built in {m["seconds"]}s)')
    return
  print(f'{p.dir}\n  corpus {m["corpus"]}: {m["n_train_docs"]} train / {m["n_val_docs"]} val documents '
        f'(split by {m["split"]}), {m["train_chars"] + m["val_chars"]:,} chars'
        f'\n  tokenizer {m["tokenizer"]["kind"]} vocab {p.vocab_size} ({m["tokenizer"]["hash"]}), {p.dtype.name}'
        f'\n  tokens: {p.n_train:,} train, {p.n_val:,} val ({(m["train_chars"] + m["val_chars"]) / max(1, p.n_train + p.n_val):.2f} chars/token)'
        + _skipped(m.get('corpus_info') or {}) + f'\n  {time.time() - t0:.2f}s (built in {m["seconds"]}s)')


def _skipped(info: dict) -> str:
  """Lines for the files the corpus left out: binary (an image named .py) or empty."""
  out = ''
  for prefix, key in (('', 'data.path'), ('code_', 'data.code_path'), ('books_', 'data.books_path')):
    parts = [f'{info[f"{prefix}skipped_{k}"]} {k}' for k in ('binary', 'empty') if info.get(f'{prefix}skipped_{k}')]
    if parts:
      out += f'\n  skipped {" and ".join(parts)} file(s) of {key}'
  return out


if __name__ == '__main__':
  cli.define_config()
  cli.run(main)
