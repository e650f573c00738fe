"""What the terminal front ends (generate, chat, evaluate) share: the model and sampling flags, the backend and
sampling they select, ANSI styling, line editing and printing a stream."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import ClassVar

from absl import flags

from minillm_jax.config import UserError
from minillm_jax.inference import load
from minillm_jax.inference.backend import Backend, SampleParams
from minillm_jax.inference.text import config_sampling


class Style:
  """ANSI colours only when the stream is a terminal and NO_COLOR is unset (https://no-color.org)."""
  CODES: ClassVar[dict[str, str]] = {'bold': '1', 'dim': '2', 'red': '31', 'green': '32', 'yellow': '33', 'blue': '34', 'cyan': '36'}

  def __init__(self, stream=None):
    stream = stream or sys.stdout
    self.on = bool(getattr(stream, 'isatty', lambda: False)()) and not os.environ.get('NO_COLOR')

  def __call__(self, text: str, *styles: str, prompt: bool = False) -> str:
    if not self.on or not styles:
      return text
    code = ';'.join(self.CODES[s] for s in styles)
    a, b = (f'\001\033[{code}m\002', '\001\033[0m\002') if prompt else (f'\033[{code}m', '\033[0m')
    return f'{a}{text}{b}'  # \001..\002 tell readline the escape takes no columns


def setup_readline(history_file: str | None = None):
  """Line editing and history when stdin is a terminal; returns a function that saves the history."""
  if not sys.stdin.isatty():
    return lambda: None
  try:
    import readline
  except ImportError:  # Windows without pyreadline: plain input()
    return lambda: None
  if history_file:
    try:
      readline.read_history_file(history_file)
    except OSError:
      pass
  readline.set_history_length(1000)

  def save():
    if history_file:
      try:
        readline.write_history_file(history_file)
      except OSError:
        pass
  return save


def print_stream(pieces: Iterator[str], style: Style | None = None, color: str | None = None) -> tuple[str, bool]:
  """Prints pieces as they come; Ctrl-C stops the generation. Returns (text, interrupted)."""
  out, style = [], style or Style()
  try:
    for p in pieces:
      out.append(p)
      sys.stdout.write(style(p, color) if color else p)
      sys.stdout.flush()
  except KeyboardInterrupt:
    return ''.join(out), True
  return ''.join(out), False


def define_model_flags():
  flags.DEFINE_string('workdir', None, 'Run directory to load (its best checkpoint unless --step).')
  flags.DEFINE_string('ckpt', None, 'A .pt file, nanoGPT ckpt.pt or Hugging Face directory (or a run directory).')
  flags.DEFINE_string('step', 'best', 'Checkpoint of a run directory: best, latest or a step number.')
  flags.DEFINE_string('backend', 'auto', 'auto (jax for run directories, torch for torch files), jax or torch.')
  flags.DEFINE_string('device', None, 'torch device (cpu, cuda, cuda:1, mps); default MPS > CUDA > CPU.')
  define_weights_flag()


def define_weights_flag():
  flags.DEFINE_enum('weights', 'float32', ['float32', 'bfloat16'],
                    'JAX backend: store the matrices in bfloat16 (float32 math on rounded weights; on CPU '
                    'faster batch-1 decoding of models with matrices of 2^18+ weights, which reads every '
                    'weight per token; BENCHMARKS.md, "bfloat16 decode weights").')


def define_sampling_flags():
  flags.DEFINE_float('temperature', None, '0 = greedy; default: the run config\'s sample.temperature.')
  flags.DEFINE_integer('top_k', None, 'Keep the k most likely tokens (0 = off).')
  flags.DEFINE_float('top_p', None, 'Nucleus: keep the smallest set of tokens reaching this probability.')
  flags.DEFINE_float('repetition_penalty', None, 'Penalty > 1 for tokens in the recent window (1 = off).')
  flags.DEFINE_integer('repetition_window', None, 'How many recent tokens the penalty looks at.')
  flags.DEFINE_integer('max_new_tokens', None, 'Tokens to generate per sample.')
  flags.DEFINE_integer('seed', None, 'Sampling seed.')
  flags.DEFINE_multi_string('stop', [], 'Stop string (repeatable); \\n escapes are understood.')


def backend_from_flags() -> Backend:
  f = flags.FLAGS
  step = f.step
  if step not in ('best', 'latest'):
    try:
      step = int(step)
    except ValueError:
      raise UserError(f'--step={f.step!r}: use best, latest or a step number') from None
  return load.load(f.workdir, f.ckpt, step, f.backend, f.device, f.weights)


def sampling_from_flags(be: Backend) -> tuple[SampleParams, int, int]:
  f = flags.FLAGS
  sp, max_new, seed = config_sampling(be)
  pick = lambda flag, cur: cur if getattr(f, flag) is None else getattr(f, flag)
  sp = SampleParams(float(pick('temperature', sp.temperature)), pick('top_k', sp.top_k), float(pick('top_p', sp.top_p)),
                    float(pick('repetition_penalty', sp.repetition_penalty)),
                    int(pick('repetition_window', sp.repetition_window))).check()
  max_new = int(pick('max_new_tokens', max_new))
  if not 1 <= max_new < 2 ** 31:
    raise UserError(f'--max_new_tokens={max_new} must be in [1, 2^31)')
  return sp, max_new, int(pick('seed', seed))


def stop_strings() -> list[str]:
  """--stop values with Python escapes (\\n, \\t, \\u00e9) decoded; other non-ASCII text is kept as typed."""
  out = []
  for s in flags.FLAGS.stop:
    try:
      out.append(s.encode('latin-1', 'backslashreplace').decode('unicode_escape') if '\\' in s else s)
    except UnicodeDecodeError as e:
      raise UserError(f'--stop={s!r}: bad escape ({e.reason}); write a newline as \\n, a backslash as \\\\') from None
  return out
