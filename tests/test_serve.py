"""The OpenAI-compatible server: two servers on a tiny random run (one with an API key) driven by the official
`openai` client and raw HTTP, the chat page in headless chromium, plus the scheduler's grouping, queue limit and
cancelling on a fake backend."""
import concurrent.futures
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from conftest import ROOT, run_module
from test_sample import char_tok, make_workdir

from minillm_jax.inference.backend import Backend, SampleParams
from minillm_jax.inference.scheduler import Job, QueueFull, Scheduler, bucket
from minillm_jax.inference.server import ApiError, Defaults, chat_prompt, create_app
from minillm_jax.inference.text import printable

ENV = {**os.environ, 'NO_COLOR': '1', 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
KEY = 'sekret-key'


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Server:
  def __init__(self, workdir: str, log_path, *args: str):
    self.port, self.log_path = free_port(), log_path
    self.base = f'http://127.0.0.1:{self.port}'
    self.log = open(log_path, 'w')  # noqa: SIM115 - open for the server's lifetime
    self.proc = subprocess.Popen([sys.executable, '-m', 'minillm_jax.serve', f'--workdir={workdir}',
                                  f'--port={self.port}', *args], cwd=ROOT, env=ENV, stdout=self.log,
                                 stderr=subprocess.STDOUT)

  def wait(self, headers: dict | None = None, timeout: float = 180):
    t0 = time.time()
    while time.time() - t0 < timeout:
      assert self.proc.poll() is None, self.log_path.read_text()
      try:
        return http_json(self, 'GET', '/health', headers=headers)
      except OSError:
        time.sleep(0.3)
    raise TimeoutError(self.log_path.read_text())

  def client(self, key: str = 'unused') -> openai.OpenAI:
    return openai.OpenAI(base_url=f'{self.base}/v1', api_key=key, max_retries=0, timeout=120)

  def stop(self):
    self.proc.terminate()
    try:
      self.proc.wait(20)
    except subprocess.TimeoutExpired:
      self.proc.kill()
    self.log.close()


def http_json(srv: Server, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
  data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
  req = urllib.request.Request(srv.base + path, data=data, method=method,
                               headers={'Content-Type': 'application/json', **(headers or {})})
  try:
    with urllib.request.urlopen(req, timeout=120) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  return make_workdir(tmp_path_factory.mktemp('serve') / 'run', instruction_tuned=True)


@pytest.fixture(scope='module')
def servers(run, tmp_path_factory):
  logs = tmp_path_factory.mktemp('logs')
  # max_batch 8: the 16 streams then compile one batch shape, not two (about 10 s each on a busy 2-core CPU)
  main = Server(run, logs / 'main.log', '--max_batch=8', '--batch_wait_ms=50')
  keyed = Server(run, logs / 'keyed.log', f'--api_key={KEY}', '--model_name=tiny')  # both start at once
  try:
    main.wait()
    keyed.wait({'Authorization': f'Bearer {KEY}'})
    yield main, keyed
  finally:
    main.stop()
    keyed.stop()


def test_completion_greedy_equals_generate_streamed_or_not(servers, run):
  srv = servers[0]
  c = srv.client()
  r = c.completions.create(model='x', prompt='ROMEO:', max_tokens=12, temperature=0)
  choice = r.choices[0]
  assert r.object == 'text_completion' and r.model == 'x' and choice.finish_reason == 'length'
  assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (6, 12, 18)
  chunks = list(c.completions.create(model='x', prompt=['ROMEO:'], max_tokens=12, temperature=0, stream=True))
  assert len(chunks) > 2 and ''.join(k.choices[0].text for k in chunks) == choice.text
  assert chunks[-1].choices[0].finish_reason == 'length'
  g = run_module('minillm_jax.generate', f'--workdir={run}', '--prompt=ROMEO:', '--temperature=0',
                 '--max_new_tokens=12', '--template=off', env={'NO_COLOR': '1'})
  assert g.returncode == 0, g.stderr
  assert g.stdout == 'ROMEO:' + printable(choice.text) + '\n'


def test_stop_strings_and_max_tokens(servers):
  c = servers[0].client()
  full = c.completions.create(model='x', prompt='To be', max_tokens=20, temperature=0)
  text = full.choices[0].text
  assert full.choices[0].finish_reason == 'length' and len(text) > 8
  stop = text[6:8]
  r = c.completions.create(model='x', prompt='To be', max_tokens=20, temperature=0, stop=[stop, 'never seen'])
  assert r.choices[0].text == text[:text.find(stop)] and r.choices[0].finish_reason == 'stop'
  r = c.completions.create(model='x', prompt='To be', max_tokens=5, temperature=0)
  assert r.choices[0].finish_reason == 'length' and r.usage.completion_tokens == 5
  assert text.startswith(r.choices[0].text)


def test_chat_completions_stream_n2_and_seed(servers):
  c = servers[0].client()
  msgs = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi there'}]
  kw = dict(model='m', messages=msgs, max_tokens=10, temperature=1.0, n=2, seed=7)
  r = c.chat.completions.create(**kw)
  assert r.object == 'chat.completion' and len(r.choices) == 2
  assert all(ch.message.role == 'assistant' and ch.finish_reason in ('stop', 'length') for ch in r.choices)
  assert 0 < r.usage.completion_tokens <= 20
  text, reasons = ['', ''], [None, None]
  for k in c.chat.completions.create(**kw, stream=True, stream_options={'include_usage': True}):
    for ch in k.choices:
      text[ch.index] += ch.delta.content or ''
      reasons[ch.index] = ch.finish_reason or reasons[ch.index]
    if k.usage:
      assert k.usage == r.usage
  assert text == [ch.message.content for ch in r.choices]  # the same seed: the same text
  assert reasons == [ch.finish_reason for ch in r.choices]


def test_sixteen_concurrent_streams_are_batched(servers):
  srv = servers[0]
  c = srv.client()

  def one(i: int) -> tuple[str, str]:
    text, reason = '', None
    for k in c.completions.create(model='x', prompt=f'{i} to be', max_tokens=16, temperature=0.8, stream=True):
      text += k.choices[0].text
      reason = k.choices[0].finish_reason or reason
    return text, reason

  before = http_json(srv, 'GET', '/health')[1]
  t0 = time.time()
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    out = list(pool.map(one, range(16)))
  wall = time.time() - t0
  health = http_json(srv, 'GET', '/health')[1]
  assert all(reason in ('stop', 'length') for _, reason in out)
  assert health['requests'] - before['requests'] == 16 and health['max_rows_in_batch'] > 1
  assert health['batches'] - before['batches'] <= 8, health
  print(f'16 concurrent streams: {wall:.2f}s, {health["batches"] - before["batches"]} batches')


def test_bad_requests_get_400_in_openai_shape_and_the_server_lives(servers):
  srv = servers[0]
  bad = [{'prompt': 'x' * 100, 'max_tokens': 1}, {'prompt': 'hi', 'max_tokens': 64},
         {'prompt': 'hi', 'frobnicate': 1}, {'prompt': 'hi', 'temperature': -0.5},
         {'prompt': 'hi', 'top_p': 0}, {'prompt': 'hi', 'n': 99}, {'prompt': 'hi', 'stop': 3}, {'prompt': 5},
         b'{"prompt": "hi", ', b'[1, 2]']
  for body in bad:
    code, err = http_json(srv, 'POST', '/v1/completions', body)
    assert code == 400, (body, err)
    assert set(err['error']) == {'message', 'type', 'param', 'code'} and err['error']['message'], err
  code, err = http_json(srv, 'POST', '/v1/chat/completions', {'messages': [{'role': 'robot', 'content': 'x'}]})
  assert code == 400 and err['error']['param'] == 'messages'
  assert http_json(srv, 'GET', '/v1/nothing')[0] == 404
  assert http_json(srv, 'POST', '/v1/completions', {'prompt': 'x' * (5 << 20)})[0] == 413
  with pytest.raises(openai.BadRequestError, match='temperature'):
    srv.client().completions.create(model='x', prompt='hi', temperature=-1)
  code, ok = http_json(srv, 'POST', '/v1/completions', {'prompt': 'hi', 'max_tokens': 2})
  assert code == 200 and ok['usage']['completion_tokens'] <= 2


def test_a_client_that_leaves_frees_its_rows(servers):
  srv = servers[0]
  before = http_json(srv, 'GET', '/health')[1]['cancelled']
  conn = http.client.HTTPConnection('127.0.0.1', srv.port, timeout=60)
  conn.request('POST', '/v1/completions', json.dumps({'prompt': 'a', 'max_tokens': 60, 'stream': True}),
               {'Content-Type': 'application/json'})
  resp = conn.getresponse()
  assert resp.status == 200 and resp.readline().startswith(b'data: ')
  conn.close()
  t0 = time.time()
  while http_json(srv, 'GET', '/health')[1]['cancelled'] == before and time.time() - t0 < 30:
    time.sleep(0.2)
  assert http_json(srv, 'GET', '/health')[1]['cancelled'] > before
  assert http_json(srv, 'POST', '/v1/completions', {'prompt': 'hi', 'max_tokens': 2})[0] == 200


def test_the_chat_page_is_static_offline_and_open_without_the_key(servers):
  main, keyed = servers
  with urllib.request.urlopen(keyed.base + '/', timeout=60) as r:  # no key: the page asks for it itself
    html, head = r.read().decode(), r.headers
  assert r.status == 200 and head['Content-Type'].startswith('text/html')
  assert "default-src 'none'" in head['Content-Security-Policy'] and "connect-src 'self'" in head['Content-Security-Policy']
  assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', html), 'the page must load nothing from elsewhere'
  assert 'innerHTML' not in html and 'textContent' in html and 'sessionStorage' in html
  assert http_json(keyed, 'POST', '/', {})[0] == 401  # only GET / is open
  code, models = http_json(keyed, 'GET', '/v1/models', headers={'Authorization': f'Bearer {KEY}'})
  assert code == 200 and {k: models['data'][0][k] for k in ('step', 'instruction_tuned', 'context')} == {
      'step': 0, 'instruction_tuned': True, 'context': 64}
  health = http_json(main, 'GET', '/health')[1]
  assert health['step'] == 0 and health['instruction_tuned'] is True and health['context'] == 64


@contextlib.contextmanager
def chromium_page(**kw):
  """(playwright's expect, a page in headless system chromium), or a skip saying what is missing."""
  sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is not installed (the dev extra)')
  exe = next(filter(None, (shutil.which(n) for n in (os.environ.get('MINILLM_CHROMIUM'), 'chromium',
                                                     'chromium-browser', 'google-chrome') if n)), None)
  if not exe:
    pytest.skip('no chromium found (apt-get install chromium, or set MINILLM_CHROMIUM to a chromium binary)')
  with sync_api.sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path=exe, args=['--no-sandbox'])
    try:
      yield sync_api.expect, browser.new_page(**kw)
    finally:
      browser.close()


def test_chat_page_streams_a_reply_in_headless_chromium(servers, tmp_path):
  """Types a message, sends it, waits for the streamed reply; a screenshot stays in tests/artifacts/."""
  main, keyed = servers
  before = http_json(main, 'GET', '/health')[1]['requests']
  with chromium_page(viewport={'width': 900, 'height': 600}) as (expect, page):
    errors = []
    page.on('pageerror', lambda e: errors.append(str(e)))
    page.goto(main.base + '/')
    expect(page.locator('#model')).to_contain_text('step 0', timeout=30_000)
    for field, value in (('#temperature', '0'), ('#max_tokens', '20'), ('#input', 'Hello there')):
      page.fill(field, value)
    page.click('#send')
    meta = page.locator('.msg.assistant .meta').last
    expect(meta).to_contain_text('tokens/s', timeout=60_000)  # the stream ended, usage arrived
    assert page.locator('.msg.user .text').last.text_content() == 'Hello there'
    assert page.locator('.msg.assistant .text').last.text_content(), meta.text_content()
    page.screenshot(path=str(tmp_path / 'chat_page.png'))
    os.makedirs(os.path.join(ROOT, 'tests', 'artifacts'), exist_ok=True)
    shutil.copy(tmp_path / 'chat_page.png', os.path.join(ROOT, 'tests', 'artifacts', 'chat_page.png'))
    page.click('#clear')
    assert page.locator('.msg').count() == 0
    # with --api_key the page asks for the key, keeps it in sessionStorage and sends it as a bearer token
    page.goto(keyed.base + '/')
    expect(page.locator('#keyrow')).to_be_visible(timeout=30_000)
    page.fill('#key', KEY)
    page.dispatch_event('#key', 'change')
    expect(page.locator('#model')).to_contain_text('tiny', timeout=30_000)
    assert page.evaluate("sessionStorage.getItem('minillm_api_key')") == KEY
    assert not errors, errors
  assert http_json(main, 'GET', '/health')[1]['requests'] == before + 1


def test_chat_page_stop_frees_the_rows():
  """Stop in the page aborts the fetch; the server (in process, on a slow fake backend) drops the batch."""
  import uvicorn

  class Slow(Fake):
    def decode(self, st, n_steps):
      time.sleep(0.1)  # 40+ tokens take seconds: time to press Stop mid-reply
      return super().decode(st, n_steps)

  be = Slow()
  sched = Scheduler(be, chunk=1, wait_s=0, log=lambda m: None).start()
  app = create_app(be, sched, 'slow', Defaults(SampleParams(temperature=0.0), 60))
  srv = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=free_port(), log_level='warning'))
  thread = threading.Thread(target=srv.run, daemon=True)
  thread.start()
  try:
    with chromium_page() as (expect, page):
      while not srv.started:
        time.sleep(0.05)
      page.goto(f'http://127.0.0.1:{srv.config.port}/')
      expect(page.locator('#model')).to_contain_text('slow', timeout=30_000)
      page.fill('#input', 'Hi')
      page.click('#send')
      meta = page.locator('.msg.assistant .meta')
      expect(meta).to_have_text('streaming...', timeout=30_000)
      page.click('#stop')
      expect(meta).to_contain_text('stopped', timeout=10_000)
      assert page.locator('.msg.assistant .text').text_content().startswith('a')
      assert page.is_enabled('#send') and not page.is_enabled('#stop')
    t0 = time.time()
    while (sched.stats['cancelled'] == 0 or sched.stats['running']) and time.time() - t0 < 10:
      time.sleep(0.05)
    assert sched.stats['cancelled'] == 1 and sched.stats['running'] == 0, sched.stats
  finally:
    srv.should_exit = True
    sched.stop()
    thread.join(10)


