"""The measurements of `bench`: the train step of JAX and the torch mirror, KV-cache decoding against torch and
`transformers`, and the data pipeline, each variant timed in interleaved rounds (A B C A B C ...) on the same
config, weights and batch. bench.py is the command line; evals.bench_report writes the tables."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import gc
import os
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minillm_jax import parallel
from minillm_jax.data import pipeline
from minillm_jax.inference import jax_backend
from minillm_jax.inference.backend import SampleParams
from minillm_jax.model import GPT, decode_bytes, flops_per_token, init_model, mm
from minillm_jax.training import step

Run = Callable[[int], object]  # run(k): k steps (or calls), synchronised at the end


def _med(xs) -> float:
  return float(np.median(xs))


def _spread(xs) -> float:
  """(max - min) / median over the repeats: how disturbed a measurement was."""
  return float((max(xs) - min(xs)) / np.median(xs)) if len(xs) > 1 else 0.0


def _timed(fn, *a):
  t0 = time.perf_counter()
  y = fn(*a)
  return time.perf_counter() - t0, y


def interleave(runs: dict[str, Run], steps: dict[str, int], repeats: int,
               probe: Callable | None = None) -> dict[str, list[float]]:
  """Seconds per step of each run, A B C A B C ...; probe(name), a context manager, wraps each run."""
  out = {k: [] for k in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      with probe(name) if probe else contextlib.nullcontext():
        out[name].append(_timed(run, steps[name])[0] / steps[name])
  return out


def _status_mb(key: str) -> float:
  with open('/proc/self/status') as f:
    return int(next(ln for ln in f if ln.startswith(key + ':')).split()[1]) / 1024


@contextlib.contextmanager
def rss_peak(into: dict, key: str):
  """into[key] = resident memory the region adds at its peak over the resident memory before it (Linux: free
  heap returned by malloc_trim, high-water mark reset through /proc/self/clear_refs); None elsewhere. The
  weights and optimizer state are resident before, so this is activations, gradients and temporaries."""
  rss0 = None
  with contextlib.suppress(OSError, AttributeError, StopIteration):
    gc.collect()
    time.sleep(0.2)  # XLA frees a finished step's temporaries on its own threads
    ctypes.CDLL(None).malloc_trim(0)
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    rss0 = _status_mb('VmRSS')
  yield
  into[key] = None if rss0 is None else _status_mb('VmHWM') - rss0


def _tdev():
  import torch
  return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def _tsync():
  import torch
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def matmul_runs(n: int) -> dict[str, Run]:
  """n^3 matmuls with float32 accumulation, JAX (the model's `mm`: OpenBLAS for float32 on CPU, XLA's dot
  otherwise) and torch (mm), float32 and bfloat16, warmed up. Timed in the same rounds as the train steps,
  they give the device's peak under the same load (the faster framework's, per dtype): MFU then compares like
  with like on a shared host."""
  import torch
  jmm = jax.jit(mm)
  runs = {}
  for dt in ('float32', 'bfloat16'):
    a, t = jnp.ones((n, n), dt), torch.ones(n, n, dtype=getattr(torch, dt), device=_tdev())
    runs[f'matmul_jax_{dt}'] = lambda k, a=a: [jmm(a, a).block_until_ready() for _ in range(k)]
    runs[f'matmul_torch_{dt}'] = lambda k, t=t: ([torch.mm(t, t) for _ in range(k)], _tsync())
  for run in runs.values():
    run(1)
  return runs


def read_runs(nbytes: int) -> dict[str, Run]:
  """Sums of a float32 buffer of nbytes, JAX and torch, warmed up: the read bandwidth a decoder reading that
  many bytes per step can reach at best (the faster framework's, timed in the same rounds as the decoders)."""
  import torch
  n = max(1, nbytes // 4)
  j, t, jsum = jnp.ones((n,), jnp.float32), torch.ones(n, device=_tdev()), jax.jit(jnp.sum)
  runs = {'read_jax': lambda k: [jsum(j).block_until_ready() for _ in range(k)],
          'read_torch': lambda k: ([t.sum() for _ in range(k)], _tsync())}
  for run in runs.values():
    run(1)
  return runs


# ------------------------------------------------------------------------------------------------- train step
def _jax_train(cfg, mc, dtype: str, params0, batch: dict, dp: bool = False) -> tuple[Run, Callable[[], dict]]:
  """The trainer's own step (training.step.train_steps under jax.jit, state donated) in `dtype` compute. dp: as `train`
  runs on a CPU: data parallel over one device per core, train.steps_per_call steps per call (one otherwise)."""
  c = dataclasses.replace(mc, dtype=dtype)
  gdef, _ = nnx.split(nnx.eval_shape(lambda: GPT(c, nnx.Rngs(params=0))))
  params = jax.tree.map(jnp.copy, params0)
  tx, _ = step.make_optimizer(cfg.optim, cfg.train.steps)
  n = parallel.largest_divisor(batch['inputs'].shape[0], len(jax.devices())) if dp else 1
  B, T = batch['inputs'].shape
  per_call = step.steps_per_call(cfg.train, B * T * flops_per_token(mc)['train']) if dp else 1
  mesh = parallel.make_mesh(jax.devices()[:n])
  p_shard = parallel.param_shardings(mesh, params, False)
  params = jax.device_put(params, p_shard)
  opt = jax.jit(tx.init, out_shardings=parallel.opt_shardings(mesh, tx, params, p_shard))(params)
  batches = {k: parallel.global_batch({n_: np.stack([np.asarray(v)] * k) for n_, v in batch.items()},
                                      parallel.batch_sharding(mesh, 1)) for k in {1, per_call}}
  box = {'state': {'params': params, 'opt': opt}, 'i': 0, 'dispatch': [], 'devices': n}
  dp_mesh = step.flat_dp_mesh(mesh, False, mc.dropout)  # as the trainer
  fn = jax.jit(functools.partial(step.train_steps, gdef=gdef, tx=tx, seed=cfg.train.seed, dp_mesh=dp_mesh),
               donate_argnums=(0,), compiler_options=step.compiler_options(c.remat))
  if per_call > 1:  # compile the per_call-step call now, on a copy: timed runs start warm and the first call is step 0
    jax.block_until_ready(fn(jax.tree.map(jnp.copy, box['state']), batches[per_call], jnp.int32(0)))

  def run(k: int) -> float:
    prev = None
    for size in [per_call] * (k // per_call) + [1] * (k % per_call):
      t0 = time.perf_counter()
      box['state'], m = fn(box['state'], batches[size], jnp.int32(box['i']))
      box['dispatch'].append((time.perf_counter() - t0) / size)  # host time per step: Python, pytree, launch
      box['i'] += size
      if prev is not None and n > 1:  # at most two calls in flight, as train.run (see parallel.use_cpu_devices)
        jax.block_until_ready(prev)
      prev = m['loss']
    jax.block_until_ready((box['state'], m))
    return float(m['loss'][-1])

  def extra() -> dict:  # XLA's accounting of the compiled single step (a cache hit after the first call)
    ma = fn.lower(box['state'], batches[1], jnp.int32(0)).compile().memory_analysis()
    mb = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
          - ma.alias_size_in_bytes) / 2**20
    return {'xla_step_mb': mb, 'dispatch_ms': 1e3 * _med(box['dispatch'][1:]), 'devices': box['devices'],
            'steps_per_call': per_call}
  run.steps_per_call = per_call
  return run, extra


def train_bench(cfg, mc, a: dict) -> dict:
  from torch_compat import convert, train_step
  B, T, gpu = a['batch_size'], mc.block_size, jax.devices()[0].platform != 'cpu'
  toks = np.random.default_rng(0).integers(0, mc.vocab_size, (B, T + 1)).astype(np.int32)
  batch_np = {'inputs': toks[:, :-1], 'targets': toks[:, 1:]}
  model = init_model(mc, cfg.train.seed)
  flat, params0 = convert.flax_flat(model), nnx.state(model, nnx.Param)
  runs, extra, first, loss0, errors, mem = {}, {}, {}, {}, {}, {}
  for v in a['variants']:
    print(f'  train {v}: build + compile', flush=True)
    try:
      if v.startswith('jax_'):
        runs[v], extra[v] = _jax_train(cfg, mc, v[4:].removesuffix('_dp'), params0, batch_np, v.endswith('_dp'))
      else:
        runs[v] = train_step.torch_train_run(mc, flat, cfg.optim, v, batch_np, _tdev())
      first[v], loss0[v] = _timed(runs[v], 1)  # compiles; the loss of the same weights and batch everywhere
    except Exception as e:  # noqa: BLE001 - a failing torch.compile is a result to record, not a crash
      errors[v] = f'{type(e).__name__}: {" ".join(str(e).split())[:300]}'
      runs.pop(v, None)
      print(f'  train {v} failed: {errors[v]}', flush=True)

  @contextlib.contextmanager
  def probe(v):  # on a GPU only torch's allocator can reset its peak
    if gpu and v.startswith('torch'):
      import torch
      torch.cuda.reset_peak_memory_stats()
      yield
      mem[v] = torch.cuda.max_memory_allocated() / 2**20
    else:
      with rss_peak(mem, v) if not gpu else contextlib.nullcontext():
        yield
  n = 512 if a['quick'] else (8192 if gpu else 2048)
  runs |= matmul_runs(n)
  # A first round of single steps measures memory and sizes the repeats (steps filling ~1 s each). It is
  # kept as a sample when every variant runs single steps (slow steps: the probe's page faults are noise).
  load0 = os.getloadavg()[0]
  s = interleave(runs, dict.fromkeys(runs, 1), 1, probe)
  steps = {v: a['steps'] or int(np.clip(round(1.0 / s[v][0]), 1, 50)) for v in runs}
  for v, r in runs.items():  # whole calls for variants that run several steps per call, as the trainer does
    per_call = getattr(r, 'steps_per_call', 1)
    steps[v] = per_call * max(1, round(steps[v] / per_call))
  steps |= {v: max(1, round(0.5 / s[v][0])) for v in runs if v.startswith('matmul')}
  repeats = a['repeats'] or (5 if sum(s[v][0] * steps[v] for v in runs) < 30 else 3)
  kept = 0 if any(k > 1 for v, k in steps.items() if not v.startswith('matmul')) else 1
  more = interleave(runs, steps, repeats - kept)
  s = {v: s[v][:kept] + more[v] for v in runs}
  flop = {v[7:]: 2 * n ** 3 / _med(s.pop(v)) for v in list(s) if v.startswith('matmul')}
  peak = {dt: max(flop[f'jax_{dt}'], flop[f'torch_{dt}']) for dt in ('float32', 'bfloat16')}
  fpt = flops_per_token(mc)['train']
  out = {'batch': [B, T], 'flops_per_token': fpt, 'repeats': repeats, 'steps': steps, 'errors': errors,
         'matmul_n': n, 'matmul_flops': flop, 'peak_flops': peak, 'loadavg': [load0, os.getloadavg()[0]],
         'memory_method': 'torch.cuda peak allocated' if gpu else 'RSS high-water delta', 'variants': {}}
  for v, xs in s.items():
    ms, dt = 1e3 * _med(xs), 'bfloat16' if v.removesuffix('_dp').endswith(('bf16', 'bfloat16')) else 'float32'
    tps = B * T / (ms / 1e3)
    out['variants'][v] = {
        'samples_ms': [1e3 * x for x in xs], 'ms': ms, 'best_ms': 1e3 * min(xs), 'spread': _spread(xs),
        'tokens_per_s': tps,
        'steps_per_s': 1e3 / ms, 'compile_s': first[v] - ms / 1e3, 'first_call_s': first[v],
        'loss_step0': loss0[v], 'compute_dtype': dt, 'flops_per_s': tps * fpt, 'mfu': tps * fpt / peak[dt],
        'step_peak_mb': mem.get(v), **(extra[v]() if v in extra else {})}
  variants = out['variants']
  for key, ms in (('speedup', 'ms'), ('speedup_best', 'best_ms')):  # torch / JAX: > 1 means JAX is faster
    out[key] = {j: {t: variants[t][ms] / variants[j][ms] for t in variants if t.startswith('torch')}
                for j in variants if j.startswith('jax')}
  return out


# ------------------------------------------------------------------------------------------------- decode
def decode_bench(cfg, mc, a: dict) -> dict:
  """Greedy KV-cache decoding with the same random weights and prompts: jax_backend.measure_decode (the jitted
  JAX sampler; also with the matrices stored in bfloat16, `jax_bf16w`, when a['decode_weights'] has it), the
  torch mirror's generate and transformers' generate on the torch_compat.hf export. TTFT:
  prefill plus the first token; decode tokens/s: batch * (new - 1) / the time of the remaining steps (torch
  and transformers: a full call minus a 1-token call)."""
  import torch
  import transformers

  from torch_compat import convert, hf
  from torch_compat import model as tmodel
  n_prompt, n_new, dev = a['prompt_len'], a['new_tokens'], _tdev()
  T = max(mc.block_size, n_prompt + n_new)  # room for prompt + new tokens: nobody crops or re-prefills
  c = dataclasses.replace(mc, block_size=T, max_positions=max(T, mc.max_positions))
  model = init_model(c, cfg.train.seed)
  flat = convert.flax_flat(model)
  tm = tmodel.GPT(c.to_dict())
  tm.load_state_dict(convert.flax_to_torch(c, flat, 'pt'))
  tm = tm.to(dev).eval()
  transformers.utils.logging.disable_progress_bar()
  with tempfile.TemporaryDirectory() as d:
    hf.save_hf(d, c, flat, None, {})
    hm = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(dev).eval()
  bs = [int(b) for b in a['decode_batch']]
  # the prompts measure_decode draws (its seed 0), one row per batch entry
  ids = {b: torch.tensor(np.random.default_rng(0).integers(0, c.vocab_size, (b, n_prompt)).tolist(),
                         device=dev)
         for b in bs}
  gens = {'torch': lambda b, n: tm.generate(ids[b], n)[:, n_prompt:].cpu().numpy(),
          'hf': lambda b, n: hm.generate(input_ids=ids[b], attention_mask=torch.ones_like(ids[b]),
                                         do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                         pad_token_id=0)[:, n_prompt:].cpu().numpy()}
  jx = {}
  jaxes = {'jax': 'float32', 'jax_bf16w': 'bfloat16'}
  jaxes = {k: w for k, w in jaxes.items() if w in a['decode_weights']}

  def jax_run(_, j, b):  # measure_decode warms up, then one timed decode
    jx.setdefault(f'{j}/{b}', []).append(jax_backend.measure_decode(model, b, n_prompt, n_new, repeats=1,
                                                                    weights=jaxes[j]))

  runs = {f'{j}/{b}': functools.partial(jax_run, j=j, b=b) for j in jaxes for b in bs}
  runs |= {f'{o}/{b}/{n}': lambda k, g=g, b=b, n=n: g(b, n)
           for o, g in gens.items() for b in bs for n in (n_new, 1)}
  # the bytes a step reads at the mean cache length of the timed steps; a buffer of the float32 batch-1 size
  # gives the read bandwidth in the same cache regime (tiny: DRAM; shakespeare_char: the caches)
  nbytes = {(o, b): decode_bytes(c, b, n_prompt + n_new / 2, 2 if o == 'jax_bf16w' else 4)
            for o in [*jaxes, *gens] for b in bs}
  read_bytes = decode_bytes(c, 1, n_prompt + n_new / 2)
  reads = read_runs(int(read_bytes))
  first = {k: _timed(r, 1)[0] for k, r in runs.items()}  # compiles and warms up
  steps = dict.fromkeys(runs, 1) | {k: max(1, round(0.2 / _timed(r, 1)[0])) for k, r in reads.items()}
  jx.clear()
  s = interleave(runs | reads, steps, a['decode_repeats'])
  bw = max(read_bytes / _med(s.pop(k)) for k in reads)
  res = {'prompt_len': n_prompt, 'new_tokens': n_new, 'context': T, 'hf_class': hf.CLASSES[hf.arch_for(c)],
         'jax_method': 'jax_backend.measure_decode', 'samples_s': s, 'jax_raw': jx, 'read_bytes_per_s': bw,
         'impls': {}}
  for b in bs:
    for o in gens:  # a stalled 1-token call (torch's OpenMP under load) can outlast the full one: measure again
      for _ in range(5):
        if any(f - t > 0 for f, t in zip(s[f'{o}/{b}/{n_new}'], s[f'{o}/{b}/1'])):
          break
        for n in (n_new, 1):
          s[f'{o}/{b}/{n}'].append(_timed(runs[f'{o}/{b}/{n}'], 1)[0])
    one = {**{j: [r['ttft_s'] for r in jx[f'{j}/{b}']] for j in jaxes}, **{o: s[f'{o}/{b}/1'] for o in gens}}
    rest = {**{j: [r['decode_s'] for r in jx[f'{j}/{b}']] for j in jaxes},
            **{o: [d for d in np.subtract(s[f'{o}/{b}/{n_new}'], one[o]) if d > 0] or [float('nan')]
               for o in gens}}
    for o, t1 in one.items():
      res['impls'].setdefault(o, {})[str(b)] = {
          'decode_tokens_per_s': b * (n_new - 1) / _med(rest[o]), 'ttft_ms': 1e3 * _med(t1),
          'end_to_end_tokens_per_s': b * n_new / (_med(t1) + _med(rest[o])), 'spread': _spread(rest[o]),
          'ms_per_token': 1e3 * _med(rest[o]) / max(n_new - 1, 1), 'step_bytes': nbytes[o, b],
          'mbu': nbytes[o, b] * (n_new - 1) / _med(rest[o]) / bw, 'floor_ms': 1e3 * nbytes[o, b] / bw,
          'first_call_s': first[f'{o}/{b}'] if o in jaxes else first[f'{o}/{b}/{n_new}']}
  rate = lambda o, b: res['impls'][o][b]['decode_tokens_per_s']
  for j in jaxes:  # 'speedup': float32 JAX; 'speedup_jax_bf16w': bfloat16 weights
    res['speedup' if j == 'jax' else f'speedup_{j}'] = {o: {str(b): rate(j, str(b)) / rate(o, str(b)) for b in bs}
                                                        for o in gens}
  if 1 in ids and 'jax' in jaxes:  # the common greedy prefix with float32 JAX's tokens, batch 1
    greedy = lambda w: jax_backend.generate(model, ids[1][0].tolist(), n_new, SampleParams(temperature=0.0),
                                       weights=w)[0]
    j = greedy('float32')
    others = ({o: g(1, n_new)[0] for o, g in gens.items()}
              | {k: greedy(w) for k, w in jaxes.items() if k != 'jax'})
    res['greedy_agree_tokens'] = {o: int(np.argmin(np.append(j == t, False))) for o, t in others.items()}
  return res


# ------------------------------------------------------------------------------------------------- data
def data_bench(cfg, prep, mc, a: dict, train_res: dict | None) -> dict:
  B, T = a['batch_size'], mc.block_size
  xs = [pipeline.measure_throughput(prep, B, T, cfg.data.num_workers, a['data_batches'])
        for _ in range(a['decode_repeats'])]
  out = {'batches_per_s': _med(xs), 'samples': xs, 'tokens_per_s': _med(xs) * B * T,
         'num_workers': cfg.data.num_workers, 'corpus': prep.dir.name}
  jx = [v['steps_per_s'] for k, v in ((train_res or {}).get('variants') or {}).items() if k.startswith('jax')]
  if jx:  # how many times faster the pipeline delivers batches than the fastest JAX step consumes them
    out['headroom_vs_train'] = out['batches_per_s'] / max(jx)
  return out
