"""`python -m minillm_jax.evaluate`: evaluation suites on any backend, for one checkpoint or a comparison.

  python -m minillm_jax.evaluate --workdir=runs/x                          # ppl, code, text (+ chat) -> runs/x/eval.json
  python -m minillm_jax.evaluate --workdir=runs/base --workdir=runs/new --plot=compare.png   # table + JSON + PNG
  python -m minillm_jax.evaluate --ckpt=model.pt --backend=torch --suites=ppl --text=notes.txt

Suites (--suites, comma separated):
  ppl   perplexity and bits per byte on the run's validation split (rebuilt from its config) or --text=FILE
  code  greedy completions scored per category: bracket_completion, keyword_completion, indentation,
        function_completion, docstring, syntax_validity (ast.parse of every generated function) and execution
        (generated functions against small unit tests, each in its own subprocess with a time limit, never
        in-process); overall is the mean of the categories
  text  samples for fixed prompts (the run's sampling settings), distinct-1/2 and repetition rate
  chat  assistant-token perplexity on held-out instructions and the execution tasks asked as instructions
        (minillm_jax.evals.chat_eval); on by default when a --workdir was fine-tuned on chat data

  python -m minillm_jax.evaluate --workdir=runs/tiny_mini --workdir=runs/tiny_sft_mini --suites=code,chat
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags

from minillm_jax import cli
from minillm_jax import workdir as wd
from minillm_jax.config import UserError
from minillm_jax.evals import chat_eval
from minillm_jax.evals import suites as ev
from minillm_jax.evals.figures import figure_path
from minillm_jax.inference import frontend as fe
from minillm_jax.inference import load


def main(argv):
  f = flags.FLAGS
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {argv[1:]}; flags go as --name=value')
  sources = [('workdir', w) for w in f.workdir] + [('ckpt', c) for c in f.ckpt]
  spec = f.suites if f.suites is not None else ','.join(
      ev.DEFAULT_SUITES + (('chat',) if any(map(_chat_run, f.workdir)) else ()))
  suites = [s.strip() for s in spec.split(',') if s.strip()]
  bad = [s for s in suites if s not in ev.SUITES]
  if bad or not suites:
    raise UserError(f'--suites={f.suites!r}: use a comma list of {", ".join(ev.SUITES)}')
  if not sources:
    raise UserError('nothing to evaluate: pass --workdir=RUN_DIR and/or --ckpt=PATH (repeat to compare)')
  for name, v, ok in (('max_eval_tokens', f.max_eval_tokens, f.max_eval_tokens >= 1),
                      ('max_new_tokens', f.max_new_tokens, f.max_new_tokens >= 1),
                      ('exec_timeout', f.exec_timeout, f.exec_timeout > 0)):
    if not ok:
      raise UserError(f'--{name}={v} must be positive')
  step = f.step if f.step in ('best', 'latest') else _int_step(f.step)
  for kind, path in sources:  # all checked before the first (possibly long) evaluation
    if not (os.path.isdir(path) if kind == 'workdir' else os.path.exists(path)):
      raise UserError(f'--{kind}={path} does not exist')
  out = f.out or (os.path.join(f.workdir[0], 'eval.json') if f.workdir else 'eval.json')
  for p in (out, f.plot):
    _check_writable(p)
  _check_replaceable(out)
  if f.plot:
    figure_path(f.plot, 'plot')
    if not {'ppl', 'code', 'chat'} & set(suites):
      raise UserError(f'--plot draws the ppl, code and chat suites; --suites={f.suites} has none of them')
  held = None
  if 'chat' in suites:  # every model is scored on the same held-out conversations
    chat_runs = [w for w in f.workdir if _chat_run(w)]
    held = chat_eval.held_out(wd.read_run_config(chat_runs[0]).to_dict() if chat_runs else None)
  runs = []
  for kind, path in sources:
    try:
      be = load.load(**{kind: path}, step=step if kind == 'workdir' else 'best', backend=f.backend,
                        device=f.device, weights=f.weights)
      print(f'evaluating {be.describe()} ...', file=sys.stderr, flush=True)
      execute = f.execute or (kind == 'workdir' and wd.own_run(path))
      if 'code' in suites and not execute:
        print(f'code suite: execution skipped for --{kind}={path}: it is not a run trained here, and running its '
              'generated code needs --execute (it runs in the sandbox: see the README)', file=sys.stderr, flush=True)
      runs.append(ev.evaluate(be, suites, f.text, f.max_eval_tokens, f.max_new_tokens, f.exec_timeout, f.seed,
                              execute, held))
      del be
    except UserError as e:  # a source that fails late (its corpus deleted, ...) keeps the finished ones
      if runs:
        raise UserError(f'{e} (the {len(runs)} run(s) evaluated before --{kind}={path} are saved in {out})') from None
      raise
    wd.write_atomic(out, json.dumps({'suites': suites, 'runs': runs}, indent=1, ensure_ascii=False))  # after each
  print(ev.table(runs))
  print(f'wrote {out}')
  png = f.plot or (os.path.splitext(out)[0] + '.png' if len(runs) > 1 and set(suites) & {'ppl', 'code', 'chat'}
                   else '')
  if png:
    print(f'wrote {ev.plot(runs, png)}')


def _chat_run(workdir: str) -> bool:
  """Whether a run directory's config.json says it was fine-tuned on chat data (without loading the run)."""
  try:
    with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as fh:
      return json.load(fh)['data']['format'] == 'chat'
  except (OSError, ValueError, KeyError, TypeError):
    return False


