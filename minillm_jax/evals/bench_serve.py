"""bench --what=serve: aggregate completion tokens/s and time to first token of `python -m minillm_jax.serve`
under 1, 4, 16 ... concurrent streaming clients, batched (--max_batch = the most clients) against the same model
served one request at a time (--max_batch=1), in the same run.

The model is the bench config's shape with random weights (as the decode bench) and a char tokenizer with one
character per id of its vocabulary, so a prompt of n characters is n tokens and every id decodes. Both servers
run as subprocesses on free loopback ports and are warmed up on every batch size before any timing; the
clients are threads in this process speaking plain HTTP (SSE), each sending `requests` streamed greedy
completions one after another. The levels run in turn, batched then one-at-a-time at each level, so the two see
the same load."""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from minillm_jax.data import tokenizer as toklib
from minillm_jax.model import init_model
from minillm_jax.training import checkpoint

FIRST_CHAR = 0x20000  # a plane of code points, far from whitespace and surrogates: every id one printable char


def char_vocab_tok(vocab_size: int) -> toklib.Tok:
  """A char tokenizer with exactly vocab_size ids: the specials, then one code point per remaining id."""
  n = vocab_size - len(toklib.SPECIALS) - 1  # - <|unk|>
  if n < 1:
    raise ValueError(f'vocab_size={vocab_size} leaves no ids for text')
  tok = toklib.build_char([''.join(chr(FIRST_CHAR + i) for i in range(n))])
  assert tok.vocab_size == vocab_size, (tok.vocab_size, vocab_size)
  return tok


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class ServerProc:
  """`python -m minillm_jax.serve` on a free loopback port, its log in a file."""

  def __init__(self, workdir: str, log: Path, *flags: str):
    self.port, self.log_path = free_port(), log
    self.log = open(log, 'w')  # noqa: SIM115 - open for the server's lifetime
    self.proc = subprocess.Popen([sys.executable, '-m', 'minillm_jax.serve', f'--workdir={workdir}',
                                  f'--port={self.port}', '--warmup', *flags], stdout=self.log,
                                 stderr=subprocess.STDOUT, env={**os.environ, 'NO_COLOR': '1'})

  def health(self) -> dict:
    conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=10)
    try:
      conn.request('GET', '/health')
      return json.loads(conn.getresponse().read())
    finally:
      conn.close()

  def wait(self, timeout: float = 900) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
      if self.proc.poll() is not None:
        raise RuntimeError(f'the server exited ({self.proc.returncode}): {self.log_path.read_text()[-2000:]}')
      try:
        return self.health()
      except OSError:
        time.sleep(0.5)
    raise TimeoutError(f'the server did not start in {timeout:.0f} s: {self.log_path.read_text()[-2000:]}')

  def stop(self) -> None:
    self.proc.terminate()
    try:
      self.proc.wait(30)
    except subprocess.TimeoutExpired:
      self.proc.kill()
    self.log.close()


def stream_once(port: int, prompt: str, max_tokens: int) -> dict:
  """One streamed greedy completion: ttft_s (to the first text), total_s, completion tokens (from usage)."""
  body = {'prompt': prompt, 'max_tokens': max_tokens, 'temperature': 0, 'stream': True,
          'stream_options': {'include_usage': True}}
  t0 = time.perf_counter()
  conn = http.client.HTTPConnection('127.0.0.1', port, timeout=600)
  try:
    conn.request('POST', '/v1/completions', json.dumps(body), {'Content-Type': 'application/json'})
    resp = conn.getresponse()
    if resp.status != 200:
      raise RuntimeError(f'HTTP {resp.status}: {resp.read()[:500]!r}')
    ttft, tokens = None, 0
    for line in resp:  # SSE: one `data: {...}` line per event
      if not line.startswith(b'data: ') or line.strip() == b'data: [DONE]':
        continue
      ev = json.loads(line[6:])
      if 'error' in ev:
        raise RuntimeError(ev['error']['message'])
      if ev.get('usage'):
        tokens = ev['usage']['completion_tokens']
      if ttft is None and any(c.get('text') for c in ev['choices']):
        ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
  finally:
    conn.close()
  return {'ttft_s': total if ttft is None else ttft, 'total_s': total, 'tokens': tokens}


