"""Text on top of a backend's token decoding: prompt encoding with cropping, streamed text that is cut at stop
strings and stop tokens and never shows half a character, and batched completions."""
from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence

from minillm_jax.config import UserError
from minillm_jax.data.template import END, render_template
from minillm_jax.data.tokenizer import SPECIALS, UNK
from minillm_jax.inference.backend import Backend, SampleParams

DEFAULT_MAX_NEW = 256


def encode_prompt(be: Backend, text: str, reserve: int = 1, warn: bool = True) -> list[int]:
  """Token ids of a non-empty prompt, cropped from the left (with a warning) to leave room for `reserve` new
  tokens; longer generations slide the context (backend.generate_ids)."""
  if not text:
    raise UserError('empty prompt: give some text to continue')
  ids = be.tok.encode(text)
  if not ids:
    raise UserError(f'prompt {text!r} encodes to no tokens')
  if warn:
    warn_unknown_chars(be, text)
  kept, dropped = be.crop(ids, reserve)
  if dropped and warn:
    room = be.context - len(kept)
    print(f'warning: the prompt is {len(ids)} tokens, longer than the context ({be.context}) minus the {room} '
          f'kept for new tokens; kept its last {len(kept)}', file=sys.stderr, flush=True)
  return kept


def unknown_chars(be: Backend, text: str) -> list[str]:
  """Characters of `text` the (character-level) tokenizer lacks: they would encode to <|unk|>."""
  tok = be.tok
  if tok is None or getattr(tok, 'kind', '') != 'char' or tok.token_to_id(UNK) is None:
    return []
  for special in (*SPECIALS, UNK):  # whole tokens of their own, not characters
    text = text.replace(special, '')
  return sorted({c for c in text if tok.token_to_id(c) is None})


def warn_unknown_chars(be: Backend, text: str, file=None) -> None:
  """One warning per new unknown character (per backend), naming them: the model sees <|unk|> instead."""
  seen = be.__dict__.setdefault('_warned_unknown', set())
  new = [c for c in unknown_chars(be, text) if c not in seen]
  if new:
    seen.update(new)
    shown = ' '.join(repr(c) for c in new[:12]) + (' ...' if len(new) > 12 else '')
    print(f'warning: {len(new)} character{"s" if len(new) > 1 else ""} not in the tokenizer\'s vocabulary '
          f'became {UNK}: {shown}', file=file or sys.stderr, flush=True)


# C0 and C1 control characters (ESC, BEL, CR, backspace, ...) other than newline and tab: a prompt or a model's
# output holding them could move the cursor, rewrite the screen or retitle the terminal.
_CONTROL = re.compile('[\x00-\x08\x0b-\x1f\x7f-\x9f]')


def printable(text: str) -> str:
  """`text` safe to print to a terminal: control characters other than newline and tab shown escaped (\\x1b)."""
  return _CONTROL.sub(lambda m: f'\\x{ord(m.group()):02x}', text)


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
  """Text pieces as they are sampled (one decode step per token), for a terminal: control characters are
  escaped (printable). stop_ids defaults to end-of-text."""
  stop_ids = default_stop_ids(be) if stop_ids is None else list(stop_ids)
  ts = TextStream(be, stop, stop_ids)
  for delta in be.generate_ids([prompt_ids], max_new_tokens, sp, seed, stop_ids, chunk=1):
    for t in delta[0]:
      piece = ts.feed(t)
      if piece:
        yield printable(piece)
      if ts.stopped:
        return
  tail = ts.finish()
  if tail:
    yield printable(tail)


def complete(be: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int, sp: SampleParams, seed: int = 0,
             stop: Sequence[str] = (), stop_ids: Sequence[int] | None = None) -> list[str]:
  """Continuations of a batch of prompts in one decode; the same text `stream` yields for each prompt."""
  stop_ids = default_stop_ids(be) if stop_ids is None else list(stop_ids)
  out = []
  for ids in be.complete_ids(prompts, max_new_tokens, sp, seed, stop_ids):
    ts = TextStream(be, stop, stop_ids)
    out.append(''.join(ts.feed(t) for t in ids) + ts.finish())
  return out


def instruction_prompt(be: Backend, prompt: str) -> tuple[list[int], list[int]]:
  """(prompt ids, stop ids) of one user message through the chat template, for an instruction-tuned model: the
  reply ends at <|end|> (or end-of-text). Cropped from the left like encode_prompt."""
  ids = encode_prompt(be, render_template([{'role': 'user', 'content': prompt}]))
  return ids, [be.tok.token_to_id(END), be.tok.eot_id]


def default_stop_ids(be: Backend) -> list[int]:
  return [be.tok.eot_id] if be.tok is not None else []


def config_sampling(be: Backend) -> tuple[SampleParams, int, int]:
  """(sampling params, max_new_tokens, seed) from the checkpoint's run config, or the defaults."""
  s = ((be.meta.get('config') or {}).get('sample')) or {}
  d = SampleParams()
  sp = SampleParams(float(s.get('temperature', d.temperature)), s.get('top_k', d.top_k),
                    float(s.get('top_p', d.top_p)), float(s.get('repetition_penalty', d.repetition_penalty)),
                    int(s.get('repetition_window', d.repetition_window)))
  return sp, int(s.get('max_new_tokens', DEFAULT_MAX_NEW)), int(s.get('seed', 0))