def test_api_key_is_required_on_every_endpoint(servers):
  srv = servers[1]
  for headers in ({}, {'Authorization': 'Bearer wrong'}, {'Authorization': KEY}):
    code, err = http_json(srv, 'GET', '/v1/models', headers=headers)
    assert code == 401 and err['error']['code'] == 'invalid_api_key'
  assert http_json(srv, 'GET', '/health')[0] == 401
  with pytest.raises(openai.AuthenticationError):
    srv.client('wrong').completions.create(model='tiny', prompt='hi', max_tokens=2)
  c = srv.client(KEY)
  assert [m.id for m in c.models.list()] == ['tiny']
  assert c.completions.create(model='tiny', prompt='hi', max_tokens=2).usage.completion_tokens <= 2


# ------------------------------------------------------------------- the scheduler, on a fake backend

class Fake(Backend):
  """Every row writes 'a' until its budget; records each batch's size and sampling."""

  def __init__(self, instruction_tuned: bool = False):
    super().__init__(char_tok(), {'instruction_tuned': instruction_tuned}, 64)
    self.batches = []

  def prefill(self, prompts, budgets, sp, seed, stop_ids):
    self.batches.append((len(prompts), sp.temperature))
    return {'n': [0] * len(prompts), 'budget': list(budgets)}

  def decode(self, st, n_steps):
    st['n'] = [min(n + n_steps, b) for n, b in zip(st['n'], st['budget'])]
    time.sleep(0.01)
    return st

  def poll(self, st):
    a = self.tok.token_to_id('a')
    return [[a] * n for n in st['n']], [n >= b for n, b in zip(st['n'], st['budget'])], False

  def nll(self, tokens_BxT):
    raise NotImplementedError


