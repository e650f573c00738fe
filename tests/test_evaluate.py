"""Evaluation: the guarded execution check, the scoring helpers, perplexity against a direct computation on
both backends, and the CLI writing JSON with every category plus a comparison table and PNG."""
import json
import math
import pathlib
import time

import numpy as np
import pytest
from conftest import run_module
from test_sample import char_tok, config, make_pt, make_workdir, random_flat

from minillm_jax import workdir as wd
from minillm_jax.config import ModelConfig
from minillm_jax.data import tokenizer as toklib
from minillm_jax.evals import code_eval as ce
from minillm_jax.evals import suites as ev
from minillm_jax.inference.jax_backend import JaxBackend
from minillm_jax.inference.torch_backend import TorchBackend
from minillm_jax.model import init_model
from torch_compat import convert
from torch_compat import model as tmodel


def test_execution_check_times_out_an_endless_function():
  t0 = time.time()
  r = ce.run_tests('def f(x):\n    while True:\n        pass\n', 'assert f(1) == 1', timeout=1.0)
  assert r['status'] == 'timeout' and time.time() - t0 < 15


def test_execution_check_pass_fail_and_isolation(tmp_path):
  r = ce.run_tests('def add(a, b):\n    return a + b\n', 'assert add(2, 3) == 5')
  assert r['status'] == 'pass' and isinstance(r['namespaces'], bool)
  r = ce.run_tests('def add(a, b):\n    return a - b\n', 'assert add(2, 3) == 5')
  assert r['status'] == 'fail' and 'AssertionError' in r['detail']
  assert ce.run_tests('def add(a, b)\n    return a\n', '')['status'] == 'syntax_error'
  # runs in a child: its environment changes do not reach this process
  assert ce.run_tests('import os\nos.environ["EVAL_LEAK"] = "1"\n', '')['status'] == 'pass'
  import os
  assert 'EVAL_LEAK' not in os.environ
  # leaving before the tests finish is a failure, not a pass (exit code 0 alone is not enough)
  for body in ('exit()', 'import sys; sys.exit(0)', 'import os; os._exit(0)'):
    assert ce.run_tests(f'def add(a, b):\n    {body}\n', 'assert add(2, 3) == 5')['status'] == 'fail', body
  assert ce.run_tests('def add(a, b):\n    print("x" * 20000)\n    return a + b\n', 'assert add(2, 3) == 5'
                      )['status'] == 'pass'  # its own output plays no part in the verdict
  # the sandbox refuses changes outside its temp dir (tests/test_sandbox.py has the hostile cases); output
  # floods stop at the file-size limit, not in this process's memory
  marker = tmp_path / 'keep'
  marker.write_text('1')
  r = ce.run_tests(f'import os, shutil\nos.remove({str(marker)!r})\n', '')
  assert r['status'] == 'fail' and 'sandbox' in r['detail'] and marker.exists()
  assert ce.run_tests('import sys\nwhile True:\n    sys.stdout.write("x" * 100000)\n', '')['status'] == 'fail'
  r = ce.run_tests('x = bytearray(4 << 30)\n', '')  # over the 1 GiB address-space limit
  assert r['status'] == 'fail' and 'MemoryError' in r['detail']


def test_scoring_helpers():
  assert ce.balanced('x = f(a[1], {"k": "(("})') and not ce.balanced('x = f(a[1]') and not ce.balanced('f(]')
  src = 'def f(x):\n    y = x\n\n    return y\nprint(f(1))\n'
  assert ce.extract_function(src) == 'def f(x):\n    y = x\n\n    return y\n'
  assert ce.extract_function('    def m(self):\n        return 1\n    x = 2') == '    def m(self):\n        return 1\n'
  assert ev.distinct_n(['a b a b'], 1) == 0.5 and ev.distinct_n(['a b', 'a c'], 2) == 1.0
  assert ev.repetition_rate('a b c d a b c d') == pytest.approx(1 / 5)
  assert ev.repetition_rate('one two three four five') == 0.0


