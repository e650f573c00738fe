"""Terminal chat with a trained model (either backend). The chat template is minillm_jax.data.template.

  python -m minillm_jax.chat --workdir=runs/x                # interactive: /help lists the commands
  python -m minillm_jax.chat --ckpt=model.pt --prompt="Hi"   # one-shot: prints the reply and exits (no TTY needed)
  echo "Hi" | python -m minillm_jax.chat --workdir=runs/x    # piped: one message (or /command) per line

Instruction-tuned checkpoints (meta `instruction_tuned: true` and a tokenizer with the chat tokens) get the chat
template and stop at <|end|> or <|endoftext|>. Any other model gets plain continuation of a transcript
("User: ...\\nAssistant:") and stops at the next "\\nUser:". When the conversation outgrows the context, the
oldest exchanges are dropped first (with a notice); the system message is kept. A reply is at most
MAX_REPLY_TOKENS (16,384) tokens (/len, --max_new_tokens); /save never replaces a file, /save! does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time

from absl import flags

from minillm_jax import cli
from minillm_jax import workdir as wd
from minillm_jax.config import UserError
from minillm_jax.data.template import END, PLAIN_STOPS, render_plain, render_template
from minillm_jax.inference import frontend as fe
from minillm_jax.inference import load
from minillm_jax.inference.backend import Backend, SampleParams
from minillm_jax.inference.text import encode_prompt, printable, stream, warn_unknown_chars

# The longest reply /len and --max_new_tokens allow: beyond the context the decoder slides (a new prefill every
# context/2 tokens), so a reply this long already takes minutes on a CPU; Ctrl-C stops any reply early.
MAX_REPLY_TOKENS = 16384
HELP = """commands:
  /help             this list
  /clear            forget the conversation
  /exit             quit (also Ctrl-D); Ctrl-C stops a reply
  /temp [X]         temperature (0 = greedy)
  /topk [N]         top-k (0 = off)
  /topp [X]         top-p (1 = off)
  /penalty [X]      repetition penalty (1 = off)
  /len [N]          max tokens per reply (at most {max_reply})
  /ckpt best|latest|N   load another checkpoint of the run
  /save [PATH]      write the conversation (.json for JSON, else text); never replaces a file
  /save! PATH       the same, replacing PATH if it exists""".format(max_reply=f'{MAX_REPLY_TOKENS:,}')


@dataclasses.dataclass
class Conversation:
  templated: bool
  system: str = ''
  exchanges: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  def messages(self, exchanges: list[tuple[str, str]], user: str) -> list[dict]:
    out = [{'role': 'system', 'content': self.system}] if self.system else []
    for u, a in exchanges:
      out += [{'role': 'user', 'content': u}, {'role': 'assistant', 'content': a}]
    return out + [{'role': 'user', 'content': user}]

  def render(self, exchanges: list[tuple[str, str]], user: str) -> str:
    return (render_template if self.templated else render_plain)(self.messages(exchanges, user))

  def prompt_ids(self, be: Backend, user: str, max_new_tokens: int) -> tuple[list[int], int]:
    """(ids of the prompt for the next reply, oldest exchanges dropped to fit). Room is kept for
    min(max_new_tokens, context/2) reply tokens; a single message longer than that is cropped (warning)."""
    room = be.context - min(max_new_tokens, be.context // 2)
    for k in range(len(self.exchanges) + 1):
      ids = be.tok.encode(self.render(self.exchanges[k:], user))
      if len(ids) <= room:
        return ids, k
    return encode_prompt(be, self.render([], user), be.context - room), len(self.exchanges)

  def stops(self, be: Backend) -> tuple[list[str], list[int]]:
    if self.templated:
      return [], [be.tok.token_to_id(END), be.tok.eot_id]
    return list(PLAIN_STOPS), [be.tok.eot_id]


class Chat:
  def __init__(self, be: Backend, sp: SampleParams, max_new: int, seed: int, system: str = '',
               loader: dict | None = None, out=None, stop: list[str] | None = None, err=None):
    self.be, self.sp, self.max_new, self.seed, self.loader = be, sp, max_new, seed, loader or {}
    self.extra_stops = list(stop or [])
    self.conv = Conversation(be.instruction_tuned, system)
    self.out, self.err = out or sys.stdout, err or sys.stderr  # errors apart: piped replies stay clean
    self.style, self.err_style, self.turn = fe.Style(self.out), fe.Style(self.err), 0

  def say(self, text: str, *styles: str):  # control characters (a pasted ESC ...) are shown escaped
    print(self.style(printable(text), *styles), file=self.out, flush=True)

  def error(self, text: str):
    print(self.err_style(printable(text), 'red'), file=self.err, flush=True)

  def banner(self):
    mode = 'chat template' if self.conv.templated else 'plain continuation (not instruction-tuned)'
    self.say(f'{self.be.describe()}; {mode}. /help for commands, Ctrl-D to quit.', 'dim')

  def reply(self, user: str, prefix: str = '') -> str:
    warn_unknown_chars(self.be, user, self.err)
    ids, dropped = self.conv.prompt_ids(self.be, user, self.max_new)
    if dropped:
      self.say(f'(dropped the {dropped} oldest exchange{"s" if dropped > 1 else ""} to fit the context of '
               f'{self.be.context} tokens)', 'yellow')
      del self.conv.exchanges[:dropped]
    stop, stop_ids = self.conv.stops(self.be)
    stop += self.extra_stops
    pieces = stream(self.be, ids, self.max_new, self.sp, self.seed + self.turn, stop, stop_ids)
    if not self.conv.templated:  # after the transcript's "Assistant:" the reply's leading space or newline is not shown
      pieces = _lstrip_first(pieces)
    if prefix:
      self.out.write(self.style(prefix, 'cyan', 'bold'))
    text, interrupted = fe.print_stream(pieces, self.style, 'cyan')
    print(self.style(' [interrupted]', 'yellow') if interrupted else '', file=self.out, flush=True)
    self.conv.exchanges.append((user, text.strip()))
    self.turn += 1
    return text.strip()

  def command(self, line: str) -> bool:
    """Runs a /command; False means quit."""
    name, _, arg = line.strip().partition(' ')
    arg = arg.strip()
    knobs = {'/temp': ('temperature', float), '/topk': ('top_k', int), '/topp': ('top_p', float),
             '/penalty': ('repetition_penalty', float)}
    if name in ('/exit', '/quit'):
      return False
    if name == '/help':
      self.say(HELP)
    elif name == '/clear':
      self.conv.exchanges.clear()
      self.say('(conversation cleared)', 'dim')
    elif name in knobs:
      field, conv = knobs[name]
      if arg:
        try:
          self.sp = dataclasses.replace(self.sp, **{field: conv(arg)}).check()
        except (ValueError, UserError) as e:
          self.error(f'error: {name} {arg}: {e}')
          return True
      self.say(f'{field} = {getattr(self.sp, field)}', 'dim')
    elif name == '/len':
      if arg:
        try:
          n = int(arg)
          if n < 1:
            raise ValueError('must be >= 1')
          if n > MAX_REPLY_TOKENS:
            raise ValueError(f'at most {MAX_REPLY_TOKENS} tokens per reply; pick a smaller N')
          self.max_new = n
        except ValueError as e:
          self.error(f'error: /len {arg}: {e}')
          return True
      self.say(f'max_new_tokens = {self.max_new}', 'dim')
    elif name == '/ckpt':
      self._ckpt(arg)
    elif name in ('/save', '/save!'):
      self._save(arg, overwrite=name == '/save!')
    else:
      self.error(f'unknown command {name}; /help lists them')
    return True

  def _ckpt(self, arg: str):
    if not self.loader.get('workdir'):
      self.error('error: /ckpt needs a run directory (--workdir); this model was loaded from one file')
      return
    step = arg or 'best'
    if step not in ('best', 'latest'):
      try:
        step = int(step)
      except ValueError:
        self.error(f'error: /ckpt {arg}: use best, latest or a step number')
        return
    try:
      be = load.load(step=step, **self.loader)
    except UserError as e:
      self.error(f'error: {e}')
      return
    self.be, self.conv.templated = be, be.instruction_tuned
    self.say(f'loaded {be.describe()}', 'dim')

  def _save(self, arg: str, overwrite: bool = False):
    if overwrite and not arg:
      self.error('error: /save! needs the PATH to replace')
      return
    path = os.path.expanduser(arg or f'chat-{time.strftime("%Y%m%d-%H%M%S")}.txt')
    msgs = self.conv.messages(self.conv.exchanges, '')[:-1]
    try:
      with open(path, 'w' if overwrite else 'x', encoding='utf-8') as f:  # 'x': an existing file is kept
        if path.endswith('.json'):
          json.dump({'source': self.be.source, 'step': self.be.step, 'backend': self.be.name,
                     'sampling': dataclasses.asdict(self.sp), 'max_new_tokens': self.max_new, 'messages': msgs},
                    f, indent=1, ensure_ascii=False)
        else:
          f.write(''.join(f'{m["role"]}: {m["content"]}\n\n' for m in msgs))
    except FileExistsError:
      self.error(f'error: {path} exists and was kept; /save another name, or /save! {path} to replace it')
      return
    except OSError as e:
      self.error(f'error: cannot write {path}: {e.strerror}')
      return
    self.say(f'saved {len(msgs)} messages to {path}', 'dim')

  def loop(self, history_file: str | None = None):
    tty = sys.stdin.isatty()
    save = fe.setup_readline(history_file) if tty else (lambda: None)
    if tty:
      self.banner()
    try:
      while True:
        try:
          line = input(self.style('you> ', 'green', 'bold', prompt=True) if tty else '')
        except KeyboardInterrupt:
          print('\n(Ctrl-D or /exit to quit)', file=self.out, flush=True)
          continue
        except EOFError:
          if tty:
            print(file=self.out)
          return
        if not line.strip():
          continue
        if line.startswith('/'):
          if not self.command(line):
            return
          continue
        self.reply(line, 'assistant> ' if tty else '')
    finally:
      save()


def _lstrip_first(pieces):
  started = False
  for p in pieces:
    if not started:
      p = p.lstrip()
      started = bool(p)
    if p:
      yield p


@contextlib.contextmanager
def _sigint_to_main_thread(on: bool):
  """Blocks SIGINT while JAX/torch start their worker threads, which inherit the mask: Ctrl-C then always
  reaches the main thread, the only one whose wait in readline's select() it can interrupt."""
  if not on or not hasattr(signal, 'pthread_sigmask'):
    yield
    return
  # Ctrl-C is this program's "stop the reply", also when started with SIGINT ignored (a shell's `cmd &`)
  signal.signal(signal.SIGINT, signal.default_int_handler)
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a Ctrl-C pressed meanwhile arrives now


