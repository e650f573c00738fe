"""The framework-neutral model interface behind generate, chat and evaluate: tokenize, prefill, decode steps,
score. `JaxBackend` (the Flax model, jitted, in minillm_jax.sample) and `TorchBackend` (torch_compat's mirror)
implement it; `load()` builds either from a workdir, a .pt file or a Hugging Face directory.

Decoding contract, shared by both backends so that their greedy outputs agree token for token:
- a batch of prompts of different lengths runs in one preallocated KV cache of `context` positions with one
  scalar position for all rows. The prefill covers the shortest prompt; after it each step feeds, per row,
  its own prompt token while the row is still inside its prompt and the sampled token afterwards (what the
  Llama reference `generate` does). Every row then sees exactly its unpadded context: no padding mask, no
  per-row positions, and learned absolute positions stay right.
- per-row budgets and stop token ids end rows; the batch ends when all rows are done or the cache is full.
  `generate_ids` then keeps the newest half of each row and prefills again (learned positions cannot run
  past the table).
- sampling: repetition penalty over the last `repetition_window` tokens (prompt included), then temperature,
  top-k, top-p; temperature 0 is greedy (argmax after the penalty).
"""
from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from minillm_jax.config import UserError
from minillm_jax.tokenizer import CHAT, Tok


@dataclasses.dataclass(frozen=True)
class SampleParams:
  temperature: float = 0.8  # 0 = greedy
  top_k: int | None = None  # None or 0: off
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  repetition_window: int = 64

  @classmethod
  def from_config(cls, s) -> SampleParams:
    return cls(float(s.temperature), s.top_k, float(s.top_p), float(s.repetition_penalty),
               int(s.repetition_window))

  def check(self) -> SampleParams:
    """UserError naming the bad value; returns self when all are usable."""
    if not self.temperature >= 0:
      raise UserError(f'temperature={self.temperature} must be >= 0 (0 = greedy)')
    if self.top_k is not None and self.top_k < 0:
      raise UserError(f'top_k={self.top_k} must be >= 0 (0 = off)')
    if not 0 < self.top_p <= 1:
      raise UserError(f'top_p={self.top_p} must be in (0, 1]')
    if not self.repetition_penalty > 0:
      raise UserError(f'repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)')
    if not 1 <= self.repetition_window < 2 ** 31:
      raise UserError(f'repetition_window={self.repetition_window} must be in [1, 2^31)')
    return self


def is_instruction_tuned(meta: dict, tok: Tok | None) -> bool:
  """Chat template only when the checkpoint says so and the tokenizer has all the chat tokens."""
  return bool(meta.get('instruction_tuned')) and tok is not None and all(
      tok.token_to_id(t) is not None for t in CHAT)