def load(port: int, prompts: list[list[str]], max_tokens: int) -> dict:
  """len(prompts) clients at once, client i sending prompts[i] one after another: aggregate tokens/s (all
  completion tokens / wall time from the first request to the last reply) and the TTFT percentiles."""
  results: list[list[dict]] = [[] for _ in prompts]
  errors: list[BaseException] = []
  go = threading.Barrier(len(prompts) + 1)

  def client(i: int) -> None:
    go.wait()
    try:
      for p in prompts[i]:
        results[i].append(stream_once(port, p, max_tokens))
    except BaseException as e:  # noqa: BLE001 - reported by the caller
      errors.append(e)

  threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(prompts))]
  for t in threads:
    t.start()
  go.wait()
  t0 = time.perf_counter()
  for t in threads:
    t.join()
  wall = time.perf_counter() - t0
  if errors:
    raise RuntimeError(f'{len(errors)} of {len(prompts)} clients failed: {errors[0]}')
  flat = [r for rs in results for r in rs]
  ttft = [r['ttft_s'] for r in flat]
  tokens = sum(r['tokens'] for r in flat)
  return {'clients': len(prompts), 'requests': len(flat), 'tokens': tokens, 'wall_s': wall,
          'tokens_per_s': tokens / wall, 'ttft_p50_ms': 1e3 * float(np.percentile(ttft, 50)),
          'ttft_p99_ms': 1e3 * float(np.percentile(ttft, 99)), 'ttft_s': ttft}


def serve_bench(cfg, mc, a: dict) -> dict:
  """a: clients (list of ints), requests (per client), prompt_len, new_tokens (clamped to the context)."""
  levels = sorted({int(c) for c in a['serve_clients']})
  n_prompt = min(a['prompt_len'], mc.block_size // 2)
  n_new = min(a['new_tokens'], mc.block_size - n_prompt)
  tok = char_vocab_tok(mc.vocab_size)
  rng = np.random.default_rng(0)
  chars = [chr(FIRST_CHAR + i) for i in range(mc.vocab_size - len(toklib.SPECIALS) - 1)]
  # a distinct prompt per request, the same set for both servers
  prompts = {c: [[''.join(rng.choice(chars, n_prompt)) for _ in range(a['requests'])] for _ in range(c)]
             for c in levels}
  load0 = os.getloadavg()
  with tempfile.TemporaryDirectory(prefix='bench_serve_') as d:
    run = os.path.join(d, 'run')
    checkpoint.init_workdir(run, None, mc, init_model(mc, cfg.train.seed), tok.to_json_str(), {})
    common = ['--chunk=4', '--batch_wait_ms=10', f'--max_queue={max(64, 2 * levels[-1])}']
    servers = {'batched': ServerProc(run, Path(d) / 'batched.log', f'--max_batch={levels[-1]}', *common),
               'one_at_a_time': ServerProc(run, Path(d) / 'one.log', '--max_batch=1', *common)}
    try:
      t0 = time.perf_counter()
      for s in servers.values():  # both compile at once; --warmup: every padded batch size before /health
        s.wait()
      startup = time.perf_counter() - t0
      res = {name: {} for name in servers}
      for c in levels:
        for name, s in servers.items():
          print(f'    {name}, {c} clients', flush=True)
          res[name][str(c)] = load(s.port, prompts[c], n_new)
      stats = {name: s.health() for name, s in servers.items()}
    finally:
      for s in servers.values():
        s.stop()
  top = str(levels[-1])
  speedup = {str(c): res['batched'][str(c)]['tokens_per_s'] / res['one_at_a_time'][str(c)]['tokens_per_s']
             for c in levels}
  return {'prompt_len': n_prompt, 'new_tokens': n_new, 'requests_per_client': a['requests'], 'levels': levels,
          'max_batch': levels[-1], 'context': mc.block_size, 'chunk': 4, 'startup_s': startup,
          'servers': res, 'speedup': speedup, 'speedup_top': speedup[top],
          'scheduler': {k: {x: v[x] for x in ('batches', 'rows', 'max_rows_in_batch')} for k, v in stats.items()},
          'loadavg': [load0, os.getloadavg()]}
