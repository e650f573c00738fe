"""`bench --what=data`: the token cache's preparation and the data pipeline, against their ceilings.

- prepare throughput (MB/s of text, tokens/s) on a synthetic corpus, beside HF tokenizers' own `encode_batch` on
  the same text held in memory (the ceiling for BPE; the char tokenizer's table lookup goes past it);
- the peak RSS of preparing a synthetic text file of each size in --data_gb (one fresh process each), char and
  BPE: streaming keeps it flat whatever the size;
- the Grain pipeline's batches/s for the `tiny` and `llm200m` shapes, against what a train step consumes: the
  JAX step measured here for `tiny`, and for `llm200m` the rate of an H100 at 50% MFU (computed from its
  datasheet peak: this machine's CPU takes minutes per llm200m step, so it is no measure of the need).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from minillm_jax import config as config_lib
from minillm_jax.data import pipeline, prepare

# One fresh process per measurement. Peak RSS is read from /proc/self/status (VmHWM): getrusage's ru_maxrss
# keeps the parent's high-water mark across fork and exec.
_HWM = "max([int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('VmHWM')] or [0]) / 1024"
_CHILD = r'''
import json, sys, time
from minillm_jax import config as config_lib
from minillm_jax.data import prepare
c = config_lib.default_config()
c.data.update(corpus='local', path=sys.argv[1], cache_dir=sys.argv[2], tokenizer=sys.argv[3], vocab_size=8000)
t0 = time.time()
p = prepare.prepare(config_lib.validate(c))
print(json.dumps({'seconds': time.time() - t0, 'tokenize_seconds': p.manifest['tokenize_seconds'],
                  'tokens': p.n_train + p.n_val, 'chars': p.manifest['train_chars'] + p.manifest['val_chars'],
                  'peak_rss_mb': HWM}))
'''.replace('HWM', _HWM)
_CEILING = r'''
import json, sys, time
from minillm_jax.data import stream
from minillm_jax.data import tokenizer as toklib
tok = toklib.Tok.from_file(sys.argv[1])
with open(sys.argv[2], encoding='utf-8') as f:
  text = f.read(int(sys.argv[3]))
pieces = [p for p, _ in stream.doc_pieces(text)]
t0 = time.perf_counter()
n = sum(len(e.ids) for e in tok.tok.encode_batch_fast(pieces, add_special_tokens=False))
s = time.perf_counter() - t0
print(json.dumps({'mb_per_s': len(text.encode()) / 1e6 / s, 'tokens_per_s': n / s, 'chars': len(text)}))
'''


def synthetic_text(path: Path, n_bytes: int, seed: int = 0) -> Path:
  """English-like text: Zipf-distributed words of a 30,000-word vocabulary, lines of 8-16 words, a blank line
  every 20 lines. Written in 64 MB blocks, so making it needs little memory."""
  rng = np.random.default_rng(seed)
  letters = np.array(list('etaoinshrdlcumwfgypbvkjxqz'))
  p = 1 / np.arange(1, 27)
  vocab = [''.join(rng.choice(letters, rng.integers(1, 10), p=p / p.sum())) for _ in range(30_000)]
  ranks = 1 / np.arange(1, len(vocab) + 1)
  ranks /= ranks.sum()
  with open(path, 'w', encoding='utf-8') as f:
    written = 0
    while written < n_bytes:
      ids = rng.choice(len(vocab), size=1 << 20, p=ranks)
      cuts = np.cumsum(rng.integers(8, 17, size=1 << 17))
      lines = [' '.join(vocab[i] for i in ids[a:b]) for a, b in zip(np.r_[0, cuts[:-1]], cuts) if b <= len(ids)]
      block = '\n'.join(ln + ('\n' if k % 20 == 19 else '') for k, ln in enumerate(lines)) + '\n'
      block = block[:n_bytes - written]
      f.write(block)
      written += len(block)
  return path


def _child(code: str, *args) -> dict:
  r = subprocess.run([sys.executable, '-c', code, *map(str, args)], capture_output=True, text=True, check=False)
  if r.returncode:
    raise RuntimeError(f'bench child failed: {r.stderr[-2000:]}')
  return json.loads(r.stdout.strip().splitlines()[-1])


def prepare_bench(sizes_gb: list[float], tokenizers: list[str], work: str | None = None) -> dict:
  out = {'sizes_gb': sizes_gb, 'runs': []}
  with tempfile.TemporaryDirectory(prefix='minillm-bench-data-', dir=work) as tmp:
    for gb in sizes_gb:
      text = synthetic_text(Path(tmp) / f'synthetic_{gb:g}gb.txt', int(gb * 1e9))
      for tk in tokenizers:
        cache = Path(tmp) / f'cache-{tk}-{gb:g}'
        r = _child(_CHILD, text, cache, tk)
        mb = text.stat().st_size / 1e6
        r.update(tokenizer=tk, gb=gb, mb_per_s=mb / r['seconds'], tokenize_mb_per_s=mb / r['tokenize_seconds'],
                 tokens_per_s=r['tokens'] / r['tokenize_seconds'])
        if gb == sizes_gb[0]:  # the ceiling: HF's encode_batch on the first 20 MB of the same text, in memory
          r['ceiling'] = _child(_CEILING, next(cache.glob('*/tokenizer.json')), text, 20_000_000)
          r['vs_ceiling'] = r['tokenize_mb_per_s'] / r['ceiling']['mb_per_s']
        out['runs'].append(r)
        print(f'    prepare {gb:g} GB {tk}: {r["mb_per_s"]:.1f} MB/s end to end, {r["tokenize_mb_per_s"]:.1f} MB/s '
              f'encoding, peak RSS {r["peak_rss_mb"]:.0f} MB', flush=True)
        for p in cache.glob('*/*.bin'):
          p.unlink()
      text.unlink()
  return out


# An H100 SXM's dense bf16 peak (NVIDIA's datasheet), the reference consumer of the llm200m shape.
H100_BF16_FLOPS = 989e12


def step_tokens_per_s_at(mc: config_lib.ModelConfig, mfu: float, peak: float) -> float:
  from minillm_jax.model import param_counts
  n = param_counts(mc)['total']
  attn = 12 * mc.n_layer * mc.d_model * mc.block_size  # 6 * 2 * L * d * T per token for QK^T and AV
  return mfu * peak / (6 * n + attn)


def pipeline_bench(shapes: dict[str, tuple[object, int, int]], need: dict[str, float], n_batches: int) -> dict:
  """shapes: name -> (Prepared, batch, block); need: name -> batches/s a train step consumes."""
  out = {}
  for name, (prep, B, T) in shapes.items():
    xs = [pipeline.measure_throughput(prep, B, T, 0, n_batches) for _ in range(3)]
    bps = float(np.median(xs))
    out[name] = {'batch': B, 'block': T, 'batches_per_s': bps, 'tokens_per_s': bps * B * T,
                 'need_batches_per_s': need[name], 'headroom': bps / need[name]}
    print(f'    pipeline {name} ({B} x {T}): {bps:,.0f} batches/s, {out[name]["headroom"]:,.0f}x the step\'s need',
          flush=True)
  return out


def run(sizes_gb: list[float], runs: list[dict], root: Path, prep: prepare.Prepared, n_batches: int = 200) -> dict:
  """The whole section: prepare at each size (char and BPE), then the pipeline for the tiny and llm200m shapes
  (batches drawn from `prep`, the first benched config's token cache: the pipeline's cost does not depend on the
  tokens; the need: an H100 at 50% MFU, and the fastest JAX step measured in this run where the train section
  ran for that preset)."""
  out = {'prepare': prepare_bench(sizes_gb, ['char', 'bpe'])}
  shapes, need, measured = {}, {}, {}
  for name in ('tiny', 'llm200m'):
    cfg = config_lib.preset_beside(str(root / 'configs' / 'x.py'), name)
    mc = config_lib.model_config(cfg, cfg.model.vocab_size)
    B = cfg.train.batch_size // cfg.optim.accum_steps  # the micro-batch one step call consumes per pass
    shapes[name] = (prep, B, mc.block_size)
    need[name] = step_tokens_per_s_at(mc, 0.5, H100_BF16_FLOPS) / (B * mc.block_size)
    for r in runs:
      jx = [v['steps_per_s'] for k, v in ((r.get('train') or {}).get('variants') or {}).items() if k.startswith('jax')]
      if Path(r['config']).stem == name and jx and not r['overrides']:
        measured[name] = max(jx) * cfg.optim.accum_steps
  out['pipeline'] = pipeline_bench(shapes, need, n_batches)
  for name, m in measured.items():
    out['pipeline'][name]['measured_step_batches_per_s'] = m
    out['pipeline'][name]['headroom_vs_measured'] = out['pipeline'][name]['batches_per_s'] / m
  return out


def _f(v, fmt: str) -> str:
  return '-' if v is None else format(v, fmt)


def markdown(d: dict) -> list[str]:
  L = ['', '### Data: prepare and pipeline', '',
       ('| text | tokenizer | prepare MB/s (end to end) | encode MB/s | encode tokens/s | HF encode_batch MB/s '
        '(ceiling) | encode vs ceiling | peak RSS MB |'), '|---|---|---|---|---|---|---|---|']
  for r in d['prepare']['runs']:
    c = r.get('ceiling') or {}
    L.append(f'| {r["gb"]:g} GB | {r["tokenizer"]} | {r["mb_per_s"]:.1f} | {r["tokenize_mb_per_s"]:.1f} | '
             f'{r["tokens_per_s"] / 1e6:.2f}M | {_f(c.get("mb_per_s"), ".1f")} | {_f(r.get("vs_ceiling"), ".2f")}x | '
             f'{r["peak_rss_mb"]:,.0f} |')
  L += ['', ('| shape | batch x block | pipeline batches/s | tokens/s | an H100 at 50% MFU needs (batches/s) | '
             'headroom | JAX step measured here (batches/s) | headroom |'), '|---|---|---|---|---|---|---|---|']
  for name, p in d['pipeline'].items():
    L.append(f'| {name} | {p["batch"]} x {p["block"]} | {p["batches_per_s"]:,.0f} | {p["tokens_per_s"] / 1e6:.1f}M | '
             f'{p["need_batches_per_s"]:,.1f} | {p["headroom"]:,.1f}x | '
             f'{_f(p.get("measured_step_batches_per_s"), ".2f")} | {_f(p.get("headroom_vs_measured"), ",.0f")}x |')
  return L
