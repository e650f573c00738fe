"""Export a run's checkpoint to a torch format.

  python -m torch_compat.export --workdir=runs/tiny --out=tiny.pt --format=pt       # native .pt (mirror)
  python -m torch_compat.export --workdir=runs/nano --out=ckpt.pt --format=nanogpt  # nanoGPT's sample.py
  python -m torch_compat.export --workdir=runs/tiny --out=tiny_hf --format=hf       # transformers dir

--step picks the checkpoint: best (lowest val_loss, the default), latest or a step number. A model the target
cannot compute exactly is refused with a message naming what the target lacks.
"""
from __future__ import annotations

from absl import flags

from minillm_jax import cli
from minillm_jax.config import UserError
from minillm_jax.training import checkpoint
from torch_compat import convert, formats, hf

FLAGS = flags.FLAGS


def export(workdir: str, out: str, fmt: str, step: str | int = 'best') -> str:
  """Writes `out`; returns a one-line summary."""
  if fmt not in ('pt', 'nanogpt', 'hf'):
    raise UserError(f'--format={fmt!r}: use pt, nanogpt or hf')
  mc, model, tokenizer_json, meta = checkpoint.load_for_inference(workdir, step)
  formats.save_any(fmt, out, mc, convert.flax_flat(model), tokenizer_json, meta)
  what = fmt
  if fmt == 'hf':
    what = f'hf ({hf.CLASSES[hf.arch_for(mc)]})'
  return f'wrote {out}: {what}, step {meta.get("step")}, val_loss {meta.get("val_loss")}'


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {argv[1:]}')
  print(export(FLAGS.workdir, FLAGS.out, FLAGS.format, FLAGS.step))


if __name__ == '__main__':
  cli.define_workdir()
  flags.DEFINE_string('out', None, 'Output: a .pt file (pt, nanogpt) or a directory (hf).', required=True)
  flags.DEFINE_enum('format', 'pt', ['pt', 'nanogpt', 'hf'], 'Target format.')
  flags.DEFINE_string('step', 'best', 'Checkpoint: best, latest or a step number.')
  cli.run(main)
