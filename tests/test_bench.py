"""minillm_jax.bench end to end on a tiny model: every section present with positive numbers, the markdown
written, and --update_md rewriting only this device's section."""
import json
import os

import pytest
from conftest import run_module

from minillm_jax import bench
from minillm_jax.evals import bench_report

TEXT = ''.join(f'{w} the quick brown fox {i % 7} jumps over the lazy dog number {i % 13}.\n'
               for i, w in enumerate(['alpha', 'beta', 'gamma', 'delta', 'omega'] * 200))
OTHER = '<!-- bench:gpu:start -->\nkeep this GPU table\n<!-- bench:gpu:end -->'


def tiny_args(tmp) -> list[str]:
  """A one-layer model on a small local char corpus: the whole bench in seconds."""
  corpus = os.path.join(tmp, 'corpus.txt')
  with open(corpus, 'w') as f:
    f.write(TEXT)
  over = {'data.corpus': 'local', 'data.path': corpus, 'data.cache_dir': os.path.join(tmp, 'cache'),
          'model.n_layer': 1, 'model.n_head': 2, 'model.d_model': 32, 'model.block_size': 32,
          'train.batch_size': 4}
  return ['--config=configs/shakespeare_char.py', *[f'--config.{k}={v}' for k, v in over.items()],
          f'--out={os.path.join(tmp, "out")}', '--repeats=1', '--prompt_len=8', '--decode_batch=1,2']


def positive(d: dict, *keys: str):
  for k in keys:
    assert d[k] > 0, (k, d[k])


def check(tmp, variants: set[str]) -> dict:
  with open(os.path.join(tmp, 'out', 'bench.json')) as f:
    res = json.load(f)
  assert {'env', 'settings', 'runs'} <= set(res)
  assert res['env']['jax'] and res['env']['torch'] and res['env']['git_commit'] and res['env']['cpu_model']
  (run,) = res['runs']
  t, d, data = run['train'], run['decode'], run['data']
  assert all(v > 0 for v in [*t['matmul_flops'].values(), *t['peak_flops'].values()])
  assert set(t['variants']) == variants and not t['errors']
  for v in t['variants'].values():
    positive(v, 'ms', 'tokens_per_s', 'flops_per_s', 'mfu', 'first_call_s')
    assert v['step_peak_mb'] is None or v['step_peak_mb'] >= 0
  # the same weights and batch everywhere: the step-0 losses agree
  losses = [v['loss_step0'] for v in t['variants'].values()]
  assert max(losses) - min(losses) < 0.05, losses
  assert all(r > 0 for s in t['speedup'].values() for r in s.values())
  V = t['variants']  # best: the fastest repeat (on a shared host noise only adds time)
  assert all(v['best_ms'] == pytest.approx(min(v['samples_ms'])) and v['best_ms'] <= v['ms'] for v in V.values())
  assert all(r == pytest.approx(V[o]['best_ms'] / V[j]['best_ms']) for j, s in t['speedup_best'].items()
             for o, r in s.items()) and set(t['speedup_best']) == set(t['speedup'])
  assert set(d['impls']) == {'jax', 'jax_bf16w', 'torch', 'hf'}
  positive(d, 'read_bytes_per_s')
  for k, impl in d['impls'].items():
    for b in ('1', '2'):
      positive(impl[b], 'decode_tokens_per_s', 'ttft_ms', 'end_to_end_tokens_per_s', 'mbu', 'floor_ms')
      assert impl[b]['floor_ms'] == pytest.approx(1e3 * impl[b]['step_bytes'] / d['read_bytes_per_s'])
      assert impl[b]['mbu'] == pytest.approx(impl[b]['floor_ms'] / impl[b]['ms_per_token'])
    # bfloat16 weights: the matrices at 2 bytes, the rest as float32
    assert (impl['1']['step_bytes'] < d['impls']['jax']['1']['step_bytes']) == (k == 'jax_bf16w')
    assert impl['2']['step_bytes'] > impl['1']['step_bytes']
  assert d['greedy_agree_tokens']['torch'] > 0 and d['greedy_agree_tokens']['hf'] > 0
  assert 0 <= d['greedy_agree_tokens']['jax_bf16w'] <= d['new_tokens']
  for key in ('speedup', 'speedup_jax_bf16w'):
    assert set(d[key]) == {'torch', 'hf'} and all(r > 0 for s in d[key].values() for r in s.values())
  positive(data, 'batches_per_s', 'tokens_per_s', 'headroom_vs_train')
  with open(os.path.join(tmp, 'out', 'bench.md')) as f:
    md = f.read()
  assert '| variant | ms/step | best |' in md and 'median (best)' in md
  assert '| decode |' in md and 'Data pipeline' in md
  runs = {(r['tokenizer'], r['gb']) for r in res['data']['prepare']['runs']}
  assert runs == {('char', 0.002), ('bpe', 0.002)}
  assert all(r['peak_rss_mb'] > 0 and r['tokens'] > 0 and r['ceiling']['mb_per_s'] > 0
             for r in res['data']['prepare']['runs'])
  assert set(res['data']['pipeline']) == {'tiny', 'llm200m'}
  assert all(p['batches_per_s'] > 0 and p['headroom'] > 0 for p in res['data']['pipeline'].values())
  assert '### Data: prepare and pipeline' in md and '| tiny | 8 x 1024 |' in md
  assert '| JAX, bfloat16 weights |' in md and '| JAX bfloat16 weights speedup vs transformers' in md
  assert '| floor, float32 weights |' in md and 'MBU' in md and 'no float32 decoder here beats' in md
  return res