class Backend(abc.ABC):
  """A loaded model plus tokenizer. Subclasses implement prefill/decode/poll/nll; the rest is shared."""
  name = 'base'
  weights = 'float32'  # how the matrices are stored (JaxBackend: WEIGHTS)

  def __init__(self, tok: Tok | None, meta: dict, context: int, source: str = ''):
    self.tok, self.meta, self.context, self.source = tok, dict(meta or {}), int(context), source
    self.step = meta.get('step') if meta else None

  @property
  def instruction_tuned(self) -> bool:
    return is_instruction_tuned(self.meta, self.tok)

  def describe(self) -> str:
    step = f' step {self.step}' if self.step is not None else ''
    dt = f', {self.weights} weights' if self.weights != 'float32' else ''
    return f'{self.source}{step} ({self.name} backend{dt}, context {self.context})'

  # -- the framework part --
  @abc.abstractmethod
  def prefill(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int], sp: SampleParams, seed: int,
              stop_ids: Sequence[int]) -> Any:
    """Decoding state after running the prompts (each 1..context-1 tokens) through the cache."""

  @abc.abstractmethod
  def decode(self, state: Any, n_steps: int) -> Any:
    """Runs up to n_steps decode steps (fewer when every row is done or the cache is full)."""

  @abc.abstractmethod
  def poll(self, state: Any) -> tuple[list[list[int]], list[bool], bool]:
    """(tokens generated per row since the prefill, row done flags, cache full)."""

  @abc.abstractmethod
  def nll(self, tokens_BxT: np.ndarray) -> np.ndarray:
    """Negative log-likelihood in nats [B, T-1] of tokens[:, 1:] given the tokens before them."""

  # -- shared --
  def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sp: SampleParams, seed: int = 0,
                   stop_ids: Sequence[int] = (), chunk: int | None = None) -> Iterator[list[list[int]]]:
    """Yields every row's new tokens after each decode call: `chunk=1` streams token by token, None decodes
    to the end in one call. The last yield holds everything (a stop token ends its row and is included).
    Prompts must fit (len < context); see crop()."""
    S = self.context
    rows = [list(p) for p in prompts]
    if any(not 0 < len(p) < S for p in rows):
      raise ValueError(f'prompts need 1..{S - 1} tokens; crop them first')
    got: list[list[int]] = [[] for _ in rows]
    done = [max_new_tokens <= 0] * len(rows)
    restarts = 0
    while not all(done):
      budgets = [0 if d else max_new_tokens - len(g) for d, g in zip(done, got)]
      state = self.prefill(rows, budgets, sp, seed + restarts, stop_ids)
      base = [len(g) for g in got]
      while True:
        state = self.decode(state, chunk or S)
        new, row_done, full = self.poll(state)
        for g, b, n in zip(got, base, new):
          del g[b:]
          g.extend(n)
        done = [d or rd for d, rd in zip(done, row_done)]
        yield [list(g) for g in got]
        if all(done) or full:
          break
      # cache full: keep the newest half of each row (prompt tail + generated) and prefill again
      rows = [(p + g)[-(S // 2):] for p, g in zip(prompts, got)]
      restarts += 1

  def complete_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sp: SampleParams, seed: int = 0,
                   stop_ids: Sequence[int] = ()) -> list[list[int]]:
    out = [[] for _ in prompts]
    for out in self.generate_ids(prompts, max_new_tokens, sp, seed, stop_ids):
      pass
    return out

  def crop(self, ids: Sequence[int], reserve: int = 1) -> tuple[list[int], int]:
    """(ids cut from the left to at most context - reserve tokens, number of tokens dropped)."""
    keep = max(1, self.context - max(1, reserve))
    ids = list(ids)
    return ids[-keep:], max(0, len(ids) - keep)


def _sp_arrays(sp: SampleParams, vocab: int) -> dict:
  """The sampling parameters as plain numbers, top_k 0 = off (both backends read this)."""
  return {'temperature': float(sp.temperature), 'top_k': int(min(sp.top_k or 0, vocab)), 'top_p': float(sp.top_p),
          'penalty': float(sp.repetition_penalty), 'window': int(sp.repetition_window)}


# ------------------------------------------------------------------------------------------------- JAX

WEIGHTS = ('float32', 'bfloat16')  # how the JAX backend stores the matrices it decodes with


def check_weights(weights: str) -> str:
  if weights not in WEIGHTS:
    raise UserError(f'--weights={weights!r}: use {" or ".join(WEIGHTS)}')
  return weights


class JaxBackend(Backend):
  name = 'jax'

  def __init__(self, model, tok: Tok | None = None, meta: dict | None = None, source: str = '',
               weights: str = 'float32'):
    from flax import nnx
    super().__init__(tok, meta or {}, model.c.block_size, source)
    self.model = model
    self.gdef, self.params = nnx.split(model)
    self.vocab = model.c.vocab_size
    self.weights = check_weights(weights)
    if weights == 'bfloat16':
      from minillm_jax import sample
      self.params = sample.bf16_weights(self.params, model.c.tie_embeddings)

  def prefill(self, prompts, budgets, sp, seed, stop_ids):
    from minillm_jax import sample
    return sample.start(self.gdef, self.params, prompts, budgets, _sp_arrays(sp, self.vocab), seed, stop_ids,
                        self.context)

  def decode(self, state, n_steps):
    from minillm_jax import sample
    return sample.run(self.gdef, self.params, state, n_steps)

  def poll(self, state):
    from minillm_jax import sample
    return sample.poll(state)

  def nll(self, tokens_BxT):
    from minillm_jax import sample
    return sample.nll(self.gdef, self.params, tokens_BxT)


# ----------------------------------------------------------------------------------------------- torch

class TorchBackend(Backend):
  """torch_compat's mirror in eager PyTorch, the same algorithm step for step (see the module docstring)."""
  name = 'torch'

  def __init__(self, model, tok: Tok | None = None, meta: dict | None = None, source: str = ''):
    super().__init__(tok, meta or {}, model.cfg['block_size'], source)
    self.model = model.eval()
    self.vocab = model.cfg['vocab_size']

  def prefill(self, prompts, budgets, sp, seed, stop_ids):
    import torch
    dev, B, S = self.model.device, len(prompts), self.context
    seq = torch.zeros((B, S), dtype=torch.long)
    for b, p in enumerate(prompts):
      seq[b, :len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    plen = torch.as_tensor([len(p) for p in prompts], dtype=torch.long)
    n_pre = int(plen.min())
    cache = self.model.init_cache(B, S)
    seq, plen = seq.to(dev), plen.to(dev)
    with torch.no_grad():
      logits, _ = self.model.decode(seq[:, :n_pre], cache, 0)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    budget = torch.as_tensor(list(budgets), dtype=torch.long, device=dev)
    return {'cache': cache, 'seq': seq, 'plen': plen, 'pos': n_pre, 'logits': logits[:, -1].float(),
            'n': torch.zeros(B, dtype=torch.long, device=dev), 'budget': budget, 'done': budget <= 0,
            'stop': torch.as_tensor(list(stop_ids) or [-1], dtype=torch.long, device=dev), 'gen': gen,
            'sp': _sp_arrays(sp, self.vocab)}

  def decode(self, st, n_steps):
    import torch
    S = self.context
    with torch.no_grad():
      for _ in range(n_steps):
        pos = st['pos']
        if pos >= S or bool(st['done'].all()):
          break
        sampled = torch_pick(st['logits'], st['seq'], pos, st['sp'], st['gen'])
        in_prompt = pos < st['plen']
        tok = torch.where(in_prompt, st['seq'][:, pos], sampled)
        new = ~in_prompt & ~st['done']
        st['seq'][:, pos] = tok
        st['n'] += new.long()
        st['budget'] -= new.long()
        hit = (tok[:, None] == st['stop'][None, :]).any(-1)
        st['done'] = st['done'] | (new & (hit | (st['budget'] <= 0)))
        logits, _ = self.model.decode(tok[:, None], st['cache'], pos)
        st['logits'], st['pos'] = logits[:, -1].float(), pos + 1
    return st

  def poll(self, st):
    seq, plen, n = st['seq'].cpu().tolist(), st['plen'].tolist(), st['n'].tolist()
    new = [row[p:p + k] for row, p, k in zip(seq, plen, n)]
    return new, st['done'].tolist(), st['pos'] >= self.context

  def nll(self, tokens_BxT):
    import torch
    x = torch.as_tensor(np.asarray(tokens_BxT), dtype=torch.long, device=self.model.device)
    with torch.no_grad():
      logp = torch.log_softmax(self.model(x[:, :-1]).float(), dim=-1)
      return -logp.gather(-1, x[:, 1:, None])[..., 0].cpu().numpy()


def torch_process_logits(logits_BxV, seq_BxS, pos: int, sp: dict):
  """The torch twin of sample.process_logits (same order and tie rules)."""
  import torch
  x = logits_BxV.float()
  B, V = x.shape
  if sp['penalty'] != 1.0:
    S = seq_BxS.shape[1]
    ar = torch.arange(S, device=x.device)
    in_win = ((ar >= pos - sp['window']) & (ar < pos)).expand(B, S)
    seen = torch.zeros((B, V), dtype=torch.long, device=x.device).scatter_add_(1, seq_BxS, in_win.long()) > 0
    x = torch.where(seen, torch.where(x > 0, x / sp['penalty'], x * sp['penalty']), x)
  if sp['temperature'] <= 0:
    return x
  x = x / sp['temperature']
  k = sp['top_k']
  if (0 < k < V) or sp['top_p'] < 1.0:
    srt = torch.sort(x, dim=-1, descending=True).values
    kk = k if 0 < k < V else V
    srt = torch.where(torch.arange(V, device=x.device) < kk, srt, torch.full_like(srt, float('-inf')))
    probs = torch.softmax(srt, dim=-1)
    n_keep = ((torch.cumsum(probs, -1) - probs) < sp['top_p']).sum(-1, keepdim=True).clamp(1, kk)
    thresh = srt.gather(-1, n_keep - 1)
    x = torch.where(x < thresh, torch.full_like(x, float('-inf')), x)
  return x


def torch_pick(logits_BxV, seq_BxS, pos: int, sp: dict, gen):
  import torch
  x = torch_process_logits(logits_BxV, seq_BxS, pos, sp)
  if sp['temperature'] <= 0:
    return x.argmax(-1)
  return torch.multinomial(torch.softmax(x, -1), 1, generator=gen)[:, 0]


# ---------------------------------------------------------------------------------------------- loading

def _is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, 'checkpoints'))


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
  if workdir and not _is_workdir(path):
    raise UserError(f'{path!r} is not a run directory (no checkpoints/ inside); for a .pt file or HF directory '
                    'use --ckpt')
  if _is_workdir(path):
    from minillm_jax import checkpoint
    mc, model, tok_json, meta = checkpoint.load_for_inference(path, step)
    if not tok_json and os.path.isfile(os.path.join(path, 'tokenizer.json')):
      with open(os.path.join(path, 'tokenizer.json')) as f:
        tok_json = f.read()
    tok = _tok(tok_json, path)
    if backend in ('auto', 'jax'):
      return JaxBackend(model, tok, meta, path, weights)
    _jax_only(weights)
    from torch_compat import convert, formats
    return TorchBackend(_mirror(mc.to_dict(), convert.flax_to_torch(mc, convert.flax_flat(model), 'pt'), device),
                        tok, formats.export_meta(meta), path)
  if step not in ('best', 'latest', None):
    raise UserError(f'--step={step} needs a run directory; {path!r} holds one set of weights')
  from torch_compat import formats
  imp = formats.load_any(path)
  tok = _tok(imp.tokenizer_json, path)
  meta = dict(imp.meta)
  if backend == 'jax':
    from torch_compat import convert
    return JaxBackend(convert.load_into_flax(imp.model_config, imp.flat), tok, meta, path, weights)
  _jax_only(weights)
  from torch_compat import convert
  return TorchBackend(_mirror(imp.model_config.to_dict(), convert.flax_to_torch(imp.model_config, imp.flat, 'pt'),
                             device), tok, meta, path)


def _jax_only(weights: str):
  if weights != 'float32':
    raise UserError(f'--weights={weights} is a JAX backend option; add --backend=jax (the torch mirror runs the '
                    'float32 weights)')


def _mirror(cfg: dict, sd: dict, device: str | None):
  from torch_compat import model as tmodel
  try:
    dev = tmodel.pick_device(device)
  except RuntimeError as e:
    raise UserError(f'--device={device!r}: {str(e).splitlines()[0]}') from None
  m = tmodel.GPT(cfg)
  m.load_state_dict(sd)
  try:
    return m.to(dev).eval()
  except (RuntimeError, AssertionError) as e:
    raise UserError(f'cannot use torch device {dev}: {str(e).splitlines()[0][:200]}') from None
