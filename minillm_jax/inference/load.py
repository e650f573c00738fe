"""Loading a model for inference, from a run directory or any format torch_compat reads, onto either backend;
and the sample `train` prints at the end of a run."""
from __future__ import annotations

import os

import jax

from minillm_jax import config as config_lib
from minillm_jax import workdir as wd
from minillm_jax.config import UserError
from minillm_jax.data.template import ASSISTANT, END, USER
from minillm_jax.data.tokenizer import Tok
from minillm_jax.inference import jax_backend
from minillm_jax.inference import text as text_lib
from minillm_jax.inference.backend import Backend, SampleParams, check_weights, is_instruction_tuned
from minillm_jax.training import checkpoint

SFT_PROMPT = 'Write a Python function `is_even(n)`: Return True if n is even.'  # an instruction-tuned run's sample


def _tok(tok_json: str, where: str) -> Tok:
  if not tok_json:
    raise UserError(f'{where} carries no tokenizer; export it with its tokenizer.json')
  return Tok.from_json_str(tok_json)


def load(workdir: str | None = None, ckpt: str | None = None, step: str | int = 'best', backend: str = 'auto',
         device: str | None = None, weights: str = 'float32') -> Backend:
  """A backend from a run directory (--workdir, or --ckpt pointing at one) or a .pt file / nanoGPT ckpt /
  Hugging Face directory (--ckpt). backend: auto (jax for workdirs, torch for torch files), jax or torch;
  either framework can run either source (converted in memory through torch_compat.convert)."""
  if bool(workdir) == bool(ckpt):
    raise UserError('give exactly one of --workdir=RUN_DIR or --ckpt=PATH (.pt file, nanoGPT ckpt or HF directory)')
  if backend not in ('auto', 'jax', 'torch'):
    raise UserError(f'--backend={backend!r}: use auto, jax or torch')
  if device and backend == 'jax':
    raise UserError('--device selects the torch device; use it with --backend=torch (or a torch checkpoint)')
  if device and backend == 'auto':  # asking for a torch device is asking for the torch backend
    backend = 'torch'
  check_weights(weights)  # before loading anything
  path = os.path.expanduser(workdir or ckpt)
  if not os.path.exists(path):
    raise UserError(f'{path!r} does not exist')
  if workdir and not wd.is_run_dir(path):
    raise UserError(f'{path!r} is not a run directory (no checkpoints/ inside); for a .pt file or HF directory '
                    'use --ckpt')
  if wd.is_run_dir(path):
    mc, model, tok_json, meta = checkpoint.load_for_inference(path, step)
    if not tok_json and os.path.isfile(os.path.join(path, 'tokenizer.json')):
      with open(os.path.join(path, 'tokenizer.json')) as f:
        tok_json = f.read()
    tok = _tok(tok_json, path)
    if backend in ('auto', 'jax'):
      return jax_backend.JaxBackend(model, tok, meta, path, weights)
    _jax_only(weights)
    from minillm_jax.inference import torch_backend
    from torch_compat import common, convert
    sd = convert.flax_to_torch(mc, convert.flax_flat(model), 'pt')
    return torch_backend.TorchBackend(torch_backend.mirror(mc.to_dict(), sd, device), tok, common.export_meta(meta),
                                      path)
  if step not in ('best', 'latest', None):
    raise UserError(f'--step={step} needs a run directory; {path!r} holds one set of weights')
  from torch_compat import formats
  imp = formats.load_any(path)
  tok = _tok(imp.tokenizer_json, path)
  meta = dict(imp.meta)
  if backend == 'jax':
    from torch_compat import convert
    return jax_backend.JaxBackend(convert.load_into_flax(imp.model_config, imp.flat), tok, meta, path, weights)
  _jax_only(weights)
  from minillm_jax.inference import torch_backend
  from torch_compat import convert
  sd = convert.flax_to_torch(imp.model_config, imp.flat, 'pt')
  return torch_backend.TorchBackend(torch_backend.mirror(imp.model_config.to_dict(), sd, device), tok, meta, path)


def _jax_only(weights: str):
  if weights != 'float32':
    raise UserError(f'--weights={weights} is a JAX backend option; add --backend=jax (the torch mirror runs the '
                    'float32 weights)')


def print_sample(workdir: str, step: str | int = 'best') -> str:
  """Samples the run's checkpoint with its config's `sample` section; prints and appends to samples.txt. In a
  multi-process run every process restores and samples (Orbax restores collectively; the same seed gives the
  same text) and process 0 alone prints and writes."""
  _, model, tok_json, meta = checkpoint.load_for_inference(workdir, step)
  tok = Tok.from_json_str(tok_json)
  s = config_lib.from_plain(meta['config']).sample
  if is_instruction_tuned(meta, tok):  # an instruction through the chat template; the reply ends at <|end|>
    ask = s.prompt or SFT_PROMPT
    be = jax_backend.JaxBackend(model, tok, meta)
    ids, stops = text_lib.instruction_prompt(be, ask)
    reply = text_lib.complete(be, [ids], s.max_new_tokens, SampleParams.from_config(s), s.seed, (), stops)[0]
    text = f'{USER}{ask}{END}{ASSISTANT}\n{reply}'
  else:
    ids = jax_backend.generate(model, tok.encode(s.prompt) or [tok.eot_id or 0], s.max_new_tokens,
                               SampleParams.from_config(s), seed=s.seed)[0].tolist()
    text = s.prompt + tok.decode(ids)
  if jax.process_index() != 0:
    return text
  print(f'--- sample (step {meta["step"]}, val loss {meta.get("val_loss")}) ---\n{text}\n---', flush=True)
  with open(os.path.join(workdir, 'samples.txt'), 'a') as f:
    f.write(f'--- step {meta["step"]} ---\n{text}\n')
  return text