def test_quick_smoke(tmp_path):
  tmp = str(tmp_path)
  md = os.path.join(tmp, 'B.md')
  with open(md, 'w') as f:
    f.write(f'# Benchmarks\n\nintro stays\n\n## CPU\n\n<!-- bench:cpu:start -->\nold\n<!-- bench:cpu:end -->\n\n'
            f'## GPU\n\n{OTHER}\n')
  p = run_module('minillm_jax.bench', *tiny_args(tmp), '--quick', '--update_md', f'--md={md}', timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = check(tmp, {'jax_float32', 'jax_float32_dp', 'jax_bfloat16', 'jax_bfloat16_dp', 'torch_eager_fp32'})
  t = res['runs'][0]['train']['variants']  # (--quick: no torch.compile)
  assert [t[v]['compute_dtype'] for v in ('jax_float32_dp', 'jax_bfloat16', 'jax_bfloat16_dp')] == [
      'float32', 'bfloat16', 'bfloat16']  # MFU against the bfloat16 peak
  cores = min(len(os.sched_getaffinity(0)), 8)
  assert t['jax_float32']['devices'] == 1  # and _dp: batch 4 over the most CPU devices (one per core) dividing it
  assert t['jax_float32_dp']['devices'] == max(d for d in range(1, cores + 1) if 4 % d == 0)
  with open(md) as f:
    text = f.read()
  assert 'intro stays' in text and OTHER in text and '\nold\n' not in text and '| variant | ms/step' in text


def test_update_md_appends_a_missing_section(tmp_path):
  md = tmp_path / 'B.md'
  md.write_text('# Benchmarks\n')
  bench_report.update_md(md, 'gpu', 'table one')
  bench_report.update_md(md, 'gpu', 'table two')
  text = md.read_text()
  assert text.count('## GPU') == 1 and 'table two' in text and 'table one' not in text


def test_bad_variant_is_one_line(tmp_path):
  p = run_module('minillm_jax.bench', '--config=configs/shakespeare_char.py', '--variants=jax_fp8', timeout=120)
  assert p.returncode == 2 and 'unknown --variants' in p.stderr and 'Traceback' not in p.stderr
  for bad in ('--decode_batch=0', '--decode_batch=1,x', '--new_tokens=0'):
    p = run_module('minillm_jax.bench', '--config=configs/shakespeare_char.py', '--what=decode', bad, timeout=120)
    assert p.returncode == 2 and 'must be positive integers' in p.stderr and 'Traceback' not in p.stderr, bad
  p = run_module('minillm_jax.bench', '--what=memory', '--batch=-3', timeout=120)  # before any process starts
  assert p.returncode == 2 and p.stderr.strip().splitlines() == [
      'error: --batch=-3 --steps=0 --repeats=0: use 0 (the default) or a positive count'], p.stderr


@pytest.mark.slow
def test_full_with_torch_compile(tmp_path):
  """Every variant, torch.compile included (a failing compile would be recorded as an error, not raised)."""
  tmp = str(tmp_path)
  p = run_module('minillm_jax.bench', *tiny_args(tmp), '--steps=2', timeout=1200)
  assert p.returncode == 0, p.stderr[-3000:]
  check(tmp, set(bench.TRAIN_VARIANTS))


def test_serve_quick_smoke(tmp_path):
  """--what=serve: both servers start, every level has tokens and TTFTs, the table is written."""
  tmp = str(tmp_path)
  p = run_module('minillm_jax.bench', *tiny_args(tmp), '--what=serve', '--quick', '--serve_clients=1,2',
                 '--new_tokens=6', timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  with open(os.path.join(tmp, 'out', 'bench.json')) as f:
    s = json.load(f)['runs'][0]['serve']
  assert set(s['servers']) == {'batched', 'one_at_a_time'} and s['levels'] == [1, 2] and s['max_batch'] == 2
  for srv in s['servers'].values():
    for c in ('1', '2'):
      assert srv[c]['requests'] == int(c) and 0 < srv[c]['tokens'] <= 6 * int(c), srv[c]
      positive(srv[c], 'tokens_per_s', 'ttft_p50_ms', 'ttft_p99_ms')
  assert s['scheduler']['one_at_a_time']['max_rows_in_batch'] == 1 and s['speedup_top'] > 0
  with open(os.path.join(tmp, 'out', 'bench.md')) as f:
    md = f.read()
  assert '| clients | batched tokens/s |' in md and 'batching gives' in md
