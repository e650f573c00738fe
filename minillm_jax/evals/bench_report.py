"""What a benchmark run reports: the environment it ran in, and its results as markdown tables (bench.md and
the device's section of BENCHMARKS.md)."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import flax
import jax

from minillm_jax import parallel

ROOT = Path(__file__).resolve().parents[2]  # the repository


def environment() -> dict:
  import torch  # bench compares against torch and transformers: both are installed where it runs
  import transformers
  txt = Path('/proc/cpuinfo').read_text() if os.path.exists('/proc/cpuinfo') else ''
  cpu = re.search(r'(?:model name|Hardware)\s*:\s*(.*)', txt)
  fl = parallel.cpu_flags()
  git = lambda *a: subprocess.run(['git', *a], cwd=ROOT, capture_output=True, text=True,
                                  check=False).stdout.strip()
  dev = jax.devices()[0]
  return {'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
          'git_commit': git('rev-parse', 'HEAD'),
          'git_modified': git('status', '--porcelain', '-uno').splitlines(),
          'python': platform.python_version(), 'jax': jax.__version__, 'flax': flax.__version__,
          'torch': torch.__version__, 'transformers': transformers.__version__, 'jax_platform': dev.platform,
          'device_kind': dev.device_kind, 'device_count': jax.device_count(),
          'cpu_model': cpu.group(1).strip() if cpu else platform.processor(),
          'cpu_flags': sorted(fl & {'avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16', 'amx_tile'}),
          'cores': parallel.host_cores(), 'torch_threads': torch.get_num_threads(),
          'torch_device': 'cuda' if torch.cuda.is_available() else 'cpu', 'loadavg_start': os.getloadavg()}


def _table(head: list[str], rows: list[list]) -> list[str]:
  return ['', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)] + [
      '| ' + ' | '.join(map(str, r)) + ' |' for r in rows]


def _train_md(t: dict) -> list[str]:
  st = sorted({k for v, k in t['steps'].items() if not v.startswith('matmul')}) or [0]
  g = lambda k: f'{t["matmul_flops"][k] / 1e9:,.0f}'
  worst = max((d['spread'] for d in t['variants'].values()), default=0)
  L = ['', (f'Train step, batch {t["batch"][0]} x {t["batch"][1]} tokens, {t["flops_per_token"] / 1e6:.1f} '
            f'MFLOP/token; median of {t["repeats"]} interleaved repeats of {st[0]}-{st[-1]} steps; load '
            f'average {t["loadavg"][0]:.1f} -> {t["loadavg"][1]:.1f}, largest spread {100 * worst:.0f}%. '
            f'Matmul peak timed in the same rounds ({t["matmul_n"]}^3, GFLOP/s): float32 JAX '
            f'{g("jax_float32")}, torch {g("torch_float32")}; bfloat16 JAX {g("jax_bfloat16")}, torch '
            f'{g("torch_bfloat16")}; MFU is against the faster one for the compute dtype. Step peak MB: '
            f'{t["memory_method"]}.')]
  rows = []
  for v, d in t['variants'].items():
    pm = '-' if d['step_peak_mb'] is None else f'{d["step_peak_mb"]:,.0f}'
    pm += f' (XLA {d["xla_step_mb"]:,.0f})' if 'xla_step_mb' in d else ''
    name = f'{v} ({d["devices"]} dev, {d["steps_per_call"]} steps/call)' if d.get('devices', 1) > 1 else v
    rows.append([name, f'{d["ms"]:,.1f}', f'{d["best_ms"]:,.1f}' if 'best_ms' in d else '-',
                 f'{100 * d["spread"]:.0f}%', f'{d["tokens_per_s"]:,.0f}',
                 '-' if 'eager' in v else f'{d["compile_s"]:.1f}', f'{d["flops_per_s"] / 1e9:,.1f}',
                 f'{100 * d["mfu"]:.1f}%', pm,
                 f'{d["loss_step0"]:.4f}'])
  rows += [[v, f'failed: {err}'] + [''] * 8 for v, err in t['errors'].items()]
  L += _table(['variant', 'ms/step', 'best', 'spread', 'tokens/s', 'compile s', 'GFLOP/s', 'MFU', 'step peak MB',
               'loss at step 0'], rows)
  disp = ', '.join(f'{v} {d["dispatch_ms"]:.2f} ms' for v, d in t['variants'].items() if 'dispatch_ms' in d)
  L += ['', (f'Host time per JAX step in the call (Python, pytree flattening, launch; with several devices '
             f'the launch waits for the previous call): {disp}.')] if disp else []
  tv = [v for v in t['variants'] if v.startswith('torch')]
  if t['speedup'] and tv:
    best = t.get('speedup_best', {})
    cell = lambda j, v: f'{t["speedup"][j][v]:.2f}x' + (f' ({best[j][v]:.2f}x)' if j in best else '')
    L += _table([f'JAX speedup = torch ms / JAX ms{", median (best)" if best else ""}', *tv],
                [[j, *(cell(j, v) for v in tv)] for j in t['speedup']])
  return L


def _decode_md(d: dict) -> list[str]:
  bs, ag = list(next(iter(d['impls'].values()))), d.get('greedy_agree_tokens', {})
  names = {'jax': 'JAX sample.measure_decode', 'jax_bf16w': 'JAX, bfloat16 weights', 'torch': 'torch mirror generate',
           'hf': f'transformers {d["hf_class"]}'}
  same = ', '.join(f'{names[o]} {n} of {d["new_tokens"]}' for o, n in ag.items()) or '-'
  worst = max(v[b]['spread'] for v in d['impls'].values() for b in bs)
  L = ['', (f'Decode, greedy, prompt {d["prompt_len"]} + {d["new_tokens"]} new tokens, KV cache of '
            f'{d["context"]}; median of {len(next(iter(d["samples_s"].values())))} interleaved repeats, '
            f'largest spread {100 * worst:.0f}%. tokens/s: batch x (new - 1) / the decode time after the '
            'first token; TTFT: prefill + first token; e2e: batch x new / total time. Greedy tokens equal to '
            f'float32 JAX\'s at batch 1 (random weights: near-tied logits): {same}.')]
  if 'read_bytes_per_s' in d:  # (absent from results written before it was measured)
    f32 = d['impls'].get('hf', d['impls'].get('torch', {})).get(bs[0], {})
    L[-1] += (f' MBU: the bytes a step must read (every matrix once, the norms, the KV cache at its mean '
              f'length: {f32.get("step_bytes", 0) / 1e6:,.1f} MB at B={bs[0]} in float32) per step time, over '
              f'the read bandwidth timed in the same rounds ({d["read_bytes_per_s"] / 1e9:,.1f} GB/s, a sum '
              f'over a buffer of that size); *floor* is that read alone')
    if 'hf' in d['impls'] and f32:
      L[-1] += (f', so no float32 decoder here beats {names["hf"]} by more than '
                f'{f32["ms_per_token"] / f32["floor_ms"]:.2f}x at B={bs[0]}')
    L[-1] += '.'
  mbu = lambda v: f'{100 * v["mbu"]:.0f}%' if 'mbu' in v else '-'
  rows = [[names[k], *(x for b in bs for x in (
      f'{v[b]["decode_tokens_per_s"]:,.1f}', f'{v[b]["ttft_ms"]:,.1f}', f'{v[b]["ms_per_token"]:,.2f}',
      mbu(v[b]), f'{v[b]["end_to_end_tokens_per_s"]:,.1f}'))] for k, v in d['impls'].items()]
  floors = {'float32 weights': d['impls'].get('jax'), 'bfloat16 weights': d['impls'].get('jax_bf16w')}
  rows += [[f'floor, {w}', *(x for b in bs for x in (f'{int(b) * 1e3 / v[b]["floor_ms"]:,.1f}', '',
                                                      f'{v[b]["floor_ms"]:,.2f}', '100%', ''))]
           for w, v in floors.items() if v and 'floor_ms' in v[bs[0]]]
  for key, who in (('speedup', 'JAX'), ('speedup_jax_bf16w', 'JAX bfloat16 weights')):
    rows += [[f'{who} speedup vs {names[o]}', *(x for b in bs for x in (f'{s[b]:.2f}x', '', '', '', ''))]
             for o, s in d.get(key, {}).items()]
  head = [x for b in bs for x in (f'B={b} tokens/s', 'TTFT ms', 'ms/token', 'MBU', 'e2e tokens/s')]
  return L + _table(['decode', *head], rows)


def _serve_md(d: dict) -> list[str]:
  la = d['loadavg']
  L = ['', (f'Serving (`python -m minillm_jax.serve`, random weights), {d["requests_per_client"]} streamed greedy '
            f'completions per client one after another, prompt {d["prompt_len"]} + {d["new_tokens"]} new tokens, '
            f'context {d["context"]}: batched (--max_batch={d["max_batch"]}) against one request at a time '
            f'(--max_batch=1), levels in turn. tokens/s: all completion tokens / wall time; TTFT: request sent '
            f'to its first streamed text (text streams every {d["chunk"]} decode steps). Load average '
            f'{la[0][0]:.1f} -> {la[1][0]:.1f}. At {d["levels"][-1]} clients batching gives '
            f'**{d["speedup_top"]:.2f}x** the tokens/s of one at a time.')]
  b, o = d['servers']['batched'], d['servers']['one_at_a_time']
  rows = [[c, f'{b[c]["tokens_per_s"]:,.1f}', f'{b[c]["ttft_p50_ms"]:,.0f}', f'{b[c]["ttft_p99_ms"]:,.0f}',
           f'{o[c]["tokens_per_s"]:,.1f}', f'{o[c]["ttft_p50_ms"]:,.0f}', f'{o[c]["ttft_p99_ms"]:,.0f}',
           f'{d["speedup"][c]:.2f}x'] for c in map(str, d['levels'])]
  return L + _table(['clients', 'batched tokens/s', 'TTFT p50 ms', 'TTFT p99 ms', 'one-at-a-time tokens/s',
                     'TTFT p50 ms', 'TTFT p99 ms', 'speedup'], rows)


def markdown(res: dict) -> str:
  e = res['env']
  mods = f' + uncommitted {", ".join(m.split()[-1] for m in e["git_modified"])}' if e['git_modified'] else ''
  cmd = ' '.join(['python -m minillm_jax.bench', *res['settings']['argv']])
  L = [(f'Measured {e["date"]} on **{e["cpu_model"] or e["device_kind"]}** (jax platform '
        f'{e["jax_platform"]}, {e["cores"]} cores, {" ".join(e["cpu_flags"]) or "-"}); commit '
        f'`{e["git_commit"][:10]}`{mods}; jax {e["jax"]}, torch {e["torch"]} ({e["torch_threads"]} threads, '
        f'{e["torch_device"]}), transformers {e["transformers"]}. Load average '
        f'{e["loadavg_start"][0]:.1f} at the start, {e["loadavg_end"][0]:.1f} at the end. `{cmd}`')]
  for r in res['runs']:
    m = r['model']
    L += ['', (f'### {Path(r["config"]).stem}: {r["params"] / 1e6:.2f}M parameters, {m["n_layer"]} '
               f'layers, d_model {m["d_model"]}, vocab {m["vocab_size"]} '
               f'(`{" ".join([r["config"], *r["overrides"]])}`)')]
    L += _train_md(r['train']) if 'train' in r else []
    L += _decode_md(r['decode']) if 'decode' in r else []
    L += _serve_md(r['serve']) if 'serve' in r else []
    if 'data' in r:
      d = r['data']
      hr = (f', {d["headroom_vs_train"]:,.0f}x the rate the fastest JAX train step consumes'
            if 'headroom_vs_train' in d else '')
      L += ['', (f'Data pipeline ({d["corpus"]}, {d["num_workers"]} workers): {d["batches_per_s"]:,.1f} '
                 f'batches/s ({d["tokens_per_s"]:,.0f} tokens/s){hr}.')]
  return '\n'.join(L)


def update_md(path: Path, section: str, body: str) -> None:
  """Replaces the text between this section's markers (appends the section when missing), keeping the rest."""
  start, end = f'<!-- bench:{section}:start -->', f'<!-- bench:{section}:end -->'
  text = path.read_text() if path.exists() else '# Benchmarks\n'
  if start in text and end in text:
    text = text[:text.index(start) + len(start)] + f'\n{body}\n' + text[text.index(end):]
  else:
    text = text.rstrip('\n') + f'\n\n## {section.upper()}\n\n{start}\n{body}\n{end}\n'
  path.write_text(text)
