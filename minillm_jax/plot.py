"""`python -m minillm_jax.plot --workdir=A [--workdir=B ...] [--out=curves.png]`: train/val loss, perplexity and
LR curves of one or several runs on one figure."""
from __future__ import annotations

import os

from absl import flags

from minillm_jax import cli
from minillm_jax.evals.figures import curves


def main(argv):
  del argv
  F = flags.FLAGS
  out = F.out or os.path.join(F.workdir[0], 'plots', 'curves.png')
  print(curves(F.workdir, out))


if __name__ == '__main__':
  flags.DEFINE_multi_string('workdir', None, 'Run directory; repeat to compare runs.', required=True)
  flags.DEFINE_string('out', None, 'PNG path (default <first workdir>/plots/curves.png).')
  cli.run(main)
