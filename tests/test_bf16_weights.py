"""Decoding with weights stored in bfloat16 (`--weights=bfloat16`): the kernel (cpu_matmul.gemv_bf16), the
model's dispatch, and that the backend computes exactly the float32 model on bfloat16-rounded weights."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_module
from test_sample import GREEDY, char_tok, config, make_workdir, random_flat

from minillm_jax import model
from minillm_jax.config import UserError
from minillm_jax.evals import suites as evaluate
from minillm_jax.inference import jax_backend as sample
from minillm_jax.inference import load as backend
from minillm_jax.inference.jax_backend import JaxBackend
from minillm_jax.kernels import matmul as cpu_matmul
from torch_compat import convert


@pytest.fixture(autouse=True)
def kernel_for_small_matrices(monkeypatch):
  """These tests' models are small; the kernel takes their matrices too (as it takes `tiny`'s)."""
  monkeypatch.setattr(cpu_matmul, 'GEMV_MIN_WEIGHTS', 0)


def rounded(x):  # float32 values of the bfloat16 rounding
  return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize('M,K,N', [(1, 512, 1536), (3, 70, 33), (16, 7, 130), (2, 2048, 40)])
@pytest.mark.parametrize('tb', [False, True])
def test_kernel_matches_float64_on_rounded_weights(M, K, N, tb):
  """Both layouts, any M <= 16, K off the 4-row unroll and N off the 32-column block, the contraction whole
  (K < 128) or split over the pool's threads with partial sums added: x @ w with w widened exactly, float32
  accumulation."""
  assert cpu_matmul.bf16_available()
  r = np.random.default_rng(M * K + N)
  x = r.standard_normal((M, K)).astype(np.float32)
  w = jnp.asarray(r.standard_normal((N, K) if tb else (K, N)), jnp.bfloat16)
  got = np.asarray(jax.jit(cpu_matmul.gemv_bf16, static_argnums=2)(x, w, tb))
  w64 = rounded(w)
  assert got.shape == (M, N) and got.dtype == np.float32
  np.testing.assert_allclose(got, x.astype(np.float64) @ (w64.T if tb else w64), rtol=0, atol=1e-5 * K ** 0.5)


def test_project_dispatch(monkeypatch):
  """bfloat16 weights under float32 math: up to GEMV_MAX_ROWS rows of at least GEMV_MIN_WEIGHTS-weight
  matrices (`tiny`'s, not `shakespeare_char`'s) on the kernel; more rows (a prefill chunk) or smaller matrices
  widened for a float32 dot; float32 weights and bfloat16 math never reach the kernel."""
  monkeypatch.undo()
  assert 128 * 512 < cpu_matmul.GEMV_MIN_WEIGHTS <= 512 * 512
  w = jnp.ones((512, 512), jnp.bfloat16)
  hlo = lambda x, w, dt: jax.jit(lambda x, w: model.project(x, w, dt)).lower(x, w).as_text()
  assert 'minillm_gemv_bf16' in hlo(jnp.ones((cpu_matmul.GEMV_MAX_ROWS, 512)), w, jnp.float32)
  assert 'minillm_gemv_bf16' not in hlo(jnp.ones((cpu_matmul.GEMV_MAX_ROWS + 1, 512)), w, jnp.float32)
  assert 'minillm_gemv_bf16' not in hlo(jnp.ones((1, 512)), w[:, :511], jnp.float32)
  assert 'minillm_gemv_bf16' not in hlo(jnp.ones((1, 512)), w.astype(jnp.float32), jnp.float32)
  assert 'minillm_gemv_bf16' not in hlo(jnp.ones((1, 512)), w, jnp.bfloat16)


@pytest.mark.parametrize('tied', [False, True])
def test_backend_is_the_float32_model_on_rounded_weights(tied):
  """Logits of prefill and of every decode step, and 40 greedy tokens at batch 1 and 3, equal those of the
  float32 model whose weights were rounded to bfloat16 beforehand (norm scales and an untied embedding stay
  float32); the matrices are really stored in bfloat16."""
  tok = char_tok()
  c = dataclasses.replace(config(tok.vocab_size, 'rope', 64), tie_embeddings=tied)
  flat = random_flat(c, seed=1)
  names = [n for n in flat if n.endswith('kernel') or (tied and n == 'wte')]
  ref = JaxBackend(convert.load_into_flax(c, {n: (rounded(v).astype(np.float32) if n in names else v)
                                              for n, v in flat.items()}), tok)
  be = JaxBackend(convert.load_into_flax(c, flat), tok, weights='bfloat16')
  stored = {'/'.join(map(str, k)): v.dtype for k, v in jax.tree_util.tree_flatten_with_path(be.params)[0]}
  assert sum(d == jnp.bfloat16 for d in stored.values()) == len(names) > 0, stored
  seq = np.random.default_rng(2).integers(0, c.vocab_size, (3, 50))
  np.testing.assert_allclose(be.nll(seq), ref.nll(seq), rtol=2e-5, atol=2e-5)
  for prompts in ([[5, 6, 7, 8]], [[1, 2], [3, 4, 5, 6, 7], list(range(9, 30))]):
    a = ref.complete_ids(prompts, 40, GREEDY)
    b = be.complete_ids(prompts, 40, GREEDY)
    assert a == b
  st_a = ref.prefill([[5, 6, 7]], [8], GREEDY, 0, ())
  st_b = be.prefill([[5, 6, 7]], [8], GREEDY, 0, ())
  for _ in range(4):
    np.testing.assert_allclose(st_b['logits'], st_a['logits'], rtol=1e-5, atol=1e-5)
    st_a, st_b = ref.decode(st_a, 1), be.decode(st_b, 1)


def test_without_the_kernel_same_tokens(monkeypatch):
  """No compiler: the rounded weights are widened for XLA's dots; same greedy tokens."""
  tok = char_tok()
  c = config(tok.vocab_size, 'rope', 64)
  flat = random_flat(c, seed=3)
  with_kernel = JaxBackend(convert.load_into_flax(c, flat), tok, weights='bfloat16').complete_ids([[4, 5]], 30,
                                                                                                   GREEDY)
  monkeypatch.setattr(cpu_matmul, 'bf16_available', lambda: False)
  be = JaxBackend(convert.load_into_flax(c, flat), tok, weights='bfloat16')
  assert 'minillm_gemv_bf16' not in jax.jit(lambda x, w: model.project(x, w, jnp.float32)).lower(
      jnp.ones((1, 8)), jnp.ones((8, 4), jnp.bfloat16)).as_text()
  assert be.complete_ids([[4, 5]], 30, GREEDY) == with_kernel


