"""Text generation on any backend (stop strings, stop tokens, streaming, prompt cropping) and its CLI.

  python -m minillm_jax.generate --workdir=runs/x --prompt="Once upon a time" [--num_samples=3 --temperature=0.8
      --top_k=50 --top_p=0.95 --repetition_penalty=1.2 --max_new_tokens=200 --stop='\\n\\n' --seed=1]
  python -m minillm_jax.generate --ckpt=model.pt --backend=torch --prompt=...   # .pt / nanoGPT / HF directory
  python -m minillm_jax.generate --workdir=runs/x --interactive                   # prompt after prompt
  python -m minillm_jax.generate demo --workdir=runs/x                            # the classic prompts

An instruction-tuned model (fine-tuned on chat data) gets the prompt as a user message through the chat template
and its reply ends at <|end|>; --template=off continues the raw text instead. Unset sampling flags come from the
run config's `sample` section. Streamed text is decoded token by token with
the tokenizer's DecodeStream, so a character split over several byte tokens appears whole.
"""
from __future__ import annotations

import os
import sys

from absl import flags

from minillm_jax import cli
from minillm_jax.config import UserError
from minillm_jax.inference import frontend as fe
from minillm_jax.inference import text
from minillm_jax.inference.backend import Backend

DEMO_PROMPTS = ('Once upon a time', 'def quick_sort(collection):', 'To be or not to be')


def _prompt(be: Backend, prompt: str) -> tuple[list[int], list[int] | None]:
  """(prompt ids, stop ids): through the chat template for an instruction-tuned model (--template)."""
  mode = flags.FLAGS.template
  if mode == 'on' and not be.instruction_tuned:
    raise UserError('--template=on: this model is not instruction-tuned (its checkpoint does not say so, or its '
                    'tokenizer lacks the chat tokens)')
  if mode != 'off' and be.instruction_tuned:
    return text.instruction_prompt(be, prompt)
  return text.encode_prompt(be, prompt), None


def _one(be: Backend, prompt: str, sp, max_new, seed, stop, style: fe.Style):
  ids, stop_ids = _prompt(be, prompt)
  sys.stdout.write(style(text.printable(prompt), 'bold') + ('\n' if stop_ids else ''))
  _, interrupted = fe.print_stream(text.stream(be, ids, max_new, sp, seed, stop, stop_ids), style)
  print(style(' [interrupted]', 'yellow') if interrupted else '', flush=True)


def main(argv):
  f = flags.FLAGS
  if len(argv) > 2 or (len(argv) == 2 and argv[1] != 'demo'):
    raise UserError(f'unexpected arguments {argv[1:]}; the only command is demo (flags go as --name=value)')
  if f.num_samples < 1:
    raise UserError(f'--num_samples={f.num_samples} must be >= 1')
  demo = len(argv) == 2
  if f.prompt is not None and not f.prompt and not demo:
    raise UserError('--prompt is empty: give some text to continue')
  be = fe.backend_from_flags()
  sp, max_new, seed = fe.sampling_from_flags(be)
  stop, style = fe.stop_strings(), fe.Style()
  print(style(f'# {be.describe()}', 'dim'), file=sys.stderr, flush=True)
  if demo:
    for i, p in enumerate(DEMO_PROMPTS):
      print(style(f'=== {p} ===', 'cyan'))
      _one(be, p, sp, max_new, seed + i, stop, style)
    return
  if f.interactive:
    save = fe.setup_readline(os.path.expanduser('~/.minillm_generate_history'))
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
  ids, stop_ids = _prompt(be, prompt)
  for i, out in enumerate(text.complete(be, [ids] * f.num_samples, max_new, sp, seed, stop, stop_ids)):
    print(style(f'--- sample {i + 1} ---', 'cyan'))
    print(style(text.printable(prompt), 'bold') + ('\n' if stop_ids else '') + text.printable(out), flush=True)


if __name__ == '__main__':
  fe.define_model_flags()
  fe.define_sampling_flags()
  flags.adopt_module_key_flags(fe)  # the shared flags are defined there; show them in --help
  flags.DEFINE_string('prompt', None, 'Text to continue (default: the run config\'s sample.prompt).')
  flags.DEFINE_integer('num_samples', 1, 'Samples of the same prompt, decoded as one batch.')
  flags.DEFINE_bool('interactive', False, 'Read prompts from the terminal one after another.')
  flags.DEFINE_enum('template', 'auto', ['auto', 'on', 'off'], 'auto: an instruction-tuned model gets the prompt '
                    'as a user message through the chat template (reply ends at <|end|>); off: raw continuation.')
  cli.run(main)
