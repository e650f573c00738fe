"""Attention on accelerators: which implementation the model asks jax.nn.dot_product_attention for (cuDNN's
flash attention for bfloat16 on NVIDIA GPUs, XLA's otherwise), the fallback when cuDNN refuses, and on a GPU
(`-m gpu`) that cuDNN's attention computes XLA's to bfloat16 rounding."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minillm_jax.model import attention as attention_lib
from minillm_jax.model.attention import accelerator_implementation, attention, cudnn_eligible

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


@pytest.mark.parametrize('platform, dtype, head_dim, cc, want', [
    ('cuda 12.8 gpu', BF16, 64, '9.0', True),      # H100/H200: llm200m's and gpt2_124m's shape
    ('cuda 12.8 gpu', F16, 128, '8.0', True),      # A100
    ('cuda 12.8 gpu', BF16, 128, '8.9', True),     # L4, 4090
    ('cuda 12.8 gpu', BF16, 256, '9.0', True),     # head dims up to 256 from Hopper
    ('cuda 12.8 gpu', BF16, 256, '8.6', False),    # ... and up to 128 before it
    ('cuda 12.8 gpu', BF16, 136, '9.0', True),
    ('cuda 12.8 gpu', BF16, 60, '9.0', False),     # not a multiple of 8
    ('cuda 12.8 gpu', F32, 64, '9.0', False),      # no float32 flash kernel
    ('cuda 12.8 gpu', BF16, 64, '7.5', False),     # T4 (Turing): before cuDNN's fused kernels
    ('cuda 12.8 gpu', BF16, 64, '10.0', True),     # B200
    ('rocm 6.3 gpu', BF16, 64, None, False),       # AMD: no cuDNN
    ('TFRT TPU v5 lite', BF16, 128, None, False),
    ('cpu', BF16, 64, None, False),
])
def test_cudnn_eligibility(platform, dtype, head_dim, cc, want):
  assert cudnn_eligible(platform, dtype, head_dim, cc) is want


def fake_gpu(monkeypatch, cc: str, compiles: bool):
  dev = types.SimpleNamespace(platform='gpu', compute_capability=cc,
                              client=types.SimpleNamespace(platform_version='cuda 12080'))
  monkeypatch.setattr(jax, 'devices', lambda *a: [dev])
  probes = []
  monkeypatch.setattr(attention_lib, '_cudnn_compiles', lambda *a: probes.append(a) or compiles)
  return probes


def test_accelerator_implementation_probes_the_shape(monkeypatch):
  q, k = jnp.zeros((2, 32, 4, 64), BF16), jnp.zeros((2, 32, 2, 64), BF16)
  probes = fake_gpu(monkeypatch, '9.0', True)
  assert accelerator_implementation(q, k) == 'cudnn'
  assert probes == [((2, 32, 4, 64), (2, 32, 2, 64), 'bfloat16')]
  assert accelerator_implementation(q.astype(F32), k.astype(F32)) is None  # float32: XLA, no probe
  assert len(probes) == 1
  fake_gpu(monkeypatch, '9.0', False)  # cuDNN refused this shape when compiled: XLA's attention
  assert accelerator_implementation(q, k) is None


def test_cudnn_refusal_falls_back_and_is_logged_once(monkeypatch):
  """Without cuDNN (here: the CPU) the probe's trace or compile fails; it answers False, and the first
  refusal alone is logged."""
  warnings = []
  monkeypatch.setattr(attention_lib.logging, 'warning', lambda msg, *a: warnings.append(msg % a))
  monkeypatch.setattr(attention_lib, '_warned', [])
  attention_lib._cudnn_compiles.cache_clear()
  assert attention_lib._cudnn_compiles((1, 16, 2, 8), (1, 16, 2, 8), 'bfloat16') is False
  assert attention_lib._cudnn_compiles((1, 32, 2, 8), (1, 32, 2, 8), 'bfloat16') is False
  assert len(warnings) == 1 and warnings[0].startswith(
      "cuDNN flash attention unavailable for q (1, 16, 2, 8), k (1, 16, 2, 8) bfloat16 ("), warnings
  assert warnings[0].endswith("); using XLA's attention")
  attention_lib._cudnn_compiles.cache_clear()


def test_cpu_attention_asks_no_accelerator_question(monkeypatch):
  """The CPU path is what it was: the implementation choice is never consulted there."""
  monkeypatch.setattr(attention_lib, 'accelerator_implementation', lambda *a: pytest.fail('asked on CPU'))
  q = jax.random.normal(jax.random.key(0), (1, 8, 2, 8), BF16)
  assert attention(q, q, q).dtype == BF16


def _gpu() -> bool:
  try:
    return bool(jax.devices('gpu'))
  except RuntimeError:
    return False


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu(), reason='needs a GPU')
@pytest.mark.parametrize('B, T, N, K, H', [(2, 1024, 12, 12, 64), (2, 256, 8, 2, 128)])
def test_cudnn_attention_matches_xla_in_bfloat16(B, T, N, K, H):
  """llm200m's attention shape and a GQA one: cuDNN's flash attention and XLA's, forward and gradients, agree
  to bfloat16 rounding (outputs are bfloat16: a few units of its 2^-8 relative step on values of order 1)."""
  if accelerator_implementation(jnp.zeros((B, T, N, H), BF16), jnp.zeros((B, T, K, H), BF16)) != 'cudnn':
    pytest.skip('cuDNN flash attention is not available on this GPU')
  q = jax.random.normal(jax.random.key(0), (B, T, N, H), BF16)
  k, v = (jax.random.normal(jax.random.key(i), (B, T, K, H), BF16) for i in (1, 2))
  w = jax.random.normal(jax.random.key(3), (B, T, N, H), F32)

  def run(impl):
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    o = jax.jit(f)(q, k, v)
    g = jax.jit(jax.grad(lambda q, k, v: (f(q, k, v).astype(F32) * w).sum(), (0, 1, 2)))(q, k, v)
    return [np.asarray(x.astype(F32)) for x in (o, *g)]

  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), run('cudnn'), run('xla')):
    scale = float(np.abs(b).max())
    np.testing.assert_allclose(a, b, rtol=0, atol=2 ** -6 * scale, err_msg=name)
    assert float(np.abs(a - b).mean()) < 2 ** -9 * scale, name
