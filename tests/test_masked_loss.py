"""The masked loss of training.step: a token-weighted mean over masked-in tokens across rows, accumulated
micro-batches and data-parallel devices; the unmasked step with an all-ones mask (bitwise); no NaN for an
all-zero mask; zero gradient from masked-out targets."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from minillm_jax.config import ModelConfig, default_config
from minillm_jax.model import GPT
from minillm_jax.training import step as train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, T = 40, 8
KEY = jax.random.key(0)  # the model has no dropout; accumulation folds the micro-batch index into it


def _tiny():
  mc = ModelConfig(vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, d_model=16, d_ff=64, block_size=T,
                   max_positions=T, bias=True)
  return nnx.split(GPT(mc, nnx.Rngs(params=0)))


def _data(rows, seed=0):
  x = jax.random.randint(jax.random.key(seed), (rows, T), 0, V)
  y = jax.random.randint(jax.random.key(seed + 1), (rows, T), 0, V)
  return x, y


def _uneven_mask(rows):
  # row r keeps its first (r * 3) % (T + 1) targets: counts 0..8, very different per row and per micro-batch
  return (np.arange(T)[None, :] < ((np.arange(rows) * 3) % (T + 1))[:, None]).astype(np.float32)


def _ce(gdef, params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(gdef, params)(x), y)


def _equal_trees(a, b):
  return all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_masked_loss_is_token_weighted_mean():
  gdef, params = _tiny()
  x, y = _data(6)
  m = _uneven_mask(6)
  want = float((np.asarray(_ce(gdef, params, x, y)) * m).sum() / m.sum())  # not a mean of per-row means
  got, _ = train.local_grads(params, gdef, {'inputs': x, 'targets': y, 'mask': m}, KEY)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  row_means = (np.asarray(_ce(gdef, params, x, y)) * m).sum(1)[m.sum(1) > 0] / m.sum(1)[m.sum(1) > 0]
  assert abs(row_means.mean() - want) > 1e-3  # the test distinguishes the two


def test_all_ones_mask_equals_the_unmasked_step():
  """Bitwise: an all-ones mask takes the unmasked computation (training.step._unless_full_mask)."""
  gdef, params = _tiny()
  tx, sched = train.make_optimizer(default_config().optim, 100)
  step = jax.jit(functools.partial(train.train_step, gdef=gdef, tx=tx, seed=0, sched=sched))
  x, y = _data(12)
  for shape in ((12, T), (3, 4, T)):  # one batch and accumulated micro-batches
    b = {'inputs': x.reshape(shape), 'targets': y.reshape(shape)}
    state = {'params': params, 'opt': tx.init(params)}
    s0, m0 = step(state, b, 3)
    for ones in (jnp.ones(shape, jnp.float32), jnp.ones(shape, jnp.int32)):
      s1, m1 = step(state, b | {'mask': ones}, 3)
      assert _equal_trees((s0, m0), (s1, m1))
    almost = jnp.ones(shape, jnp.float32).at[(0,) * len(shape)].set(0.0)  # one token out: the masked path
    _, m2 = step(state, b | {'mask': almost}, 3)
    assert not _equal_trees(m0, m2)
    np.testing.assert_allclose(m0['loss'], m2['loss'], rtol=0.05)
  ev = jax.jit(functools.partial(train.eval_loss, gdef=gdef))
  stacked = {'inputs': x.reshape(3, 4, T), 'targets': y.reshape(3, 4, T)}
  assert ev(params, stacked) == ev(params, stacked | {'mask': jnp.ones((3, 4, T))})


def test_no_mask_is_the_plain_mean():
  gdef, params = _tiny()
  x, y = _data(4)
  want = _ce(gdef, params, x, y).mean()
  got, _ = train.local_grads(params, gdef, {'inputs': x, 'targets': y}, KEY)
  assert float(got) == float(want)


def test_all_zero_mask_gives_zero_loss_and_gradient():
  gdef, params = _tiny()
  x, y = _data(4)
  for shape in ((4, T), (2, 2, T)):
    zero = jnp.zeros(shape)
    loss, grads = train.local_grads(params, gdef, {'inputs': x.reshape(shape), 'targets': y.reshape(shape),
                                                   'mask': zero}, KEY)
    assert float(loss) == 0.0
    assert all(not bool(jnp.any(g)) for g in jax.tree.leaves(grads))
  ev = train.eval_loss(params, {'inputs': x.reshape(2, 2, T), 'targets': y.reshape(2, 2, T),
                                'mask': jnp.zeros((2, 2, T))}, gdef=gdef)
  assert float(ev) == 0.0


def test_masked_out_targets_get_zero_gradient():
  gdef, params = _tiny()
  x, y = _data(4)
  m = _uneven_mask(4)
  other = jnp.where(m > 0, y, (y + 7) % V)  # different targets wherever the mask is 0
  assert bool(jnp.any(other != y))
  for shape in ((4, T), (2, 2, T)):
    (l0, g0), (l1, g1) = (train.local_grads(params, gdef, {'inputs': x.reshape(shape), 'targets': yy.reshape(shape),
                                                           'mask': m.reshape(shape)}, KEY) for yy in (y, other))
    assert float(l0) == float(l1) and _equal_trees(g0, g1)
  # and the gradient of the loss w.r.t. the logits is zero at masked-out positions
  logits = nnx.merge(gdef, params)(x)
  dl = jax.grad(lambda z: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(z, y) * m) / m.sum())(logits)
  assert not bool(jnp.any(dl[m == 0])) and bool(jnp.any(dl[m == 1]))


def test_accumulation_with_uneven_masks_equals_one_big_batch():
  gdef, params = _tiny()
  x, y = _data(12)
  m = _uneven_mask(12)
  m[8:] = 0  # the third micro-batch has no masked-in token at all, the others very different counts
  m[0:4] = 1
  big_l, big_g = train.local_grads(params, gdef, {'inputs': x, 'targets': y, 'mask': m}, KEY)
  acc_l, acc_g = train.local_grads(params, gdef, {'inputs': x.reshape(3, 4, T), 'targets': y.reshape(3, 4, T),
                                                  'mask': m.reshape(3, 4, T)}, KEY)
  want = float((np.asarray(_ce(gdef, params, x, y)) * m).sum() / m.sum())
  np.testing.assert_allclose(float(big_l), want, rtol=1e-6)
  np.testing.assert_allclose(float(acc_l), want, rtol=1e-6)
  for u, v in zip(jax.tree.leaves(big_g), jax.tree.leaves(acc_g)):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)
  # the validation loss weighs the batches by their token counts the same way
  ev = train.eval_loss(params, {'inputs': x.reshape(3, 4, T), 'targets': y.reshape(3, 4, T),
                                'mask': m.reshape(3, 4, T)}, gdef=gdef)
  np.testing.assert_allclose(float(ev), want, rtol=1e-6)


def test_flat_dp_reduction_is_token_weighted():
  """Two CPU devices (a subprocess: the device count is fixed when JAX starts): flat_dp_grads with uneven
  per-device masks equals the single-device token-weighted mean, and the unmasked reduction (to rounding) with
  an all-ones mask."""
  code = """if 1:
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from minillm_jax import parallel
    from minillm_jax.config import ModelConfig
    from minillm_jax.model import GPT
    from minillm_jax.training import step as train
    assert len(jax.devices()) == 2
    mc = ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_kv_head=2, d_model=16, d_ff=64, block_size=8,
                     max_positions=8, bias=True)
    gdef, params = nnx.split(GPT(mc, nnx.Rngs(params=0)))
    mesh = parallel.make_mesh()
    x = jax.random.randint(jax.random.key(0), (2, 4, 8), 0, 40)
    y = jax.random.randint(jax.random.key(1), (2, 4, 8), 0, 40)
    m = np.zeros((2, 4, 8), np.float32)
    m[:, :2] = 1          # device 0 holds rows 0-1 of each micro-batch: 32 tokens
    m[0, 2, :3] = 1       # device 1: 3 tokens
    dp = jax.jit(lambda p, b: train.flat_dp_grads(p, gdef, b, jax.random.key(0), mesh))
    one = jax.jit(lambda p, b: train.local_grads(p, gdef, b, jax.random.key(0)))
    sh = parallel.batch_sharding(mesh, 1)
    b = {'inputs': x, 'targets': y, 'mask': m}
    (l0, g0), (l1, g1) = dp(params, jax.device_put(b, sh)), one(params, b)
    diff = max(float(jnp.abs(u - v).max()) for u, v in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    nm = {'inputs': x, 'targets': y}
    (l2, g2), (l3, g3) = dp(params, jax.device_put(nm, sh)), dp(params, jax.device_put(nm | {'mask': np.ones_like(m)}, sh))
    same = abs(float(l2) - float(l3)) <= 1e-6 * abs(float(l2)) and all(np.allclose(u, v, rtol=1e-6, atol=1e-8) for u, v in zip(jax.tree.leaves(g2), jax.tree.leaves(g3)))
    (lz, gz) = dp(params, jax.device_put(nm | {'mask': np.zeros_like(m)}, sh))
    zero = float(lz) == 0.0 and not any(bool(jnp.any(g)) for g in jax.tree.leaves(gz))
    print(abs(float(l0) - float(l1)) / float(l1), diff, same, zero)
  """
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  r = subprocess.run([sys.executable, '-c', code], check=False, capture_output=True, text=True, cwd=ROOT, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  rel, diff, same, zero = r.stdout.split()
  assert float(rel) < 1e-6 and float(diff) < 1e-6, r.stdout
  assert same == 'True' and zero == 'True', r.stdout
