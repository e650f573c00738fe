"""The torch side of the backend interface: torch_compat's mirror model in eager PyTorch, the same decoding
algorithm step for step as the JAX side (the contract is in inference.backend's docstring), so greedy outputs
agree token for token."""
from __future__ import annotations

import numpy as np
import torch

from minillm_jax.config import UserError
from minillm_jax.data.tokenizer import Tok
from minillm_jax.inference.backend import Backend, cache_len, sp_arrays
from torch_compat import model as tmodel


class TorchBackend(Backend):
  """torch_compat's mirror in eager PyTorch, the same algorithm step for step (see the module docstring)."""
  name = 'torch'

  def __init__(self, model, tok: Tok | None = None, meta: dict | None = None, source: str = ''):
    super().__init__(tok, meta or {}, model.cfg['block_size'], source)
    self.model = model.eval()
    self.vocab = model.cfg['vocab_size']

  def prefill(self, prompts, budgets, sp, seed, stop_ids):
    dev, B, S = self.model.device, len(prompts), cache_len(prompts, budgets, self.context)
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
            'sp': sp_arrays(sp, self.vocab)}

  def decode(self, st, n_steps):
    S = st['seq'].shape[1]
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
    return new, st['done'].tolist(), st['pos'] >= st['seq'].shape[1]

  def nll(self, tokens_BxT):
    x = torch.as_tensor(np.asarray(tokens_BxT), dtype=torch.long, device=self.model.device)
    with torch.no_grad():
      logp = torch.log_softmax(self.model(x[:, :-1]).float(), dim=-1)
      return -logp.gather(-1, x[:, 1:, None])[..., 0].cpu().numpy()


def torch_process_logits(logits_BxV, seq_BxS, pos: int, sp: dict):
  """The torch twin of jax_backend.process_logits (same order and tie rules)."""
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
  x = torch_process_logits(logits_BxV, seq_BxS, pos, sp)
  if sp['temperature'] <= 0:
    return x.argmax(-1)
  return torch.multinomial(torch.softmax(x, -1), 1, generator=gen)[:, 0]


def mirror(cfg: dict, sd: dict, device: str | None):
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