def _check_writable(path: str | None):
  if not path:
    return
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot write {path}: {e.strerror} ({parent})') from None
  if os.path.isdir(path) or not os.access(parent, os.W_OK):
    raise UserError(f'cannot write {path}: {"it is a directory" if os.path.isdir(path) else "no permission"}')


def _check_replaceable(out: str):
  """--out may replace an earlier evaluate result, never another file (a run's config.json, metrics)."""
  if not os.path.isfile(out):
    return
  try:
    with open(out, encoding='utf-8') as fh:
      old = json.load(fh)
    ok = isinstance(old, dict) and {'suites', 'runs'} <= set(old)
  except (OSError, UnicodeDecodeError, ValueError):
    ok = False
  if not ok:
    raise UserError(f'--out={out} exists and is not an evaluate result; refusing to overwrite it (pick a new path)')


def _int_step(s: str) -> int:
  try:
    return int(s)
  except ValueError:
    raise UserError(f'--step={s!r}: use best, latest or a step number') from None


if __name__ == '__main__':
  flags.DEFINE_multi_string('workdir', [], 'Run directory to evaluate (repeat to compare several).')
  flags.DEFINE_multi_string('ckpt', [], '.pt file, nanoGPT ckpt.pt or HF directory (repeatable).')
  flags.DEFINE_string('step', 'best', 'Checkpoint of each run directory: best, latest or a step number.')
  flags.DEFINE_string('backend', 'auto', 'auto (jax for run directories, torch for torch files), jax or torch.')
  flags.DEFINE_string('device', None, 'torch device; default MPS > CUDA > CPU.')
  fe.define_weights_flag()
  flags.adopt_module_key_flags(fe)
  flags.DEFINE_string('suites', None, 'Comma list of ppl, code, text, chat (default: ppl,code,text, plus chat when a '
                      '--workdir was fine-tuned on chat data).')
  flags.DEFINE_string('text', None, 'Perplexity on this UTF-8 file instead of the validation split.')
  flags.DEFINE_integer('max_eval_tokens', 16384, 'Tokens scored for perplexity (from the start of the text).')
  flags.DEFINE_integer('max_new_tokens', 128, 'Tokens per generated function / text sample.')
  flags.DEFINE_float('exec_timeout', 3.0, 'Seconds each generated function may run in its subprocess.')
  flags.DEFINE_bool('execute', False, 'Run generated code (in the sandbox) also for models not trained here: '
                    '--ckpt files and imported run directories. Runs trained here always execute it.')
  flags.DEFINE_integer('seed', 0, 'Seed of the text samples.')
  flags.DEFINE_string('out', None, 'JSON path (default: <first workdir>/eval.json, else ./eval.json).')
  flags.DEFINE_string('plot', None, 'PNG comparing the runs (default next to the JSON when comparing).')
  cli.run(main)
