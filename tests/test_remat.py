"""model.remat: a rematerialised step computes the plain step's loss and gradients (bitwise where XLA sums in
the same order), keeps less in memory, and the config refuses an unknown mode."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minillm_jax.config import ConfigError, ModelConfig, default_config, validate
from minillm_jax.kernels import attention as cpu_attention
from minillm_jax.model import GPT
from minillm_jax.training.step import loss_fn

GPT2ISH = ModelConfig(vocab_size=61, n_layer=2, n_head=4, n_kv_head=4, d_model=32, d_ff=128, block_size=16,
                      max_positions=16, pos='learned', norm='layernorm', mlp='gelu', bias=True, tie_embeddings=True)
LLAMAISH = dataclasses.replace(GPT2ISH, n_kv_head=2, d_ff=96, pos='rope', norm='rmsnorm', mlp='swiglu', bias=False,
                               tie_embeddings=False)
FAMILIES = {'gpt2': GPT2ISH, 'llama': LLAMAISH}
X = jax.random.randint(jax.random.key(0), (2, 16), 0, 61)
Y = jax.random.randint(jax.random.key(1), (2, 16), 0, 61)
KEY = jax.random.key(7)  # the trainer passes a key every step (dropout, when model.dropout > 0)
_plain = {}


def step(c: ModelConfig):
  """(loss, gradients, XLA temp bytes) of the trainer's loss on X, Y: what train_step's update is made of."""
  gdef, params = nnx.split(GPT(c, nnx.Rngs(params=0)))
  compiled = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1).lower(params, gdef, X, Y, KEY).compile()
  loss, grads = compiled(params, X, Y, KEY)  # (the static gdef is baked into the compiled program)
  return loss, jax.tree.leaves(grads), compiled.memory_analysis().temp_size_in_bytes


def plain(fam: str):
  if fam not in _plain:
    _plain[fam] = step(FAMILIES[fam])
  return _plain[fam]


@pytest.mark.parametrize('mode', ['attention', 'block'])
@pytest.mark.parametrize('fam', FAMILIES)
def test_remat_step_equals_plain_step(fam, mode):
  loss0, g0, temp0 = plain(fam)
  loss, g, temp = step(dataclasses.replace(FAMILIES[fam], remat=mode))
  assert float(loss) == float(loss0)
  if fam == 'gpt2' and mode == 'block':
    # Same values, another summation order: with the blocks recomputed inside the backward, XLA:CPU fuses the
    # row reductions of the GPT-2 family (bias and LayerNorm gradients, the position table's sum) with other
    # producers. Even the last block's mlp.proj.bias gradient, a sum of the incoming gradient that no
    # recomputed value enters, differs in its last bits; the Llama family has none of these and is bitwise.
    for a, b in zip(g, g0):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.abs(b).max()))
    assert any(not np.array_equal(a, b) for a, b in zip(g, g0))  # if it becomes bitwise, tighten this test
  else:
    for a, b in zip(g, g0):
      np.testing.assert_array_equal(a, b)
  if mode == 'block':  # only the blocks' inputs stay alive through the forward
    assert temp < temp0, (temp, temp0)


@pytest.mark.parametrize('mode', ['attention', 'block'])
def test_remat_in_bfloat16_with_the_fused_cpu_kernel_and_with_dropout(mode, monkeypatch):
  """bfloat16 compute, once on the fused C++ attention (its custom derivative rerun under jax.checkpoint) and
  once on the pure-JAX path with dropout (which takes the reference attention): the Llama family's loss and
  gradients are the plain step's, bitwise."""
  for kernel, dropout in (('1', 0.0), ('0', 0.1)):
    c = dataclasses.replace(LLAMAISH, dtype='bfloat16', dropout=dropout)
    monkeypatch.setenv('MINILLM_CPU_ATTENTION', kernel)
    cpu_attention.available.cache_clear()
    if kernel == '1' and not cpu_attention.available():
      pytest.skip('no C++ compiler for the fused CPU attention')
    if kernel not in _plain:
      _plain[kernel] = step(c)
    loss0, g0, _ = _plain[kernel]
    loss, g, _ = step(dataclasses.replace(c, remat=mode))
    assert float(loss) == float(loss0)
    for a, b in zip(g, g0):
      np.testing.assert_array_equal(a, b)
  monkeypatch.undo()
  cpu_attention.available.cache_clear()


def test_remat_leaves_decoding_alone():
  """The KV-cache path (no gradients) runs the blocks as they are, whatever model.remat says."""
  x = X[:, :5]
  outs = []
  for mode in ('none', 'block', 'attention'):
    m = GPT(dataclasses.replace(GPT2ISH, remat=mode), nnx.Rngs(params=0))
    outs.append(m.decode(x, m.init_cache(2), 0)[0])
  for o in outs[1:]:
    np.testing.assert_array_equal(o, outs[0])


def test_remat_config_value_is_checked():
  cfg = default_config()
  assert cfg.model.remat == 'none'
  cfg.model.remat = 'full'
  with pytest.raises(ConfigError, match=r"^model.remat='full' is not one of none, attention, block$"):
    validate(cfg)
