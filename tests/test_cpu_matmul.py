"""The OpenBLAS matmul (cpu_matmul.cc) the model's `mm` takes for float32 on CPU: products, gradients,
dispatch, the split over several devices, and the fallback without a compiler."""
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_module

from minillm_jax.kernels import matmul as cpu_matmul
from minillm_jax.model import mm


@pytest.mark.parametrize('M,K,N', [(64, 1, 1), (65, 7, 3), (200, 33, 130), (256, 512, 96)])
@pytest.mark.parametrize('ta,tb', [(False, False), (False, True), (True, False), (True, True)])
def test_products_match_float64(M, K, N, ta, tb):
  """Every operand layout (transposes are read in place), shapes off any block size; built here, as in CI."""
  assert cpu_matmul.available()
  r = np.random.default_rng(M + K + N)
  a64, b64 = r.standard_normal((M, K)), r.standard_normal((K, N))
  a, b = (a64.T if ta else a64).astype(np.float32), (b64.T if tb else b64).astype(np.float32)
  got = np.asarray(jax.jit(cpu_matmul.matmul, static_argnums=(2, 3))(a, b, ta, tb))
  assert got.shape == (M, N) and got.dtype == np.float32
  np.testing.assert_allclose(got, a64 @ b64, rtol=0, atol=2e-6 * K ** 0.5 * 8)


