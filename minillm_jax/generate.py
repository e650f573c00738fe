"""Text generation on any backend (stop strings, stop tokens, streaming, prompt cropping) and its CLI.

  python -m minillm_jax.generate --workdir=runs/x --prompt="Once upon a time" [--num_samples=3 --temperature=0.8
      --top_k=50 --top_p=0.95 --repetition_penalty=1.2 --max_new_tokens=200 --stop='\\n\\n' --seed=1]
  python -m minillm_jax.generate --ckpt=model.pt --backend=torch --prompt=...   # .pt / nanoGPT / HF directory
  python -m minillm_jax.generate --workdir=runs/x --interactive                   # prompt after prompt
  python -m minillm_jax.generate demo --workdir=runs/x                            # the classic prompts

Unset sampling flags come from the run config's `sample` section. Streamed text is decoded token by token with
the tokenizer's DecodeStream, so a character split over several byte tokens appears whole.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from typing import ClassVar

from minillm_jax.backend import Backend, SampleParams
from minillm_jax.config import UserError

DEMO_PROMPTS = ('Once upon a time', 'def quick_sort(collection):', 'To be or not to be')
DEFAULT_MAX_NEW = 256


# ------------------------------------------------------------------------------------------- text layer

def encode_prompt(be: Backend, text: str, reserve: int = 1, warn: bool = True) -> list[int]:
  """Token ids of a non-empty prompt, cropped from the left (with a warning) to leave room for `reserve` new
  tokens; longer generations slide the context (backend.generate_ids)."""
  if not text:
    raise UserError('empty prompt: give some text to continue')
  ids = be.tok.encode(text)
  if not ids:
    raise UserError(f'prompt {text!r} encodes to no tokens')
  kept, dropped = be.crop(ids, reserve)
  if dropped and warn:
    print(f'warning: the prompt is {len(ids)} tokens, longer than the context ({be.context}); kept the last '
          f'{len(kept)}', file=sys.stderr, flush=True)
  return kept


class TextStream:
  """Tokens in, printable text out: decodes across multi-byte characters, ends at a stop token (not shown)
  or a stop string (not shown), and holds back text that might be the start of a stop string."""

  def __init__(self, be: Backend, stop: Sequence[str] = (), stop_ids: Sequence[int] = ()):
    self.dec, self.stops, self.stop_ids = be.tok.stream(), [s for s in stop if s], set(stop_ids)
    self.pending, self.stopped = '', False

  def feed(self, token: int) -> str:
    if self.stopped:
      return ''
    if token in self.stop_ids:
      self.stopped = True
      return self.finish()
    self.pending += self.dec.step(token)
    hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
    if hits:
      out, self.pending, self.stopped = self.pending[:min(hits)], '', True
      return out
    hold = max((k for s in self.stops for k in range(1, min(len(s), len(self.pending) + 1))
                if self.pending.endswith(s[:k])), default=0)
    out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
    return out

  def finish(self) -> str:
    out, self.pending = self.pending, ''
    return out


def stream(be: Backend, prompt_ids: Sequence[int], max_new_tokens: int, sp: SampleParams, seed: int = 0,
           stop: Sequence[str] = (), stop_ids: Sequence[int] | None = None) -> Iterator[str]:
  """Text pieces as they are sampled (one decode step per token). stop_ids defaults to end-of-text."""
  stop_ids = default_stop_ids(be) if stop_ids is None else list(stop_ids)
  ts, seen = TextStream(be, stop, stop_ids), 0
  for rows in be.generate_ids([prompt_ids], max_new_tokens, sp, seed, stop_ids, chunk=1):
    for t in rows[0][seen:]:
      piece = ts.feed(t)
      if piece:
        yield piece
      if ts.stopped:
        return
    seen = len(rows[0])
  tail = ts.finish()
  if tail:
    yield tail


def complete(be: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int, sp: SampleParams, seed: int = 0,
             stop: Sequence[str] = (), stop_ids: Sequence[int] | None = None) -> list[str]:
  """Continuations of a batch of prompts in one decode; the same text `stream` yields for each prompt."""
  stop_ids = default_stop_ids(be) if stop_ids is None else list(stop_ids)
  out = []
  for ids in be.complete_ids(prompts, max_new_tokens, sp, seed, stop_ids):
    ts = TextStream(be, stop, stop_ids)
    out.append(''.join(ts.feed(t) for t in ids) + ts.finish())
  return out


def default_stop_ids(be: Backend) -> list[int]:
  return [be.tok.eot_id] if be.tok is not None else []


# ------------------------------------------------------------------------------------- terminal helpers

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


# ------------------------------------------------------------------------------------------------- flags

def define_model_flags():
  from absl import flags
  flags.DEFINE_string('workdir', None, 'Run directory to load (its best checkpoint unless --step).')
  flags.DEFINE_string('ckpt', None, 'A .pt file, nanoGPT ckpt.pt or Hugging Face directory (or a run directory).')
  flags.DEFINE_string('step', 'best', 'Checkpoint of a run directory: best, latest or a step number.')
  flags.DEFINE_string('backend', 'auto', 'auto (jax for run directories, torch for torch files), jax or torch.')
  flags.DEFINE_string('device', None, 'torch device (cpu, cuda, cuda:1, mps); default MPS > CUDA > CPU.')
  define_weights_flag()


def define_weights_flag():
  from absl import flags
  flags.DEFINE_enum('weights', 'float32', ['float32', 'bfloat16'],
                    'JAX backend: store the matrices in bfloat16 (float32 math on rounded weights; on CPU '
                    'about 1.5x faster batch-1 decoding of models with matrices of 2^18+ weights, which reads every weight per token).')


def define_sampling_flags():
  from absl import flags
  flags.DEFINE_float('temperature', None, '0 = greedy; default: the run config\'s sample.temperature.')
  flags.DEFINE_integer('top_k', None, 'Keep the k most likely tokens (0 = off).')
  flags.DEFINE_float('top_p', None, 'Nucleus: keep the smallest set of tokens reaching this probability.')
  flags.DEFINE_float('repetition_penalty', None, 'Penalty > 1 for tokens in the recent window (1 = off).')
  flags.DEFINE_integer('repetition_window', None, 'How many recent tokens the penalty looks at.')
  flags.DEFINE_integer('max_new_tokens', None, 'Tokens to generate per sample.')
  flags.DEFINE_integer('seed', None, 'Sampling seed.')
  flags.DEFINE_multi_string('stop', [], 'Stop string (repeatable); \\n escapes are understood.')


def backend_from_flags() -> Backend:
  from absl import flags
  f = flags.FLAGS
  step = f.step
  if step not in ('best', 'latest'):
    try:
      step = int(step)
    except ValueError:
      raise UserError(f'--step={f.step!r}: use best, latest or a step number') from None
  from minillm_jax import backend
  return backend.load(f.workdir, f.ckpt, step, f.backend, f.device, f.weights)


def config_sampling(be: Backend) -> tuple[SampleParams, int, int]:
  """(sampling params, max_new_tokens, seed) from the checkpoint's run config, or the defaults."""
  s = ((be.meta.get('config') or {}).get('sample')) or {}
  d = SampleParams()
  sp = SampleParams(float(s.get('temperature', d.temperature)), s.get('top_k', d.top_k),
                    float(s.get('top_p', d.top_p)), float(s.get('repetition_penalty', d.repetition_penalty)),
                    int(s.get('repetition_window', d.repetition_window)))
  return sp, int(s.get('max_new_tokens', DEFAULT_MAX_NEW)), int(s.get('seed', 0))


