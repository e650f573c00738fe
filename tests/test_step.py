"""The step functions and their helpers, called directly: steps per call, CPU device counts, gradient
accumulation, the weight-decay mask, non-finite steps, checkpoint retention across reopened managers."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minillm_jax.config import ModelConfig, default_config
from minillm_jax.model import GPT
from minillm_jax.training import step as train


def test_steps_per_call_auto():
  cfg = default_config()
  t = cfg.train  # eval every 250, checkpoints every 500
  assert train.steps_per_call(t, 4e9) == 10  # shakespeare_char: 12 fit, 10 divides 250
  assert train.steps_per_call(t, 3e11) == 1  # tiny: one step is already ~0.5 s or more
  t.eval_every, t.ckpt_every = 20, 30
  assert train.steps_per_call(t, 1e6) == 10  # at most 16, dividing gcd(20, 30)
  t.steps_per_call = 4
  assert train.steps_per_call(t, 3e11) == 4


def test_cpu_device_count(monkeypatch):
  from minillm_jax import parallel
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(6)))
  assert parallel.cpu_device_count(0, 12, 1e6) == 6
  assert parallel.cpu_device_count(0, 8, 1e6) == 4   # the largest count <= cores that divides the batch
  assert parallel.cpu_device_count(0, 7, 1e6) == 1
  assert parallel.cpu_device_count(3, 8, 1e6) == 3   # asked for: used as is (the loop checks divisibility)
  ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  assert parallel.cpu_device_count(0, 12, ram / 4 / 16 / 2) == 2  # two replicas fit in a quarter of RAM


def _tiny_state():
  mc = ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_kv_head=2, d_model=16, d_ff=64, block_size=8,
                   max_positions=8, bias=True)
  gdef, params = nnx.split(GPT(mc, nnx.Rngs(params=0)))
  return mc, gdef, params


def test_accumulation_equals_big_batch():
  _, gdef, params = _tiny_state()
  tx, _ = train.make_optimizer(default_config().optim, 100)
  step = functools.partial(train.train_step, gdef=gdef, tx=tx, seed=0)
  x = jax.random.randint(jax.random.key(0), (12, 8), 0, 40)
  y = jax.random.randint(jax.random.key(1), (12, 8), 0, 40)
  big, mb = step({'params': params, 'opt': tx.init(params)}, {'inputs': x, 'targets': y}, 3)
  acc, ma = step({'params': params, 'opt': tx.init(params)},
                 {'inputs': x.reshape(3, 4, 8), 'targets': y.reshape(3, 4, 8)}, 3)
  np.testing.assert_allclose(mb['loss'], ma['loss'], rtol=1e-6)
  np.testing.assert_allclose(mb['grad_norm'], ma['grad_norm'], rtol=1e-5)
  for u, v in zip(jax.tree.leaves(big['params']), jax.tree.leaves(acc['params'])):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


def test_weight_decay_mask_excludes_norms_biases_embeddings():
  _, _, params = _tiny_state()
  names = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(
      train.decay_mask(params, decay_embeddings=False))[0]}
  decayed = sorted(k.split('.value')[0] for k, m in names.items() if m)
  assert decayed == ["['blocks'][0]['attn']['proj']['kernel']", "['blocks'][0]['attn']['qkv']['kernel']",
                     "['blocks'][0]['mlp']['fc']['kernel']", "['blocks'][0]['mlp']['proj']['kernel']"]
  # behaviour: with zero gradients only the decayed tensors move
  o = default_config().optim
  o.weight_decay, o.warmup_steps = 0.5, 0
  tx, _ = train.make_optimizer(o, 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zeros, tx.init(params), params)
  moved = {jax.tree_util.keystr(p).split('.value')[0] for p, u in jax.tree_util.tree_flatten_with_path(upd)[0]
           if float(jnp.abs(u).max()) > 0}
  assert moved == set(decayed)


def test_best_checkpoint_survives_a_reopened_manager(tmp_path):
  # keep=1 keeps the latest step plus the best by val_loss; a resumed run opens a new manager, whose first save
  # must not delete the best (it did while the metrics lived only in the saving process)
  from minillm_jax.training import checkpoint
  _, _, params = _tiny_state()
  ck = checkpoint.Checkpointer(str(tmp_path), keep=1, async_save=False)
  for step, val in ((10, 1.0), (20, 2.0), (30, 3.0)):
    ck.save(step, params, {'val_loss': val}, val_loss=val)
  ck.close()
  assert checkpoint.Checkpointer(str(tmp_path), read_only=True).steps() == [10, 30]
  ck = checkpoint.Checkpointer(str(tmp_path), keep=1, async_save=False)
  ck.save(40, params, {'val_loss': 4.0}, val_loss=4.0)
  assert ck.steps() == [10, 40] and ck.best_step() == 10
  ck.save(50, params, {'val_loss': 0.5}, val_loss=0.5)
  assert ck.steps() == [50]
  ck.close()


def test_nonfinite_step_keeps_weights_finite():
  _, gdef, params = _tiny_state()
  tx, _ = train.make_optimizer(default_config().optim, 100)
  huge = jax.tree.map(lambda p: p * 1e20, params)  # finite weights whose logits overflow to inf
  state = {'params': huge, 'opt': tx.init(huge)}
  x = jnp.zeros((2, 8), jnp.int32)
  new, m = train.train_step(state, {'inputs': x, 'targets': x}, 0, gdef=gdef, tx=tx, seed=0)
  assert not np.isfinite(float(m['loss']))
  assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(new['params']))
  assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(new['opt']))