def test_perplexity_matches_a_direct_computation_on_both_backends():
  tok = char_tok()
  c = config(tok.vocab_size, 'rope', 16)
  flat = random_flat(c)
  m = tmodel.GPT(c.to_dict())
  m.load_state_dict(convert.flax_to_torch(c, flat, 'pt'))
  jb, tb = JaxBackend(convert.load_into_flax(c, flat), tok), TorchBackend(m.eval(), tok)
  text = 'to be or not to be: that is the question, said the quick brown fox'
  ids = tok.encode(text)
  r = ev.perplexity(jb, ev.tokens_and_bytes(tok, [text]), batch=2)
  want = []
  for i in range(0, len(ids) - 1, 16):  # windows of 17 tokens, stride 16
    w = np.asarray([ids[i:i + 17]])
    logits = np.asarray(jb.model(w[:, :-1]))[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    want += [-logp[t, w[0, t + 1]] for t in range(w.shape[1] - 1)]
  assert r['tokens'] == len(ids) - 1 == len(want)
  assert r['nll'] == pytest.approx(np.mean(want), rel=1e-4)
  assert r['perplexity'] == pytest.approx(math.exp(np.mean(want)), rel=1e-4)
  assert r['bits_per_byte'] == pytest.approx(np.sum(want) / math.log(2) / len(text[1:].encode()), rel=1e-4)
  assert ev.perplexity(tb, ev.tokens_and_bytes(tok, [text]), batch=2)['nll'] == pytest.approx(r['nll'], rel=1e-4)
  # bytes are the text's own: a character the tokenizer lacks ('<|unk|>') or one split across byte-level BPE
  # tokens counts its UTF-8 bytes once, whatever the tokens decode to
  for t in (tok, toklib.train_bpe(['x'], toklib.BPE_MIN_VOCAB)):  # bytes only: multi-byte chars split
    for doc in ('café naïve 日本語 🙂 ok', 'x'):
      got, nb = ev.tokens_and_bytes(t, [doc, doc], eot=True)
      assert got == (t.encode(doc) + [t.eot_id]) * 2 and sum(nb) == 2 * len(doc.encode()) and nb[-1] == 0


def test_cli_writes_json_with_every_category_and_compares_runs(tmp_path):
  a = make_workdir(tmp_path / 'base', seed=0)
  pt = make_pt(tmp_path / 'later.pt', seed=1)
  text = tmp_path / 'notes.txt'
  text.write_text('to be or not to be, that is the question\n' * 20)
  out = tmp_path / 'cmp' / 'eval.json'
  r = run_module('minillm_jax.evaluate', f'--workdir={a}', f'--ckpt={pt}', '--max_new_tokens=12',
                 '--max_eval_tokens=300', f'--out={out}', '--exec_timeout=2', timeout=600)
  assert r.returncode == 0, r.stderr
  d = json.loads(out.read_text())
  assert [x['backend'] for x in d['runs']] == ['jax', 'torch'] and d['suites'] == list(ev.DEFAULT_SUITES)
  assert [x['weights'] for x in d['runs']] == ['float32', 'float32']
  own, other = d['runs']  # generated code runs for a run trained here, not for someone else's .pt
  assert set(own['code']['categories']) == set(ce.CODE_CATEGORIES) and own['code']['executed']
  assert set(other['code']['categories']) == set(ce.CODE_CATEGORIES) - {'execution'}
  assert not other['code']['executed'] and f'execution skipped for --ckpt={pt}' in r.stderr
  assert {x['status'] for x in other['code']['details']['execution']} == {'skipped'}
  for run in d['runs']:
    assert all(0 <= v <= 1 for v in run['code']['categories'].values()) and 0 <= run['code']['overall'] <= 1
    assert run['perplexity']['data'] == 'val' and run['perplexity']['perplexity'] > 1
    assert len(run['text']['samples']) == len(ev.TEXT_PROMPTS) and 0 <= run['text']['distinct_2'] <= 1
    assert len(run['code']['details']['execution']) == len(ce.EXEC)
  assert 'base@0' in r.stdout and 'later.pt' in r.stdout and 'bpb' in r.stdout
  png = out.with_suffix('.png')
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  r = run_module('minillm_jax.evaluate', f'--ckpt={pt}', '--suites=code', '--execute', '--max_new_tokens=12',
                 f'--out={tmp_path}/x.json', '--exec_timeout=2', timeout=600)
  run = json.loads((tmp_path / 'x.json').read_text())['runs'][0]
  assert r.returncode == 0 and run['code']['executed'] and 'execution skipped' not in r.stderr, r.stderr
  assert set(run['code']['categories']) == set(ce.CODE_CATEGORIES)
  assert {x['status'] for x in run['code']['details']['execution']} <= {'pass', 'fail', 'timeout', 'error'}
  r = run_module('minillm_jax.evaluate', f'--workdir={a}', '--suites=ppl', f'--text={text}', '--backend=torch',
                 f'--out={tmp_path}/t.json')
  assert r.returncode == 0, r.stderr
  assert json.loads((tmp_path / 't.json').read_text())['runs'][0]['perplexity']['data'] == str(text)
  for args, msg in ((['--suites=ppl,bogus', f'--workdir={a}'], 'suites'), ([], 'nothing to evaluate'),
                    ([f'--workdir={tmp_path}/none'], 'does not exist'),
                    # checked before the first run is evaluated, so no work is thrown away
                    ([f'--workdir={a}', f'--workdir={tmp_path}/none'], f'--workdir={tmp_path}/none does not exist'),
                    ([f'--workdir={a}', f'--out={text}/e.json'], f'cannot write {text}/e.json'),
                    ([f'--workdir={a}', f'--out={tmp_path}'], 'it is a directory'),
                    ([f'--workdir={a}', '--suites=text', f'--plot={tmp_path}/p.png'], 'has none of them')):
    r = run_module('minillm_jax.evaluate', *args)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_keeps_finished_runs_when_a_later_source_fails(tmp_path):
  """Sources are evaluated in turn and eval.json is written after each: a checkpoint that turns out unreadable
  only when its turn comes (it exists, so the up-front checks pass) loses nothing already done."""
  a = make_workdir(tmp_path / 'base', seed=0)
  bad = tmp_path / 'broken.pt'
  bad.write_bytes(b'not a checkpoint')
  out = tmp_path / 'eval.json'
  r = run_module('minillm_jax.evaluate', f'--workdir={a}', f'--ckpt={bad}', '--suites=ppl', '--max_eval_tokens=100',
                 f'--out={out}')
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
  assert last.endswith(f'(the 1 run(s) evaluated before --ckpt={bad} are saved in {out})'), r.stderr
  runs = json.loads(out.read_text())['runs']
  assert len(runs) == 1 and runs[0]['perplexity']['perplexity'] > 1
  # --out replaces an earlier evaluate result, never another file (here the run's own config.json)
  cfg = pathlib.Path(a, 'config.json')
  before = cfg.read_bytes()
  r = run_module('minillm_jax.evaluate', f'--workdir={a}', '--suites=ppl', f'--out={cfg}')
  assert r.returncode == 2 and cfg.read_bytes() == before, r.stderr
  assert r.stderr.strip().splitlines()[-1] == (f'error: --out={cfg} exists and is not an evaluate result; refusing '
                                               'to overwrite it (pick a new path)'), r.stderr


def test_only_runs_trained_here_execute_generated_code_by_default(tmp_path, monkeypatch):
  run = tmp_path / 'run'
  (run / 'checkpoints').mkdir(parents=True)
  assert wd.own_run(str(run)) and not wd.own_run(str(tmp_path))
  wd.mark_imported(str(run), {'imported_from': '/somewhere/else.pt'})  # what torch_compat.import_ckpt writes
  assert not wd.own_run(str(run))
  # execute=False: no generated code reaches the sandbox, and the score leaves the category out
  monkeypatch.setattr(ce, 'run_tests', lambda *a, **k: pytest.fail('executed generated code'))
  tok = toklib.build_char(['def f(x):\n    return x + 1\n'])
  c = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, d_model=16, d_ff=32, block_size=64,
                  max_positions=64)
  res = ce.code_suite(JaxBackend(init_model(c, 0), tok), max_new=4, execute=False)
  assert 'execution' not in res['categories'] and not res['executed']
  assert res['overall'] == pytest.approx(np.mean(list(res['categories'].values())))