def test_scheduler_groups_by_sampling_and_limits_the_queue():
  be = Fake()
  sched = Scheduler(be, max_batch=4, max_queue=4, chunk=2, wait_s=0, log=lambda m: None)
  events, greedy, hot = [], SampleParams(temperature=0.0), SampleParams(temperature=0.7)
  jobs = [Job([1, 2], 5, sp, events.append, n=n) for sp, n in ((greedy, 1), (hot, 1), (greedy, 2), (greedy, 2))]
  for j in jobs:
    sched.submit(j)
  with pytest.raises(QueueFull):
    sched.submit(Job([1], 1, greedy, events.append))
  sched.start()
  t0 = time.time()
  while sched.stats['batches'] < 3 and time.time() - t0 < 10:
    time.sleep(0.01)
  sched.stop()
  sched.thread.join(10)
  # the oldest job's group first (3 rows, padded to 4), then the other sampling, then what did not fit
  assert be.batches == [(4, 0.0), (1, 0.7), (2, 0.0)]
  assert sorted(e for e in events if e[0] == 'done') == [('done', 0, 'length', 5)] * 4 + [('done', 1, 'length', 5)] * 2
  assert ''.join(e[2] for e in events if e[0] == 'text') == 'a' * 30
  assert [bucket(r, 16) for r in (1, 2, 3, 5, 16)] == [1, 2, 4, 8, 16] and bucket(9, 12) == 12