def sampling_from_flags(be: Backend) -> tuple[SampleParams, int, int]:
  from absl import flags
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
  from absl import flags
  out = []
  for s in flags.FLAGS.stop:
    try:
      out.append(s.encode('latin-1', 'backslashreplace').decode('unicode_escape') if '\\' in s else s)
    except UnicodeDecodeError as e:
      raise UserError(f'--stop={s!r}: bad escape ({e.reason}); write a newline as \\n, a backslash as \\\\') from None
  return out


# ---------------------------------------------------------------------------------------------------- CLI

def _one(be: Backend, prompt: str, sp, max_new, seed, stop, style: Style):
  ids = encode_prompt(be, prompt)
  sys.stdout.write(style(prompt, 'bold'))
  _, interrupted = print_stream(stream(be, ids, max_new, sp, seed, stop), style)
  print(style(' [interrupted]', 'yellow') if interrupted else '', flush=True)


def main(argv):
  from absl import flags
  f = flags.FLAGS
  if len(argv) > 2 or (len(argv) == 2 and argv[1] != 'demo'):
    raise UserError(f'unexpected arguments {argv[1:]}; the only command is demo (flags go as --name=value)')
  if f.num_samples < 1:
    raise UserError(f'--num_samples={f.num_samples} must be >= 1')
  demo = len(argv) == 2
  if f.prompt is not None and not f.prompt and not demo:
    raise UserError('--prompt is empty: give some text to continue')
  be = backend_from_flags()
  sp, max_new, seed = sampling_from_flags(be)
  stop, style = stop_strings(), Style()
  print(style(f'# {be.describe()}', 'dim'), file=sys.stderr, flush=True)
  if demo:
    for i, p in enumerate(DEMO_PROMPTS):
      print(style(f'=== {p} ===', 'cyan'))
      _one(be, p, sp, max_new, seed + i, stop, style)
    return
  if f.interactive:
    save = setup_readline(os.path.expanduser('~/.minillm_generate_history'))
    n = 0
    try:
      while True:
        try:
          prompt = input(style('prompt> ', 'green', prompt=True))
        except KeyboardInterrupt:
          print()
          continue
        except EOFError:
          print()
          return
        if prompt.strip():  # a new seed per prompt: the same prompt twice gives two samples
          _one(be, prompt, sp, max_new, seed + n, stop, style)
          n += 1
    finally:
      save()
  prompt = f.prompt
  if prompt is None:
    prompt = (be.meta.get('config') or {}).get('sample', {}).get('prompt', '')
  if not prompt:
    raise UserError('no prompt: pass --prompt="..." (or --interactive, or the demo command)')
  if f.num_samples == 1:
    _one(be, prompt, sp, max_new, seed, stop, style)
    return
  ids = encode_prompt(be, prompt)
  for i, text in enumerate(complete(be, [ids] * f.num_samples, max_new, sp, seed, stop)):
    print(style(f'--- sample {i + 1} ---', 'cyan'))
    print(style(prompt, 'bold') + text, flush=True)


if __name__ == '__main__':
  from absl import flags

  from minillm_jax import cli
  define_model_flags()
  define_sampling_flags()
  flags.DEFINE_string('prompt', None, 'Text to continue (default: the run config\'s sample.prompt).')
  flags.DEFINE_integer('num_samples', 1, 'Samples of the same prompt, decoded as one batch.')
  flags.DEFINE_bool('interactive', False, 'Read prompts from the terminal one after another.')
  cli.run(main)
