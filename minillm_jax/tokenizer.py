"""`python -m minillm_jax.tokenizer report|train`: check how a tokenizer segments a text, or train one as
prepare would for a config. The tokenizers themselves: minillm_jax.data.tokenizer.

  python -m minillm_jax.tokenizer report --tokenizer=data/cache/<dir>/tokenizer.json --text=FILE
  python -m minillm_jax.tokenizer train --config=configs/tiny.py --out=tokenizer.json
"""
from __future__ import annotations

from absl import flags

from minillm_jax import cli
from minillm_jax.config import UserError
from minillm_jax.data import encode
from minillm_jax.data import tokenizer as toklib


def _main(argv):
  cmds = ('report', 'train')
  if len(argv) != 2 or argv[1] not in cmds:
    raise UserError(f'usage: python -m minillm_jax.tokenizer {{{"|".join(cmds)}}} [flags]; see --help')
  f = flags.FLAGS
  if argv[1] == 'report':
    if not f.tokenizer or not f.text:
      raise UserError('report needs --tokenizer=PATH (tokenizer.json, vocab dir or hub:<name>) and --text=FILE')
    tok = toklib.load(f.tokenizer)
    try:
      with open(f.text, 'rb') as fh:
        text = fh.read().decode('utf-8', errors='replace')
    except OSError as e:
      raise UserError(f'cannot read --text {f.text!r}: {e.strerror}') from None
    print(toklib.format_report(toklib.report(tok, text)))
    return
  cfg = cli.config()
  if not f.out:
    raise UserError('train needs --out=PATH for the tokenizer.json')
  d = cfg.data
  if d.tokenizer not in ('char', 'bpe'):
    raise UserError(f'data.tokenizer={d.tokenizer!r} is not trained here; use --config.data.tokenizer=bpe or char')
  pl = encode.plan(cfg)
  tok, _ = pl.tokenizer(cfg)  # exactly what prepare would build for this config
  tok.save(f.out)
  print(f'{tok!r} trained on {pl.train_src.name} ({pl.train_chars:,} training characters) -> {f.out}')


if __name__ == '__main__':
  flags.DEFINE_string('tokenizer', None, 'report: tokenizer.json path, dir with vocab.json+merges.txt or hub:<name>')
  flags.DEFINE_string('text', None, 'report: a UTF-8 text file to tokenize')
  flags.DEFINE_string('out', None, 'train: where to write tokenizer.json')
  cli.define_config(default=None)
  cli.run(_main)
