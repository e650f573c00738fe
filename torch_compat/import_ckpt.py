"""Import a torch checkpoint into a new run directory; `python -m minillm_jax.train --workdir=W` continues it.

  python -m torch_compat.import_ckpt --src=model.pt --workdir=runs/imported     # native .pt
  python -m torch_compat.import_ckpt --src=out/ckpt.pt --workdir=runs/nano      # nanoGPT (also its out_dir)
  python -m torch_compat.import_ckpt --src=path/to/hf_dir --workdir=runs/llama  # GPT-2, Llama or GPT-NeoX dir

The format is detected. Weights that our model cannot compute exactly are refused with the reason; approximate
GELUs (e.g. the original GPT-2's gelu_new) are imported as exact GELU only with --allow_inexact.
"""
from __future__ import annotations

import os

from absl import flags

from minillm_jax import cli
from minillm_jax import workdir as wd
from minillm_jax.config import UserError
from minillm_jax.training import checkpoint
from torch_compat import common, convert, formats

FLAGS = flags.FLAGS


def import_ckpt(src: str, workdir: str, allow_inexact: bool = False) -> str:
  """Writes a step-0 checkpoint of `src` into `workdir`; returns a one-line summary."""
  if not os.path.exists(src):
    raise UserError(f'--src={src} does not exist')
  imp = formats.load_any(src, allow_inexact=allow_inexact)  # every tensor checked against the config here,
  model = convert.load_into_flax(imp.model_config, imp.flat)  # before a model is built
  meta = {'imported_from': os.path.abspath(src), 'source_format': imp.fmt,
          'source_step': imp.meta.get('step'), 'source_val_loss': imp.meta.get('val_loss')}
  if imp.notes:
    meta['import_notes'] = imp.notes
  checkpoint.init_workdir(workdir, imp.cfg_plain, imp.model_config, model, imp.tokenizer_json or None,
                          common.plain(meta))
  wd.mark_imported(workdir, common.plain(meta))
  c = imp.model_config
  tok = 'with tokenizer' if imp.tokenizer_json else 'no tokenizer (set data.tokenizer when training)'
  notes = ''.join(f'\nnote: {n}' for n in imp.notes)
  _, dropped = checkpoint.imported_config(imp.cfg_plain)
  if imp.cfg_plain:  # paths and data sources chosen by the file's author: a later `train --workdir` must not read them
    more = ', ...' if len(dropped) > 4 else ''
    which = f' ({", ".join(dropped[:4])}{more})' if dropped else ''
    notes += (f'\nnote: only the model and training hyperparameters of the source\'s run config were taken; its '
              f'data settings and paths were not{which}: the defaults are set, give data.* when training')
  return (f'imported {src} ({imp.fmt}) into {workdir}: {c.n_layer} layers, d_model {c.d_model}, vocab '
          f'{c.vocab_size}, pos {c.pos}, norm {c.norm}, mlp {c.mlp}; {tok}{notes}')


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {argv[1:]}')
  print(import_ckpt(FLAGS.src, FLAGS.workdir, FLAGS.allow_inexact))


if __name__ == '__main__':
  cli.define_workdir()
  flags.DEFINE_string('src', None, 'A native .pt, a nanoGPT ckpt.pt (or its out_dir) or a Hugging Face '
                      'directory.', required=True)
  flags.DEFINE_bool('allow_inexact', False, 'Import approximate GELUs as exact GELU (logits differ a bit).')
  cli.run(main)
