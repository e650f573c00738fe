"""Sampling: KV-cache greedy == full forward, no recompiles, filters, stops, streaming, crop, torch == JAX,
the bench hooks and the generate CLI. Tiny random models, CPU."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import run_module

from minillm_jax import config as config_lib
from minillm_jax.config import ModelConfig
from minillm_jax.data import tokenizer as toklib
from minillm_jax.inference import jax_backend as sample
from minillm_jax.inference import text as gen
from minillm_jax.inference.backend import SampleParams, cache_len
from minillm_jax.inference.jax_backend import JaxBackend
from minillm_jax.inference.torch_backend import TorchBackend, torch_process_logits
from minillm_jax.training import checkpoint
from torch_compat import convert, pt
from torch_compat import model as tmodel

TEXT = ('Once upon a time, to be or not to be: that is the question.\n'
        'def quick_sort(collection):\n    """Sort."""\n    return [x for x in collection if x < 0]\n'
        'abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 !?')
GREEDY = SampleParams(temperature=0.0)


def char_tok() -> toklib.Tok:
  return toklib.build_char([TEXT])


def config(vocab: int, pos: str = 'learned', block: int = 48) -> ModelConfig:
  return ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, d_model=32, d_ff=64, block_size=block,
                     max_positions=block, pos=pos)


def random_flat(c: ModelConfig, seed: int = 0) -> dict:
  """Parameters at a scale that separates the logits, so greedy decoding has no near-ties across frameworks."""
  rng = np.random.default_rng(seed)
  return {name: ((1.0 if name.endswith('scale') else 0.0) + rng.normal(0, 0.1 if name.endswith(('scale', 'bias'))
                 else 0.3, shape)).astype(np.float32) for name, shape in convert.flax_shapes(c).items()}


def make_workdir(path, instruction_tuned: bool = False, pos: str = 'learned', block: int = 64, seed: int = 0) -> str:
  """A run directory with a step-0 checkpoint of random weights and a char tokenizer (no training)."""
  tok = char_tok()
  c = config(tok.vocab_size, pos, block)
  model = convert.load_into_flax(c, random_flat(c, seed))
  checkpoint.init_workdir(str(path), None, c, model, tok.to_json_str(), {'instruction_tuned': instruction_tuned})
  return str(path)


def make_pt(path, instruction_tuned: bool = False, seed: int = 0) -> str:
  tok = char_tok()
  c = config(tok.vocab_size, 'learned', 64)
  meta = {'instruction_tuned': instruction_tuned, 'config': config_lib.to_plain(config_lib.default_config())}
  pt.save_pt(str(path), c, random_flat(c, seed), tok.to_json_str(), meta)  # as torch_compat.export writes
  return str(path)


@pytest.fixture(scope='module', params=['learned', 'rope'])
def pair(request):
  tok = char_tok()
  c = config(tok.vocab_size, request.param)
  flat = random_flat(c)
  m = tmodel.GPT(c.to_dict())
  m.load_state_dict(convert.flax_to_torch(c, flat, 'pt'))
  return JaxBackend(convert.load_into_flax(c, flat), tok), TorchBackend(m.eval(), tok)


def prompts(vocab: int, lengths=(3, 11, 30), seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in lengths]


def test_greedy_cache_equals_full_forward_argmax(pair):
  jb, _ = pair
  ps = prompts(jb.vocab)  # different lengths in one batch
  out = jb.complete_ids(ps, 14, GREEDY)
  # the full forward without a cache, over a fixed-size buffer (one compile; causal, so the zero tail after
  # the sequence does not change the logits read at its end)
  forward = jax.jit(lambda x: jb.model(x))
  for p, o in zip(ps, out):
    buf = np.zeros((1, jb.context), np.int32)
    buf[0, :len(p)] = p
    for t in range(len(p), len(p) + 14):
      buf[0, t] = int(jnp.argmax(forward(jnp.asarray(buf))[0, t - 1]))
    assert o == buf[0, len(p):len(p) + 14].tolist()


def test_the_kv_cache_is_sized_to_the_batch():
  """A batch decodes in the smallest power-of-two cache (>= 64) that holds its longest prompt plus budget, and
  makes the tokens a full-context cache makes, on either backend."""
  tok = char_tok()
  c = config(tok.vocab_size, 'rope', block=256)
  flat = random_flat(c)
  m = tmodel.GPT(c.to_dict())
  m.load_state_dict(convert.flax_to_torch(c, flat, 'pt'))
  jb, tb = JaxBackend(convert.load_into_flax(c, flat), tok), TorchBackend(m.eval(), tok)
  ps = prompts(jb.vocab)  # 3, 11 and 30 tokens
  assert [cache_len(ps, [b] * 3, 256) for b in (0, 14, 34, 35, 98, 99, 10**6)] == [64, 64, 64, 128, 128, 256, 256]
  for be in (jb, tb):
    st = be.prefill(ps, [14] * 3, GREEDY, 0, [])
    assert tuple(st['seq'].shape) == (3, 64)
    full = be.decode(be.prefill(ps, [200] * 3, GREEDY, 0, []), 60)  # a 256-position cache, 60 steps
    assert tuple(full['seq'].shape) == (3, 256)
    assert [n[:14] for n in be.poll(full)[0]] == be.complete_ids(ps, 14, GREEDY)


def test_nothing_recompiles_per_prompt_length_or_setting(pair):
  """Once each prefill chunk (16, 32, and the 48-token context for 64) has run, other prompt lengths and
  sampling settings compile nothing."""
  jb, _ = pair
  assert [sample.prefill_chunk(n, 48) for n in (1, 16, 17, 32, 33, 47)] == [16, 16, 32, 32, 48, 48]
  assert [sample.prefill_chunk(n, 1024) for n in (15, 31, 63, 64, 700)] == [16, 32, 64, 64, 64]
  for n in (5, 20, 40):
    jb.complete_ids(prompts(jb.vocab, (n, n + 1)), 4, GREEDY)
  sizes = sample._prefill._cache_size(), sample._run._cache_size()
  jb.complete_ids(prompts(jb.vocab, (2, 33), seed=1), 9, SampleParams(0.7, 5, 0.9, 1.3, 8), seed=3)
  jb.complete_ids(prompts(jb.vocab, (17, 1), seed=2), 70, SampleParams(1.0))  # slides past the context
  jb.complete_ids(prompts(jb.vocab, (30, 31), seed=4), 5, GREEDY)
  assert (sample._prefill._cache_size(), sample._run._cache_size()) == sizes


def test_torch_backend_greedy_equals_jax(pair):
  jb, tb = pair
  ps = prompts(jb.vocab)
  for sp in (GREEDY, SampleParams(temperature=0.0, repetition_penalty=1.5, repetition_window=6)):
    a = jb.complete_ids(ps, 70, sp)  # 70 > context: both slide the window the same way
    assert a == tb.complete_ids(ps, 70, sp)
    assert [len(x) for x in a] == [70] * 3


def test_load_runs_hf_directories_and_pt_files_on_either_backend(tmp_path):
  from minillm_jax.inference import load as backend
  from torch_compat import hf
  tok = char_tok()
  c = config(tok.vocab_size, 'learned', 64)
  flat = random_flat(c)
  hf.save_hf(str(tmp_path / 'hf'), c, flat, tok.to_json_str(), {'step': 5})
  ref = JaxBackend(convert.load_into_flax(c, flat), tok).complete_ids([[3, 4, 5]], 20, GREEDY)
  for src, kind in ((str(tmp_path / 'hf'), 'auto'), (str(tmp_path / 'hf'), 'jax'), (make_pt(tmp_path / 'm.pt'), 'torch')):
    be = backend.load(ckpt=src, backend=kind)
    assert be.name == ('torch' if kind == 'auto' else kind) and be.context == 64
    assert be.complete_ids([[3, 4, 5]], 20, GREEDY) == ref


def test_top_k_1_equals_greedy(pair):
  for be in pair:
    ps = prompts(be.vocab, (4, 9))
    assert be.complete_ids(ps, 12, SampleParams(temperature=1.3, top_k=1), seed=5) == be.complete_ids(ps, 12, GREEDY)


def _sp(**kw) -> dict:
  d = {'temperature': 1.0, 'top_k': 0, 'top_p': 1.0, 'penalty': 1.0, 'window': 4}
  d.update(kw)
  return d


def _jax_filter(logits, seq, pos, **kw):
  sp = {k: jnp.asarray(v) for k, v in _sp(**kw).items()}
  return np.asarray(sample.process_logits(jnp.asarray(logits), jnp.asarray(seq), jnp.int32(pos), sp))


def _torch_filter(logits, seq, pos, **kw):
  return torch_process_logits(torch.tensor(logits), torch.tensor(seq), pos, _sp(**kw)).numpy()


@pytest.mark.parametrize('filt', [_jax_filter, _torch_filter])
def test_top_p_keeps_the_smallest_set_reaching_p(filt):
  logits = np.log(np.array([[0.05, 0.5, 0.15, 0.3]], np.float32))
  seq = np.zeros((1, 4), np.int64)
  kept = lambda p: set(np.flatnonzero(np.isfinite(filt(logits, seq, 0, top_p=p))[0]).tolist())
  assert kept(0.5) == {1}
  assert kept(0.8) == {1, 3}         # 0.5 + 0.3 reaches 0.8 exactly
  assert kept(0.81) == {1, 3, 2}
  assert kept(0.1) == {1}            # never empty
  assert kept(1.0) == {0, 1, 2, 3}
  assert set(np.flatnonzero(np.isfinite(filt(logits, seq, 0, top_k=2, top_p=0.99))[0])) == {1, 3}


@pytest.mark.parametrize('filt', [_jax_filter, _torch_filter])
def test_repetition_penalty_lowers_repeated_tokens_in_the_window(filt):
  logits = np.array([[2.0, -1.0, 3.0, 0.5, -2.0, 1.0]], np.float32)
  seq = np.array([[5, 0, 1, 3, 0, 0]], np.int64)  # window 3 before pos 4: tokens 0, 1, 3 (5 is too old)
  out = filt(logits, seq, 4, penalty=2.0, window=3)[0]
  np.testing.assert_allclose(out, [1.0, -2.0, 3.0, 0.25, -2.0, 1.0])
  np.testing.assert_allclose(filt(logits, seq, 4, penalty=1.0, window=3)[0], logits[0])


def test_stop_strings_and_stop_tokens_end_the_text(pair):
  jb, _ = pair
  ids = gen.encode_prompt(jb, 'to be')
  full = gen.complete(jb, [ids], 30, GREEDY, stop_ids=[])[0]
  stop = full[6:8]
  cut = full[:full.find(stop)]
  assert gen.complete(jb, [ids], 30, GREEDY, stop=[stop], stop_ids=[])[0] == cut
  assert ''.join(gen.stream(jb, ids, 30, GREEDY, stop=[stop], stop_ids=[])) == cut
  first = jb.complete_ids([ids], 30, GREEDY)[0]
  tok_stop = first[4]
  stopped = jb.complete_ids([ids], 30, GREEDY, stop_ids=[tok_stop])[0]
  assert stopped == first[:first.index(tok_stop) + 1]  # the row ends at the stop token
  assert gen.complete(jb, [ids], 30, GREEDY, stop_ids=[tok_stop])[0] == jb.tok.decode(stopped[:-1])


def test_text_stream_holds_back_partial_stop_strings_and_multibyte():
  tok = toklib.train_bpe(['x'], toklib.BPE_MIN_VOCAB)  # bytes only: a multi-byte character spans several tokens
  be = type('B', (), {'tok': tok})()
  text = 'héllo 🎉 世界 END naïve'
  ids = tok.encode(text)
  assert len(ids) == len(text.encode())
  ts = gen.TextStream(be, stop=[' END'])
  pieces = [ts.feed(i) for i in ids]
  assert ''.join(pieces) + ts.finish() == 'héllo 🎉 世界'
  assert '\ufffd' not in ''.join(pieces) and '' in pieces  # incomplete characters are held back
  ts = gen.TextStream(be, stop_ids=[ids[3]])
  assert ''.join(ts.feed(i) for i in ids) + ts.finish() == 'hé'


def test_streaming_concatenates_to_the_full_decode(pair):
  jb, tb = pair
  sp = SampleParams(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.1)
  ids = gen.encode_prompt(jb, 'Once upon')
  for be in (jb, tb):
    pieces = list(gen.stream(be, ids, 80, sp, seed=7, stop_ids=[]))
    assert len(pieces) > 5
    assert ''.join(pieces) == gen.complete(be, [ids], 80, sp, seed=7, stop_ids=[])[0]
    with_eot = ''.join(gen.stream(be, ids, 80, sp, seed=7))  # stops at end-of-text, the same way
    assert with_eot == gen.complete(be, [ids], 80, sp, seed=7)[0] and ''.join(pieces).startswith(with_eot)


def test_long_prompt_is_cropped_from_the_left_with_a_warning(pair, capsys):
  jb, _ = pair
  long = TEXT * 3
  ids = gen.encode_prompt(jb, long)
  assert len(ids) == jb.context - 1 and jb.tok.decode(ids) == long[-(jb.context - 1):]
  assert 'longer than the context' in capsys.readouterr().err
  assert len(jb.complete_ids([ids], 5, GREEDY)[0]) == 5


def test_legacy_generate_and_bench_hooks():
  c = config(40, 'rope', 32)
  model = convert.load_into_flax(c, random_flat(c))
  out = sample.generate(model, [1, 2, 3], 10, dataclasses.replace(GREEDY), num_samples=2)
  assert out.shape == (2, 10) and (out[0] == out[1]).all()
  d = sample.measure_decode(model, batch=2, prompt_len=4, new_tokens=8)
  n = sample.measure_naive(model, batch=2, prompt_len=4, new_tokens=8, timed_tokens=4)
  for r in (d, n):
    assert r['tokens_per_s'] > 0 and r['ttft_s'] > 0 and r['batch'] == 2


def test_generate_cli(tmp_path):
  w = make_workdir(tmp_path / 'run')
  pt = make_pt(tmp_path / 'm.pt')
  r = run_module('minillm_jax.generate', f'--workdir={w}', '--prompt=to be', '--max_new_tokens=12',
                 '--temperature=0')
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith('to be') and 'jax backend' in r.stderr
  r = run_module('minillm_jax.generate', f'--ckpt={pt}', '--prompt=Once', '--num_samples=2', '--max_new_tokens=8',
                 '--top_k=5', '--seed=3')
  assert r.returncode == 0, r.stderr
  assert r.stdout.count('--- sample') == 2 and 'torch backend' in r.stderr
  r = run_module('minillm_jax.generate', 'demo', f'--workdir={w}', '--backend=torch', '--max_new_tokens=6')
  assert r.returncode == 0, r.stderr
  from minillm_jax.generate import DEMO_PROMPTS
  assert all(f'=== {p} ===' in r.stdout for p in DEMO_PROMPTS)
  for args, msg in (([f'--workdir={tmp_path}/nope', '--prompt=x'], 'does not exist'),
                    ([f'--workdir={w}', '--prompt='], 'empty'),
                    ([f'--workdir={w}', '--prompt=x', '--temperature=-1'], 'temperature'),
                    ([f'--workdir={w}', '--prompt=x', '--step=99'], 'no checkpoint for step 99'),
                    ([f'--ckpt={pt}', '--prompt=x', '--step=3'], 'run directory'),
                    ([f'--workdir={w}', '--prompt=x', '--stop=\\x'], "--stop='\\\\x': bad escape"),
                    ([f'--workdir={w}', '--prompt=x', '--max_new_tokens=3000000000'], 'must be in [1, 2^31)'),
                    ([f'--workdir={w}', '--prompt=x', '--repetition_window=3000000000'], 'must be in [1, 2^31)')):
    r = run_module('minillm_jax.generate', *args)
    assert r.returncode == 2 and r.stderr.strip().startswith('error:') and msg in r.stderr, (args, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
