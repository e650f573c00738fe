"""The evaluation suites on any backend (perplexity and bits per byte, the code suite, text samples), and the
comparison table and plot of several runs. `python -m minillm_jax.evaluate` is their command line."""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Iterable

import numpy as np

from minillm_jax import config as config_lib
from minillm_jax.config import UserError
from minillm_jax.data import encode
from minillm_jax.data.template import render_template
from minillm_jax.evals import chat_eval, code_eval
from minillm_jax.evals.figures import save_figure
from minillm_jax.inference import text
from minillm_jax.inference.backend import Backend

SUITES = ('ppl', 'code', 'text', 'chat')
DEFAULT_SUITES = ('ppl', 'code', 'text')  # + chat when a run was fine-tuned on chat data (evaluate decides)
TEXT_PROMPTS = ('Once upon a time', 'To be or not to be', 'The meaning of life is', 'In the beginning',
                'She opened the door and')


# --------------------------------------------------------------------------------------------------- text

def distinct_n(texts: list[str], n: int) -> float:
  """Unique word n-grams / all word n-grams over the samples (Li et al. 2016)."""
  grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
  return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(text: str, n: int = 4) -> float:
  """Share of the word n-grams of a text that already occurred earlier in it (0 = no loops)."""
  w, seen, rep = text.split(), set(), 0
  grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
  for g in grams:
    rep += g in seen
    seen.add(g)
  return rep / len(grams) if grams else 0.0


def text_suite(be: Backend, max_new: int = 128, seed: int = 0) -> dict:
  sp, _, _ = text.config_sampling(be)
  ids = [be.crop(be.tok.encode(p), 1)[0] for p in TEXT_PROMPTS]
  outs = text.complete(be, ids, max_new, sp, seed)
  return {'samples': [{'prompt': p, 'text': o} for p, o in zip(TEXT_PROMPTS, outs)],
          'distinct_1': distinct_n(outs, 1), 'distinct_2': distinct_n(outs, 2),
          'repetition_rate': code_eval.mean([repetition_rate(o) for o in outs]),
          'sampling': {**dataclasses.asdict(sp), 'seed': seed, 'max_new_tokens': max_new}}


# ------------------------------------------------------------------------------------------- perplexity

def val_tokens(be: Backend, limit: int | None = None) -> tuple[list[int], list[int]]:
  """The run's validation split, rebuilt from its config as prepare builds it (each document + end-of-text),
  read only as far as `limit` tokens (a corpus of many GB is hashed in one streaming pass, never held)."""
  plain = be.meta.get('config')
  if not plain:
    raise UserError(f'{be.source} carries no run config, so its validation split is unknown; pass --text=FILE')
  cfg = config_lib.from_plain(plain)
  if cfg.data.format == 'chat':  # the held-out conversations as the template renders them (every token counts)
    val = [render_template(c, add_generation_prompt=False) for c in chat_eval.held_out(plain)[1]]
  else:
    val = encode.val_docs(cfg)
  return tokens_and_bytes(be.tok, val, eot=True, limit=limit)


def tokens_and_bytes(tok, docs: Iterable[str], eot: bool = False, limit: int | None = None
                     ) -> tuple[list[int], list[int]]:
  """Token ids of the documents (each followed by end-of-text when `eot`, 0 bytes) and the UTF-8 bytes of the
  original text each token ends (from the tokenizer's offsets; every byte counted once). Decoding the tokens
  instead would count '<|unk|>' or a U+FFFD for what the text held. Stops after the first `limit` tokens."""
  limit = limit or float('inf')
  ids, nbytes = [], []
  docs = iter(docs)
  while group := list(itertools.islice(docs, 256)):  # in batches: a long split is read only as far as it is used
    for doc, (doc_ids, spans) in zip(group, tok.encode_batch_offsets(group)):
      end = 0
      for i, (_, b) in zip(doc_ids, spans):
        if len(ids) == limit:
          return ids, nbytes
        ids.append(i)
        nbytes.append(len(doc[end:b].encode('utf-8')) if b > end else 0)
        end = max(end, b)
      if nbytes and end < len(doc):  # text no token covers (a normalizer dropped it) goes to the last token
        nbytes[-1] += len(doc[end:].encode('utf-8'))
      if eot and len(ids) < limit:
        ids.append(tok.eot_id)
        nbytes.append(0)
  return ids, nbytes


def perplexity(be: Backend, tokens: tuple[list[int], list[int]], max_tokens: int = 16384, batch: int = 8) -> dict:
  """Mean NLL over windows of context + 1 tokens with stride context (every token but the first is predicted
  once, with up to a full context before it); bits per byte divide the total NLL by the UTF-8 bytes of the
  predicted text (`tokens` = tokens_and_bytes(...)), which makes tokenizers comparable."""
  T = be.context
  tokens, nb = tokens
  tokens = list(tokens)[:max_tokens + 1]
  if len(tokens) < 2:
    raise UserError('perplexity needs at least 2 tokens of text')
  wins = [tokens[i:i + T + 1] for i in range(0, len(tokens) - 1, T)]
  total, count = 0.0, 0
  for b in range(0, len(wins), batch):
    group = wins[b:b + batch]
    x = np.zeros((batch, T + 1), np.int32)  # fixed shape: one compile whatever the text length
    for i, w in enumerate(group):
      x[i, :len(w)] = w
    nll = be.nll(x)
    for i, w in enumerate(group):
      total += float(nll[i, :len(w) - 1].sum())
      count += len(w) - 1
  nbytes = sum(nb[1:len(tokens)])
  mean = total / count
  return {'tokens': count, 'bytes': nbytes, 'nll': mean, 'perplexity': math.exp(min(mean, 700.0)),
          'bits_per_byte': total / math.log(2) / max(nbytes, 1), 'window': T}