def main(argv):
  f = flags.FLAGS
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {argv[1:]}; flags go as --name=value')
  if f.prompt is not None and not f.prompt.strip():
    raise UserError('--prompt is empty: give a message for the one-shot reply')
  interactive = f.prompt is None and sys.stdin.isatty()
  with _sigint_to_main_thread(interactive):
    be = fe.backend_from_flags()
    if interactive:  # compile now, while the threads XLA starts for it inherit the blocked SIGINT
      be.complete_ids([[be.tok.eot_id]], 1, SampleParams(temperature=0.0))
  sp, max_new, seed = fe.sampling_from_flags(be)
  if max_new > MAX_REPLY_TOKENS:
    if f.max_new_tokens is not None:
      raise UserError(f'--max_new_tokens={max_new}: chat replies are at most {MAX_REPLY_TOKENS} tokens; pick a '
                      'smaller value')
    max_new = MAX_REPLY_TOKENS  # a run config's sample.max_new_tokens beyond the limit
  loader = {'workdir': f.workdir or (f.ckpt if f.ckpt and wd.is_run_dir(f.ckpt) else None),
            'backend': f.backend, 'device': f.device, 'weights': f.weights}
  chat = Chat(be, sp, max_new, seed, f.system, loader, stop=fe.stop_strings())
  if f.prompt is not None:
    chat.reply(f.prompt)
    return
  chat.loop(os.path.expanduser(f.history_file) if f.history_file else None)


if __name__ == '__main__':
  fe.define_model_flags()
  fe.define_sampling_flags()
  flags.DEFINE_string('prompt', None, 'One-shot: reply to this message, print the reply and exit.')
  flags.DEFINE_string('system', '', 'System message (kept when old exchanges are dropped).')
  flags.DEFINE_string('history_file', '~/.minillm_chat_history', 'Input history for line editing (\'\' = none).')
  flags.adopt_module_key_flags(fe)  # --workdir, --ckpt, sampling: defined there, shown in chat's --help
  cli.run(main)
