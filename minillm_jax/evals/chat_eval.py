"""The `chat` suite of `evaluate`: what instruction fine-tuning changes, measured the same way on a base and a
fine-tuned model.

  - assistant-token perplexity on held-out conversations: the chat validation split of the (first) compared run
    fine-tuned on chat data, else python_instruct's (the default SFT set), the same for every model; rendered with the chat template, scored
    only on the reply tokens and their `<|end|>` (the loss fine-tuning minimises). Long conversations are scored
    in windows of context + 1 tokens with stride context, so a model with a shorter context scores the same tokens
    with less history.
  - instruction execution: the code suite's execution tasks asked as python_instruct asks ("Write a Python
    function `add(a, b)`: Return the sum of a and b."), through the chat template for instruction-tuned models
    and as a plain "User: ... Assistant:" transcript for others (as `chat` talks to each); the first function of
    the greedy reply runs against the task's unit tests in the sandbox.
"""
from __future__ import annotations

import ast
import math

import numpy as np

from minillm_jax import config as config_lib
from minillm_jax.data import chat_data, instruct
from minillm_jax.data.template import END, PLAIN_STOPS, render_ids, render_plain, render_template
from minillm_jax.evals import code_eval
from minillm_jax.inference.backend import Backend, SampleParams
from minillm_jax.inference.text import complete

MAX_CONVERSATIONS = 200  # evenly spaced over the held-out split: every source file's share, a bounded cost


def held_out(plain: dict | None) -> tuple[str, list[list[dict]]]:
  """(name, conversations): the validation split of a run config (to_plain) fine-tuned on chat data, else
  python_instruct's. evaluate takes it from the first such run it compares and scores every model on it."""
  plain = plain or {}
  if (plain.get('data') or {}).get('format') == 'chat':
    cfg = config_lib.from_plain(plain)
    return f'{cfg.data.corpus} val', chat_data.conversations(cfg.data)[1]
  return 'python_instruct val', instruct.build()[1]


def assistant_perplexity(be: Backend, convs: list[list[dict]], limit: int = MAX_CONVERSATIONS,
                         batch: int = 8) -> dict:
  """Mean NLL of the assistant tokens (mask of render_ids) of up to `limit` conversations, evenly spaced."""
  pick = np.unique(np.linspace(0, len(convs) - 1, min(limit, len(convs))).round().astype(int))
  T = be.context
  wins = []  # (ids, mask) windows of at most T + 1 tokens, stride T: each token predicted once
  for i in pick:
    ids, mask = render_ids(be.tok, convs[i])
    ids, mask = ids + [be.tok.eot_id], mask + [0]
    wins += [(ids[s:s + T + 1], mask[s:s + T + 1]) for s in range(0, len(ids) - 1, T)]
  pad = be.tok.pad_id if be.tok.pad_id is not None else be.tok.eot_id
  W = min(T + 1, max(len(w) for w, _ in wins))
  total, count = 0.0, 0
  for b in range(0, len(wins), batch):
    x, m = np.full((batch, W), pad, np.int32), np.zeros((batch, W), np.float64)  # one shape: one compile
    for k, (ids, mask) in enumerate(wins[b:b + batch]):
      x[k, :len(ids)], m[k, :len(mask)] = ids, mask
    nll = np.asarray(be.nll(x), np.float64)
    total += float((nll * m[:, 1:]).sum())
    count += int(m[:, 1:].sum())
  mean = total / max(count, 1)
  return {'conversations': len(pick), 'tokens': count, 'nll': mean, 'perplexity': math.exp(min(mean, 700.0)),
          'window': T}


def instruction(prompt: str) -> str:
  """A code-suite execution prompt (header + docstring) asked the python_instruct way."""
  fn = ast.parse(prompt + '    pass\n').body[0]
  return f'Write a Python function `{fn.name}({ast.unparse(fn.args)})`: {ast.get_docstring(fn)}'


def instruction_execution(be: Backend, max_new: int = 128, timeout: float = 3.0, execute: bool = True) -> dict:
  asks = [instruction(p) for p, _ in code_eval.EXEC]
  if be.instruction_tuned:
    texts, stop, stop_ids = [render_template([{'role': 'user', 'content': a}]) for a in asks], (), [
        be.tok.token_to_id(END), be.tok.eot_id]
  else:
    texts, stop, stop_ids = [render_plain([{'role': 'user', 'content': a}]) for a in asks], PLAIN_STOPS, [
        be.tok.eot_id]
  ids = [be.crop(be.tok.encode(t), 1)[0] for t in texts]
  replies = complete(be, ids, max_new, SampleParams(temperature=0.0), stop=stop, stop_ids=stop_ids)
  fns = [code_eval.extract_function(r) for r in replies]
  if execute:
    results = [code_eval.run_tests(f, t, timeout) for f, (_, t) in zip(fns, code_eval.EXEC)]
  else:
    results = [{'status': 'skipped'} for _ in fns]
  out = {'template': 'chat' if be.instruction_tuned else 'plain',
         'details': [{'instruction': a, 'reply': r, 'function': f, **res}
                     for a, r, f, res in zip(asks, replies, fns, results)]}
  if execute:
    out['pass_rate'] = code_eval.mean([r['status'] == 'pass' for r in results])
  return out


def chat_suite(be: Backend, max_new: int = 128, timeout: float = 3.0, execute: bool = True,
               held: tuple[str, list[list[dict]]] | None = None) -> dict:
  """`held`: (name, conversations) to score; default held_out of this model's own run config."""
  name, convs = held or held_out(be.meta.get('config'))
  return {'assistant': {'data': name, **assistant_perplexity(be, convs)},
          'execution': instruction_execution(be, max_new, timeout, execute)}