def test_bad_weights_values(tmp_path):
  w = make_workdir(tmp_path / 'run')
  with pytest.raises(UserError, match="--weights='float16': use float32 or bfloat16"):
    backend.load(workdir=w, weights='float16')
  with pytest.raises(UserError, match='JAX backend option; add --backend=jax'):
    backend.load(workdir=w, backend='torch', weights='bfloat16')
  be = backend.load(workdir=w, weights='bfloat16')
  assert 'bfloat16 weights' in be.describe()
  (tmp_path / 't.txt').write_text('to be or not to be\n' * 8)
  assert evaluate.evaluate(be, ['ppl'], str(tmp_path / 't.txt'))['weights'] == 'bfloat16'  # recorded in eval.json
  r = run_module('minillm_jax.generate', f'--workdir={w}', '--prompt=to be', '--max_new_tokens=12',
                 '--temperature=0', '--weights=bfloat16')
  assert r.returncode == 0 and r.stdout.startswith('to be') and 'bfloat16 weights' in r.stderr, r.stderr
  r = run_module('minillm_jax.generate', f'--workdir={w}', '--prompt=x', '--weights=int8')
  assert r.returncode != 0 and 'int8' in r.stderr and len(r.stderr.strip().splitlines()) <= 3, r.stderr


def test_measure_decode_with_bf16_weights():
  tok = char_tok()
  c = config(tok.vocab_size, 'rope', 64)
  m = convert.load_into_flax(c, random_flat(c))
  d = sample.measure_decode(m, batch=1, prompt_len=4, new_tokens=8, weights='bfloat16')
  assert d['tokens_per_s'] > 0
