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
from minillm_jax.training.step import compiler_options, loss_fn

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
  compiled = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1, compiler_options=compiler_options(c.remat)).lower(
      params, gdef, X, Y, KEY).compile()
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
  if mode == 'block':
    # Same values, another summation order: with the blocks recomputed inside the backward, XLA:CPU fuses row
    # reductions (bias and norm gradients, the position table's sum) and the recomputed matmuls' consumers
    # differently, so the gradients agree to the last bits (measured up to 7.5e-9), not bitwise.
    for a, b in zip(g, g0):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.abs(b).max()))
  if mode == 'block':  # only the blocks' inputs stay alive through the forward
    assert temp < temp0, (temp, temp0)


def test_remat_keeps_a_fraction_of_the_activations_on_xla_cpu():
  """8 blocks: remat=block keeps their inputs only (XLA's temp bytes of the loss-and-gradient program, compiled
  and not run). Without training.step.compiler_options, XLA:CPU merges the recomputation back into the forward
  and keeps nearly everything (measured 89% on jax 0.10): the check a renamed XLA pass would trip."""
  c = dataclasses.replace(LLAMAISH, n_layer=8, d_model=64, n_head=4, n_kv_head=4, d_ff=256, block_size=64,
                          max_positions=64)
  x = jax.ShapeDtypeStruct((4, 64), jnp.int32)

  def temp(mode: str, options: bool) -> int:
    gdef, params = nnx.split(nnx.eval_shape(lambda: GPT(dataclasses.replace(c, remat=mode), nnx.Rngs(params=0))))
    fn = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1,
                 compiler_options=compiler_options(mode) if options else None)
    return fn.lower(params, gdef, x, x, KEY).compile().memory_analysis().temp_size_in_bytes

  plain = temp('none', True)
  assert compiler_options('none') is None
  assert temp('block', True) < 0.25 * plain  # measured 15%
  if tuple(int(v) for v in jax.__version__.split('.')[:2]) < (0, 11):  # (0.11 expands barriers after scheduling)
    assert temp('block', False) > 0.6 * plain  # what XLA:CPU does to a barrier it may expand early


@pytest.mark.parametrize('mode', ['attention', 'block'])
def test_remat_in_bfloat16_with_the_fused_cpu_kernel_and_with_dropout(mode, monkeypatch):
  """bfloat16 compute, once on the fused C++ attention (its custom derivative rerun under jax.checkpoint) and
  once on the pure-JAX path with dropout (which takes the reference attention): the Llama family's loss and
  gradients are the plain step's (bitwise for remat=attention, to the last bits for remat=block)."""
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
      if mode == 'block':  # (see test_remat_step_equals_plain_step)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.abs(b).max()))
      else:
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


def test_torch_mirror_checkpointing_changes_no_gradient():
  """The mirror's remat=block (torch.utils.checkpoint per block, bench --what=memory's torch_checkpoint):
  the same loss and gradients, bitwise; eval mode and decoding never checkpoint."""
  torch = pytest.importorskip('torch')
  from torch_compat import model as tmodel

  def grads(remat):
    torch.manual_seed(0)
    m = tmodel.GPT({**LLAMAISH.to_dict(), 'remat': remat, 'dropout': 0.0}).train()
    x = torch.from_numpy(np.array(X)).long()
    loss = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), torch.from_numpy(np.array(Y)).long().flatten())
    loss.backward()
    return [loss.detach()] + [p.grad for p in m.parameters()]

  for a, b in zip(grads('block'), grads('none')):
    assert torch.equal(a, b)


def test_memory_bench_ratios_and_targets():
  from minillm_jax.evals import bench_memory
  vs = {'jax_none': {'rss_step_mb': 1000.0, 'step_s': 2.0, 'xla_step_mb': 4000.0, 'xla_activation_mb': 800.0},
        'jax_block': {'rss_step_mb': 500.0, 'step_s': 2.6, 'xla_step_mb': 3500.0, 'xla_activation_mb': 240.0},
        'torch': {'rss_step_mb': 1200.0, 'step_s': 3.0}, 'torch_checkpoint': {'rss_step_mb': 600.0, 'step_s': 4.5}}
  r = bench_memory.ratios(vs)
  assert r == {'jax_block': {'rss': 0.5, 'time': 1.3, 'xla_step': 0.875, 'activation': 0.3},
               'torch_checkpoint': {'rss': 0.5, 'time': 1.5}}
  m = {'batch': [1, 1024], 'dtype': 'bfloat16', 'steps': 2, 'errors': {'jax_attention': 'exit 1: boom'},
       'variants': {v: {**d, 'loss': 10.0} for v, d in vs.items()}, 'ratios': r,
       'targets': {'activation_ratio_max': 0.4, 'time_ratio_max': 1.35, 'activation_met': True, 'time_met': True}}
  md = bench_memory.markdown(m)
  assert '| jax_block | 500 (0.50x) | 3,500 (0.88x) | 240 (0.30x) | 2.60 (1.30x) | 10.0000 |' in md
  assert '| torch_checkpoint | 600 (0.50x) | - | - | 4.50 (1.50x) | 10.0000 |' in md
  assert '| jax_attention | failed: exit 1: boom |  |  |  |  |' in md
  assert md[-1] == ("Target for remat=block: activations <= 40% of the plain step's (30%: met) for <= 35% more "
                    'time (+30%: met).')


def test_a_resume_may_change_remat_but_not_the_architecture():
  from minillm_jax.config import UserError
  from minillm_jax.training.loop import check_same_model
  old = GPT2ISH.to_dict()
  check_same_model(old, dataclasses.replace(GPT2ISH, remat='block'), 'runs/x')  # the same weights
  with pytest.raises(UserError, match=r'n_layer: checkpoint 2 vs config 3'):
    check_same_model(old, dataclasses.replace(GPT2ISH, n_layer=3, remat='block'), 'runs/x')