def test_mm_on_blas_matches_xla_values_and_gradients(monkeypatch):
  """mm on float32 products of at least MIN_MACS multiply-adds (lowered here) runs forward and both gradients on OpenBLAS: the same function as XLA's
  dots, to float32 rounding."""
  monkeypatch.setattr(cpu_matmul, 'MIN_MACS', 96 * 40 * 24)
  a = jax.random.normal(jax.random.key(0), (96, 40))
  b = jax.random.normal(jax.random.key(1), (40, 24))
  f = lambda a, b: jnp.sin(mm(a, b)).sum()
  g = lambda a, b: jnp.sin(jnp.dot(a, b, precision='highest')).sum()
  jaxpr = str(jax.make_jaxpr(jax.grad(f, (0, 1)))(a, b))
  assert jaxpr.count('custom_partitioning') == 3, jaxpr  # forward, input gradient, weight gradient
  np.testing.assert_allclose(f(a, b), g(a, b), rtol=1e-5)
  for x, y in zip(jax.grad(f, (0, 1))(a, b), jax.grad(g, (0, 1))(a, b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=5e-5)


def test_dispatch():
  """OpenBLAS from MIN_MACS multiply-adds (a `tiny` layer: 4096 x 512 x 512 per device and up); smaller
  products (`shakespeare_char`, decoding) and bfloat16 stay on XLA."""
  f32, bf16 = (lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)), (lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16))
  assert cpu_matmul.MIN_MACS <= 4096 * 512 * 512
  assert cpu_matmul.MIN_MACS > 768 * 128 * 512
  assert cpu_matmul.supported(f32(cpu_matmul.MIN_MACS // 256, 16), f32(16, 16))
  assert not cpu_matmul.supported(f32(cpu_matmul.MIN_MACS // 256 - 1, 16), f32(16, 16))
  assert not cpu_matmul.supported(bf16(4096, 512), bf16(512, 512))
  a, b = jnp.ones((64, 8)), jnp.ones((8, 4))
  assert 'custom_partitioning' not in str(jax.make_jaxpr(mm)(a, b))


def test_decoding_batches_take_blas_and_decode_like_one_row():
  """Inside cpu_matmul.decoding() (the jitted KV-cache steps), float32 products of DECODE_MIN_ROWS rows or more
  take OpenBLAS at any size; fewer rows, or outside it (training, prefill), stay as before. A batch of 8
  greedy rows then makes the tokens each row makes alone (one row: XLA's dots)."""
  from flax import nnx

  from minillm_jax.config import ModelConfig
  from minillm_jax.inference import jax_backend
  from minillm_jax.inference.backend import SampleParams, sp_arrays
  from minillm_jax.inference.jax_backend import JaxBackend
  from minillm_jax.model import GPT
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  rows = cpu_matmul.DECODE_MIN_ROWS
  assert not cpu_matmul.decode_supported(f32(rows, 16), f32(16, 16))  # not decoding
  with cpu_matmul.decoding():
    assert cpu_matmul.decode_supported(f32(rows, 16), f32(16, 16))
    assert not cpu_matmul.decode_supported(f32(rows - 1, 16), f32(16, 16))
    with cpu_matmul.decoding():
      pass
    assert cpu_matmul.decode_supported(f32(rows, 16), f32(16, 16))  # nesting restores, not clears
  assert not cpu_matmul.decode_supported(f32(rows, 16), f32(16, 16))
  for pos, tied in (('learned', True), ('rope', False)):  # the tied head reads the embedding in place (tb)
    c = ModelConfig(vocab_size=61, n_layer=2, n_head=2, n_kv_head=2, d_model=32, d_ff=64, block_size=128,
                    max_positions=128, pos=pos, tie_embeddings=tied)
    gdef, state = nnx.split(GPT(c, nnx.Rngs(params=0)))
    # matrices 15x their init scale: logits far apart, so greedy has no near-ties across the two products
    be = JaxBackend(nnx.merge(gdef, jax.tree.map(lambda x: x * 15 if x.ndim == 2 else x, state)))
    r = np.random.default_rng(1)
    prompts = [r.integers(0, be.vocab, n).tolist() for n in (3, 5, 7, 9, 11, 13, 17, 19)]
    greedy = SampleParams(temperature=0.0)
    batched = be.complete_ids(prompts, 12, greedy)
    assert batched == [be.complete_ids([p], 12, greedy)[0] for p in prompts]
    sp = sp_arrays(greedy, be.vocab)
    for b, want in ((8, True), (1, False)):
      st = jax_backend.start(be.gdef, be.params, prompts[:b], [4] * b, sp, 0, (), be.context)
      hlo = jax_backend._run.lower(be.gdef, be.params, st, jnp.int32(4)).compile().as_text()
      assert ('minillm_gemm' in hlo) == want, (b, tied)


def test_split_over_devices_keeps_rows_local():
  """Rows sharded over 2 devices: forward and input gradient run on each device's rows with no collective,
  the weight gradient adds the devices' partial products (one all-reduce), the bfloat16 transpose swaps the
  sharding; all equal one device's result."""
  code = """if 1:
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from minillm_jax.kernels import matmul as cpu_matmul
    r = np.random.default_rng(0)
    a, g = r.standard_normal((256, 48), np.float32), r.standard_normal((256, 40), np.float32)
    b = r.standard_normal((48, 40), np.float32)
    mesh = Mesh(np.array(jax.devices()), ('d',))
    rows, whole = NamedSharding(mesh, P('d', None)), NamedSharding(mesh, P())
    for name, ta, tb, x, y, want in [('fwd', 0, 0, a, b, a @ b), ('dx', 0, 1, g, b, g @ b.T),
                                     ('dw', 1, 0, a, g, a.T @ g)]:
      f = jax.jit(lambda x, y: cpu_matmul.matmul(x, y, bool(ta), bool(tb)))
      xs, ys = jax.device_put(x, rows), jax.device_put(y, rows if ta else whole)
      hlo = f.lower(xs, ys).compile().as_text()
      got = f(xs, ys)
      print(name, len(jax.devices()), 'all-gather' in hlo, hlo.count('all-reduce('), got.sharding.spec,
            float(np.abs(np.asarray(got) - want).max()))
    x = jax.device_put(jnp.asarray(a, jnp.bfloat16), rows)  # the bfloat16 transpose: each device its own rows
    hlo = jax.jit(cpu_matmul.transposed).lower(x).compile().as_text()
    got = jax.jit(cpu_matmul.transposed)(x)
    print('tr', len(jax.devices()), 'all-gather' in hlo, hlo.count('all-reduce('), str(got.sharding.spec).replace(' ', ''),
          float(np.abs(np.asarray(got, np.float32) - np.asarray(x, np.float32).T).max()))
  """
  r = subprocess.run([sys.executable, '-c', code], check=False, capture_output=True, text=True, cwd=ROOT,
                     env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  assert r.returncode == 0, r.stderr[-2000:]
  lines = [l.split(maxsplit=5) for l in r.stdout.splitlines()]
  assert [l[:4] for l in lines] == [['fwd', '2', 'False', '0'], ['dx', '2', 'False', '0'],
                                    ['dw', '2', 'False', '1'], ['tr', '2', 'False', '0']], r.stdout
  assert [l[4] for l in lines] == ["P('d',)", "P('d',)", 'P()', "P(None,'d')"], r.stdout
  assert all(float(l[5]) < 1e-4 for l in lines), r.stdout


def test_falls_back_to_xla_without_a_compiler():
  """No compiler: one warning each for the two kernels, and the model trains on XLA's dots."""
  code = """if 1:
    import jax, jax.numpy as jnp
    from minillm_jax.kernels import matmul as cpu_matmul
    from minillm_jax.model import mm
    cpu_matmul.MIN_MACS = 0
    a, b = jnp.ones((64, 8)), jnp.ones((8, 4))
    print(cpu_matmul.available(), 'custom_partitioning' in str(jax.make_jaxpr(mm)(a, b)), float(mm(a, b)[0, 0]))
  """
  r = subprocess.run([sys.executable, '-c', code], check=False, capture_output=True, text=True, cwd=ROOT,
                     env={**os.environ, 'CXX': '/bin/false', 'XDG_CACHE_HOME': tempfile.mkdtemp()})
  assert r.returncode == 0 and r.stdout.split() == ['False', 'False', '8.0'], r.stdout + r.stderr[-2000:]
  assert "OpenBLAS matmuls unavailable, using XLA's dots" in r.stderr, r.stderr
  assert '/bin/false could not build cpu_matmul.cc: exit status 1' in r.stderr, r.stderr


def _dot_operand_types(hlo: str) -> list[str]:
  """The element types of every dot's operands in compiled HLO text (dots sit inside fused computations)."""
  types = dict(re.findall(r'%([\w.\-]+) = (\w+)\[', hlo))
  return [types.get(o.strip().lstrip('%'), '?') for ops in re.findall(r' dot\(([^)]*)\)', hlo) for o in ops.split(',')]


def test_bfloat16_transpose_is_exact_with_its_gradient():
  r = np.random.default_rng(0)
  for shape in [(1, 7), (65, 130), (200, 64)]:
    x = jnp.asarray(r.standard_normal(shape), jnp.bfloat16)
    np.testing.assert_array_equal(jax.jit(cpu_matmul.transposed)(x), x.T)
    w = jnp.asarray(r.standard_normal(shape[::-1]), jnp.bfloat16)
    g = jax.grad(lambda x, w=w: (cpu_matmul.transposed(x) * w).astype(jnp.float32).sum())(x)
    np.testing.assert_array_equal(g, w.T)


def test_bfloat16_gradient_products_run_as_bfloat16_dots(monkeypatch):
  """XLA:CPU widens a bfloat16 dot with a transposed operand to float32 (and folds its own transposes back in):
  with the opaque transpose every dot of mm's forward and both gradients, and of the tied head, reads bfloat16
  operands, and the gradients are those of the widened dots (same products, float32 sums in another order)."""
  bf = jnp.bfloat16
  a = jax.random.normal(jax.random.key(0), (96, 40)).astype(bf)
  b = jax.random.normal(jax.random.key(1), (40, 24)).astype(bf)
  f = lambda a, b: jnp.sin(mm(a, b)).sum()
  hlo = jax.jit(jax.grad(f, (0, 1))).lower(a, b).compile().as_text()
  assert 'minillm_transpose_bf16' in hlo
  assert _dot_operand_types(hlo) == ['bf16'] * 6, _dot_operand_types(hlo)
  got = jax.grad(f, (0, 1))(a, b)
  monkeypatch.setattr(cpu_matmul, 'transpose_supported', lambda x: False)
  widened = jax.jit(jax.grad(f, (0, 1))).lower(a, b).compile().as_text()
  assert 'f32' in _dot_operand_types(widened)  # what the transpose is for: without it XLA widens the dots
  for x, y in zip(got, jax.grad(f, (0, 1))(a, b)):
    np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize('fsdp', [False, pytest.param(True, marks=pytest.mark.slow)])  # FSDP: 33 s, test-all
def test_training_on_blas_matches_xla_on_one_and_eight_devices(tmp_path, fsdp):
  """Every float32 product on OpenBLAS (threshold 0): data parallel inside shard_map (one OpenBLAS thread per
  device) and FSDP through the partitioning rule compute the 1-device XLA run; and two identical runs agree
  bitwise, which resuming relies on."""
  from test_train import args, losses
  tmp = str(tmp_path)
  over = {'train.steps': 10, 'train.fsdp': fsdp, 'model.d_model': 64, 'model.n_head': 4}
  blas, eight = {'MINILLM_CPU_MATMUL_MIN_MACS': '0'}, {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  runs = {'xla': (args(tmp, 'xla', **over, **{'train.cpu_devices': 1}), {'MINILLM_CPU_MATMUL': '0'}),
          'a': (args(tmp, 'a', **over), {**blas, **eight}), 'b': (args(tmp, 'b', **over), {**blas, **eight})}
  for a, env in runs.values():
    r = run_module('minillm_jax.train', *a, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
  ref, a, b = (losses(tmp, n) for n in runs)
  assert sorted(a) == list(range(1, 11)) and a == b
  np.testing.assert_allclose([ref[s] for s in range(1, 11)], [a[s] for s in range(1, 11)], rtol=2e-5)