def test_scheduler_stops_a_batch_whose_clients_left():
  be = Fake()
  sched = Scheduler(be, chunk=1, wait_s=0, log=lambda m: None)
  events = []

  def emit(ev):
    events.append(ev)
    job.cancel()  # the client leaves after its first text
  job = Job([1], 60, SampleParams(temperature=0.0), emit, n=2)
  sched.run_batch([job])
  assert [e[0] for e in events] == ['text', 'text']  # the first step of both rows, then no more decoding
  assert be.batches == [(2, 0.0)]
  assert sched.stats['cancelled'] == 1


def test_chat_prompt_uses_the_template_or_the_plain_transcript():
  msgs = [{'role': 'user', 'content': 'Hi'}]
  tuned, plain = Fake(True), Fake(False)
  text, stops, stop_ids, lstrip = chat_prompt(tuned, msgs)
  assert text == '<|user|>Hi<|end|><|assistant|>' and stops == [] and not lstrip
  assert tuned.tok.token_to_id('<|end|>') in stop_ids
  text, stops, stop_ids, lstrip = chat_prompt(plain, [{'role': 'user', 'content': [{'type': 'text', 'text': 'Hi'}]}])
  assert text == 'User: Hi\nAssistant:' and stops == ['\nUser:', '\nAssistant:'] and lstrip
  with pytest.raises(ApiError):
    chat_prompt(plain, [{'role': 'user'}])
