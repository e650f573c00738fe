"""`minillm COMMAND [flags]`: the console script of an installed minillm-jax (pyproject.toml, [project.scripts]).
Each command is the `python -m` module of the same name, run as that would run it: same flags, same --help,
same exit codes. `python -m minillm_jax COMMAND` is the same command line without the script."""
from __future__ import annotations

import runpy
import sys

# command -> module; the modules define their flags under `if __name__ == '__main__'`, so they run as __main__
COMMANDS = {
    'train': ('minillm_jax.train', 'train a model or resume a run'),
    'prepare': ('minillm_jax.prepare', "tokenize a config's corpus into the token cache"),
    'generate': ('minillm_jax.generate', 'sample text from a run or a torch checkpoint'),
    'chat': ('minillm_jax.chat', 'chat in the terminal'),
    'serve': ('minillm_jax.serve', 'the OpenAI-compatible HTTP server and chat page (serve extra)'),
    'evaluate': ('minillm_jax.evaluate', 'score runs on the evaluation suites'),
    'export': ('torch_compat.export', 'export a checkpoint to a torch format (torch extra)'),
    'import': ('torch_compat.import_ckpt', 'import a torch checkpoint into a new run (torch extra)'),
    'status': ('minillm_jax.status', "a run's progress, losses and liveness"),
    'plot': ('minillm_jax.plot', 'loss and learning-rate curves'),
    'bench': ('minillm_jax.bench', 'benchmark training and decoding'),
    'tokenizer': ('minillm_jax.tokenizer', 'report on or train a tokenizer'),
    'model': ('minillm_jax.model', "a config's parameter count, FLOPs per token and shape"),
}


HELP_FLAGS = {'--help', '-h', '-?', '--helpfull', '--helpshort', '--helpxml'}


def usage() -> str:
  width = max(map(len, COMMANDS))
  rows = '\n'.join(f'  {c:<{width}}  {doc}' for c, (_, doc) in COMMANDS.items())
  return (f'usage: minillm COMMAND [flags]   (minillm COMMAND --help: its flags)\n\ncommands:\n{rows}\n\n'
          'e.g. minillm train --config=shakespeare_char --workdir=runs/shakespeare_char')


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ('-h', '--help', 'help'):
    print(usage(), file=sys.stdout if argv else sys.stderr)  # no command: a usage error
    sys.exit(0 if argv else 2)
  cmd, rest = argv[0], argv[1:]
  if cmd not in COMMANDS:
    print(f'error: unknown command {cmd!r}; commands: {", ".join(COMMANDS)} (minillm --help)', file=sys.stderr)
    sys.exit(2)
  module = COMMANDS[cmd][0]
  sys.argv = [f'minillm {cmd}', *rest]
  if module.endswith('.model'):
    module += '.__main__'  # a package: runpy runs its __main__ module, as python -m does
  try:
    runpy.run_module(module, run_name='__main__', alter_sys=True)
  except SystemExit as e:
    # absl exits 1 after printing --help; asked-for help is a success (python -m keeps absl's code)
    if e.code == 1 and HELP_FLAGS.intersection(rest):
      sys.exit(0)
    raise


if __name__ == '__main__':
  main()
