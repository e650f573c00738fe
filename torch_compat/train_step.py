"""The torch mirror's train step with the JAX trainer's hyper-parameters: what `bench` times against the JAX
step (and a reference for anyone checking the two train alike)."""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as tF

from torch_compat import convert
from torch_compat import model as tmodel


def torch_train_run(mc, flat: dict, o, variant: str, batch_np: dict, dev) -> Callable[[int], float]:
  """The torch mirror with the same weights, batch and AdamW/clipping hyper-parameters (fused AdamW, decay on
  the tensors the JAX mask decays); torch.compile on the model as nanoGPT does; bf16 through autocast."""
  m = tmodel.GPT(mc.to_dict())
  m.load_state_dict(convert.flax_to_torch(mc, flat, 'pt'))
  m = m.to(dev).train()
  emb = ('transformer.wte.', 'transformer.wpe.')
  decay = {n for n, p in m.named_parameters()
           if p.ndim >= 2 and (o.decay_embeddings or not n.startswith(emb))}
  groups = [{'params': [p for n, p in m.named_parameters() if (n in decay) == d],
             'weight_decay': o.weight_decay if d else 0.0} for d in (True, False)]
  opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, fused=True)
  f = torch.compile(m) if 'compile' in variant else m
  x, y = (torch.from_numpy(batch_np[k]).long().to(dev) for k in ('inputs', 'targets'))
  amp = functools.partial(torch.autocast, dev.type, torch.bfloat16, enabled=variant.endswith('bf16'))

  def run(k: int) -> float:
    for _ in range(k):
      with amp():
        loss = tF.cross_entropy(f(x).float().flatten(0, 1), y.flatten())
      loss.backward()
      if o.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(m.parameters(), o.grad_clip)
      opt.step()
      opt.zero_grad(set_to_none=True)
    if dev.type == 'cuda':
      torch.cuda.synchronize()
    return loss.item()
  return run
