"""Benchmark: the JAX train step, KV-cache decoding and the data pipeline against the torch mirror and
`transformers`, in one process on the same config, weights and batch.

  python -m minillm_jax.bench                         # configs/tiny.py and configs/shakespeare_char.py
  python -m minillm_jax.bench --config=configs/tiny.py --config.model.block_size=256 --what=train
  python -m minillm_jax.bench --configs=configs/tiny.py,configs/shakespeare_char.py --update_md
  python -m minillm_jax.bench --config=configs/shakespeare_char.py --quick   # smoke run
  python -m minillm_jax.bench --config=configs/tiny.py --what=serve --new_tokens=64   # the HTTP server

Writes <out>/bench.json (raw samples, medians, environment) and <out>/bench.md; --update_md rewrites this
device's (CPU or GPU) section of BENCHMARKS.md. Method: every variant is built and compiled by its first call
(compile time = first call - steady step), then the variants run in turn, A B C A B C ..., `repeats` times,
and medians (and the best repeat) are reported; matmul peaks (MFU) and a read of the decode step's bytes
(MBU, the decode floor) are timed in the same rounds. The host is shared: compare ratios within one run, not
numbers across runs. `--what=serve` (not in the default sections) times `python -m minillm_jax.serve` under
concurrent streaming clients, batched against one request at a time (evals.bench_serve).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from absl import flags

from minillm_jax import cli, parallel
from minillm_jax import config as config_lib
from minillm_jax.data import prepare
from minillm_jax.evals import bench_data, bench_memory, bench_report, bench_serve
from minillm_jax.evals import bench_runs as br
from minillm_jax.model import param_counts

ROOT = bench_report.ROOT
TRAIN_VARIANTS = ('jax_float32', 'jax_float32_dp', 'jax_bfloat16', 'jax_bfloat16_dp', 'torch_eager_fp32',
                  'torch_compile_fp32', 'torch_compile_bf16')
DEFAULT_CONFIGS = ('configs/tiny.py', 'configs/shakespeare_char.py')
SECTIONS = ('train', 'decode', 'data', 'serve', 'memory')
MEMORY_CONFIG = 'configs/llm200m.py'  # --what=memory alone, without --config
F = flags.FLAGS


def define_flags():
  flags.DEFINE_list('configs', [], 'Config files to run after --config (without overrides).')
  flags.DEFINE_string('out', 'bench_out', 'Directory for bench.json and bench.md.')
  flags.DEFINE_list('what', ['train', 'decode', 'data'], 'Sections: train, decode, data, serve (the HTTP '
                    'server under concurrent clients; not run by default), memory (step peak memory with '
                    'model.remat none/attention/block and the torch mirror with/without checkpointing, one '
                    f'process each; not run by default; alone without --config: {MEMORY_CONFIG}).')
  flags.DEFINE_integer('batch', 0, 'memory: batch rows of the measured step (0: 1).')
  flags.DEFINE_list('data_gb', ['0.1'], 'data: sizes (GB) of the synthetic text prepare is timed on, char and BPE '
                    'each in a fresh process (peak RSS); BENCHMARKS.md uses 1,2.')
  flags.DEFINE_list('variants', list(TRAIN_VARIANTS), 'Train-step variants (--quick drops torch_compile_*).')
  flags.DEFINE_integer('repeats', 0, 'Interleaved repeats; 0: 5 when a round of train steps takes < 30 s, '
                       'else 3 (decode and data: 3).')
  flags.DEFINE_integer('steps', 0, 'Train steps per repeat; 0: as many as fill about 1 s (1 to 50).')
  flags.DEFINE_integer('prompt_len', 32, 'Decode prompt length.')
  flags.DEFINE_integer('new_tokens', 256, 'Decode: tokens generated per call.')
  flags.DEFINE_list('decode_batch', ['1', '8'], 'Decode batch sizes.')
  flags.DEFINE_list('decode_weights', ['float32', 'bfloat16'], 'How the JAX sampler stores its matrices '
                    '(bfloat16: the samplers\' --weights=bfloat16).')
  flags.DEFINE_list('serve_clients', ['1', '4', '16'], 'serve: concurrent streaming clients per level; the '
                    'batched server\'s --max_batch is the largest.')
  flags.DEFINE_integer('serve_requests', 2, 'serve: requests each client sends one after another (--quick: 1).')
  flags.DEFINE_bool('quick', False, 'Smoke run: 1 repeat of 1 step, batch <= 4 x block <= 128, 16 new '
                    'tokens, no torch.compile unless --variants names it.')
  flags.DEFINE_integer('torch_threads', 0, "torch intra-op threads; 0: torch's default (one per core). On "
                       'a contended host 1 can be steadier for small ops.')
  flags.DEFINE_bool('update_md', False, "Rewrite this device's section of --md.")
  flags.DEFINE_string('md', str(ROOT / 'BENCHMARKS.md'), 'The markdown file --update_md rewrites.')


def load_config_file(spec: str):
  """A configs/*.py file (optionally file.py:variant), validated, without flag overrides."""
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path):
    raise config_lib.UserError(f'config file {path!r} not found; the presets are in configs/')
  ms = importlib.util.spec_from_file_location(f'_bench_cfg_{Path(path).stem}', path)
  mod = importlib.util.module_from_spec(ms)
  ms.loader.exec_module(mod)
  return config_lib.validate(mod.get_config(variant) if variant else mod.get_config())


def run_config(name: str, overrides: list[str], cfg, a: dict) -> dict:
  prep = prepare.prepare(cfg) if ('data' in a['what'] or cfg.model.vocab_size is None) else None
  mc = config_lib.model_config(cfg, prep.vocab_size if prep else None)
  a = {**a, 'batch_size': min(cfg.train.batch_size, 4) if a['quick'] else cfg.train.batch_size}
  if a['quick']:
    mc = dataclasses.replace(mc, block_size=min(mc.block_size, 128))
  res = {'config': name, 'overrides': overrides, 'model': mc.to_dict(), 'params': param_counts(mc)['total']}
  print(f'{name}: {res["params"]:,} parameters, batch {a["batch_size"]} x {mc.block_size}', flush=True)
  for sec, fn in (('train', lambda: br.train_bench(cfg, mc, a)), ('decode', lambda: br.decode_bench(cfg, mc, a)),
                  ('data', lambda: br.data_bench(cfg, prep, mc, a, res.get('train'))),
                  ('serve', lambda: bench_serve.serve_bench(cfg, mc, a)),
                  ('memory', lambda: bench_memory.memory_bench(cfg, mc, a))):
    if sec in a['what']:
      print(f'  {sec}', flush=True)
      res[sec] = fn()
  return res


def main(argv):
  del argv
  bad = ((set(F.variants) - set(TRAIN_VARIANTS)) | (set(F.what) - set(SECTIONS))
         | (set(F.decode_weights) - {'float32', 'bfloat16'}))
  if bad:
    raise config_lib.UserError(f'unknown --variants/--what/--decode_weights entries {sorted(bad)}: variants are '
                               f'{", ".join(TRAIN_VARIANTS)}; sections are {", ".join(SECTIONS)}; weights are '
                               'float32, bfloat16')
  if (not all(b.isdigit() and int(b) > 0 for b in [*F.decode_batch, *F.serve_clients])
      or min(F.prompt_len, F.new_tokens, F.serve_requests) < 1):
    raise config_lib.UserError(f'--decode_batch={",".join(F.decode_batch)} --prompt_len={F.prompt_len} '
                               f'--new_tokens={F.new_tokens} --serve_clients={",".join(F.serve_clients)} '
                               f'--serve_requests={F.serve_requests}: batch sizes and counts must be positive '
                               'integers, e.g. --decode_batch=1,8')
  if F.batch < 0 or F.steps < 0 or F.repeats < 0:
    raise config_lib.UserError(f'--batch={F.batch} --steps={F.steps} --repeats={F.repeats}: use 0 (the default) '
                               'or a positive count')
  # one JAX device per core for the jax_*_dp variants (what `train` does on a CPU-only machine); the other JAX
  # variants and decoding run on the first device, which keeps every thread for its ops
  parallel.use_cpu_devices(min(parallel.host_cores(), 8))
  own_cache = 'TORCHINDUCTOR_CACHE_DIR' not in os.environ
  if own_cache:  # a fresh inductor cache: torch.compile times are cold, like JAX's
    os.environ['TORCHINDUCTOR_CACHE_DIR'] = tempfile.mkdtemp(prefix='bench_inductor_')
  overrides = [x for x in sys.argv[1:] if x.startswith('--config.')]
  jobs = [(F['config'].config_filename, overrides, cli.config())] if F['config'].present else []
  jobs += [(p, [], load_config_file(p)) for p in F.configs]
  defaults = (MEMORY_CONFIG,) if F.what == ['memory'] else DEFAULT_CONFIGS
  jobs = jobs or [(p, [], load_config_file(str(ROOT / p))) for p in defaults]
  rep = F.repeats or (1 if F.quick else 0)  # 0: train picks 3 or 5 from the time of one round
  a = {'what': F.what, 'quick': F.quick, 'repeats': rep, 'steps': F.steps or int(F.quick),
       'variants': [v for v in F.variants if not (F.quick and 'compile' in v and not F['variants'].present)],
       'prompt_len': F.prompt_len,
       'new_tokens': 16 if F.quick and not F['new_tokens'].present else F.new_tokens,
       'decode_batch': F.decode_batch, 'decode_weights': F.decode_weights, 'decode_repeats': rep or 3,
       'data_batches': 20 if F.quick else 200, 'serve_clients': F.serve_clients,
       'requests': 1 if F.quick and not F['serve_requests'].present else F.serve_requests, 'batch': F.batch}
  if F.torch_threads:
    import torch
    torch.set_num_threads(F.torch_threads)
  env = bench_report.environment()
  print(f'bench on {env["cpu_model"] or env["device_kind"]} ({env["jax_platform"]})', flush=True)
  try:
    runs = [run_config(n, o, c, a) for n, o, c in jobs]
  finally:
    if own_cache:
      shutil.rmtree(os.environ['TORCHINDUCTOR_CACHE_DIR'], ignore_errors=True)
  env['loadavg_end'] = os.getloadavg()
  res = {'env': env, 'settings': {**a, 'argv': sys.argv[1:]}, 'runs': runs}
  if 'data' in F.what:  # prepare and the pipeline against their ceilings, once for the whole run
    print('data: prepare and pipeline', flush=True)
    gb = ['0.002'] if F.quick and not F['data_gb'].present else F.data_gb
    res['data'] = bench_data.run([float(x) for x in gb], runs, ROOT, prepare.prepare(jobs[0][2]),
                                 a['data_batches'])
  out = Path(F.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'bench.json').write_text(json.dumps(res, indent=1))
  md = bench_report.markdown(res)
  md += ''.join('\n'.join(bench_memory.markdown(r['memory'])) + '\n' for r in runs if 'memory' in r)
  md += '\n'.join(bench_data.markdown(res['data'])) + '\n' if 'data' in res else ''
  (out / 'bench.md').write_text(md + '\n')
  print(md, flush=True)
  if F.update_md:
    bench_report.update_md(Path(F.md), 'gpu' if env['jax_platform'] != 'cpu' else 'cpu', md)
    print(f'updated {F.md}', flush=True)


if __name__ == '__main__':
  cli.define_config(default=None)
  define_flags()
  cli.run(main)