# ------------------------------------------------------------------------------------------------ runner

def evaluate(be: Backend, suites=DEFAULT_SUITES, text_path: str | None = None, max_tokens: int = 16384,
             max_new: int = 128, timeout: float = 3.0, seed: int = 0, execute: bool = True, held=None) -> dict:
  """The suites' results for one model. `held`: the chat suite's held-out conversations (chat_eval.held_out)."""
  out = {'name': run_name(be), 'source': be.source, 'step': be.step, 'backend': be.name, 'weights': be.weights,
         'context': be.context, 'instruction_tuned': be.instruction_tuned}
  if 'ppl' in suites:
    if text_path:
      try:
        with open(text_path, 'rb') as f:
          text = f.read().decode('utf-8', errors='replace')
      except OSError as e:
        raise UserError(f'cannot read --text {text_path!r}: {e.strerror}') from None
      text = text[:64 * (max_tokens + 1)]  # more characters than any tokenizer packs into max_tokens tokens
      out['perplexity'] = {'data': text_path,
                           **perplexity(be, tokens_and_bytes(be.tok, [text], limit=max_tokens + 1), max_tokens)}
    else:
      out['perplexity'] = {'data': 'val', **perplexity(be, val_tokens(be, max_tokens + 1), max_tokens)}
  if 'code' in suites:
    out['code'] = code_eval.code_suite(be, max_new, timeout, execute)
  if 'text' in suites:
    out['text'] = text_suite(be, max_new, seed)
  if 'chat' in suites:
    out['chat'] = chat_eval.chat_suite(be, max_new, timeout, execute, held)
  return out


def run_name(be: Backend) -> str:
  name = os.path.basename(os.path.normpath(be.source)) or be.source
  return f'{name}@{be.step}' if be.step is not None else name


def table(runs: list[dict]) -> str:
  cols = [('run', lambda r: r['name'])]
  if any('perplexity' in r for r in runs):
    cols += [('ppl', lambda r: f'{r["perplexity"]["perplexity"]:.3f}'),
             ('bpb', lambda r: f'{r["perplexity"]["bits_per_byte"]:.4f}')]
  if any('code' in r for r in runs):
    cols += [('code', lambda r: f'{r["code"]["overall"]:.3f}')]
    cols += [(c.split('_')[0][:8], lambda r, c=c: f'{r["code"]["categories"][c]:.2f}') for c in code_eval.CODE_CATEGORIES]
  if any('chat' in r for r in runs):
    cols += [('asst-ppl', lambda r: f'{r["chat"]["assistant"]["perplexity"]:.3f}'),
             ('chat-exec', lambda r: f'{r["chat"]["execution"]["pass_rate"]:.2f}')]
  if any('text' in r for r in runs):
    cols += [('dist-1', lambda r: f'{r["text"]["distinct_1"]:.3f}'), ('dist-2', lambda r: f'{r["text"]["distinct_2"]:.3f}'),
             ('rep', lambda r: f'{r["text"]["repetition_rate"]:.3f}')]
  rows = [[h for h, _ in cols]] + [[_cell(fn, r) for _, fn in cols] for r in runs]
  w = [max(len(row[i]) for row in rows) for i in range(len(cols))]
  return '\n'.join('  '.join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in rows)


def _value(fn, r) -> float:
  try:
    return float(fn(r))
  except KeyError:
    return float('nan')


def _cell(fn, r) -> str:
  try:
    return fn(r)
  except KeyError:
    return '-'


def plot(runs: list[dict], path: str) -> str:
  """PNG: perplexities per run (left: validation text, held-out assistant replies) and code scores per category,
  overall and instruction execution per run (right)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  panels = [p for p, k in (('perplexity', ('perplexity', 'chat')), ('code', ('code', 'chat')))
            if any(x in r for r in runs for x in k)]
  if not panels:
    raise UserError('nothing to plot: run the ppl, code or chat suite')
  fig, axes = plt.subplots(1, len(panels), figsize=(6 + 4 * (len(panels) - 1), 4.5), squeeze=False)
  colors = plt.cm.tab10(np.arange(len(runs)) % 10)
  for ax, p in zip(axes[0], panels):
    if p == 'perplexity':  # the validation text, and (chat suite) the held-out replies
      groups = [('val text', lambda r: r['perplexity']['perplexity']),
                ('assistant tokens', lambda r: r['chat']['assistant']['perplexity'])]
      ylabel, title = 'perplexity (lower is better)', 'perplexity'
    else:
      groups = [(k, lambda r, k=k: r['code']['categories'][k]) for k in code_eval.CODE_CATEGORIES]
      groups += [('overall', lambda r: r['code']['overall']),
                 ('chat execution', lambda r: r['chat']['execution']['pass_rate'])]
      ylabel, title = 'score (higher is better)', 'code'
    groups = [(g, fn) for g, fn in groups if any(not math.isnan(_value(fn, r)) for r in runs)]
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
      bars = ax.bar(np.arange(len(groups)) + (i - (len(runs) - 1) / 2) * width, [_value(fn, r) for _, fn in groups],
                    width, label=r['name'], color=colors[i])
      if p == 'perplexity':
        ax.bar_label(bars, fmt='%.2f', fontsize=7)
    ax.set_xticks(range(len(groups)), [g for g, _ in groups], rotation=35 if p == 'code' else 0,
                  ha='right' if p == 'code' else 'center', fontsize=8)
    if p == 'code':
      ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return save_figure(fig, path, 'plot')
