import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_module
from flax import nnx

from minillm_jax.config import ModelConfig, model_config
from minillm_jax.kernels import attention as cpu_attention
from minillm_jax.model import attention as attention_lib
from minillm_jax.model.attention import ATTN_BLOCK, attention, blockwise_attention
from minillm_jax.model.gpt import GPT, decode_bytes, init_model, param_counts
from minillm_jax.model.ops import mm, normalize, split_heads

GPT2ISH = ModelConfig(vocab_size=61, n_layer=2, n_head=4, n_kv_head=4, d_model=32, d_ff=128, block_size=16,
                      max_positions=16, pos='learned', norm='layernorm', mlp='gelu', bias=True, tie_embeddings=True)
LLAMAISH = dataclasses.replace(GPT2ISH, n_kv_head=2, d_ff=96, pos='rope', norm='rmsnorm', mlp='swiglu', bias=False,
                               tie_embeddings=False)
FAMILIES = {'gpt2': GPT2ISH, 'llama': LLAMAISH}


def preset(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def tokens(B=2, T=16, V=61, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


@pytest.mark.parametrize('fam', FAMILIES)
def test_causal(fam):
  m = init_model(FAMILIES[fam], 0)
  x = tokens()
  y = x.at[:, 9].set((x[:, 9] + 1) % 61)
  a, b = m(x), m(y)
  np.testing.assert_array_equal(a[:, :9], b[:, :9])  # positions before the change are untouched
  assert float(jnp.abs(a[:, 9:] - b[:, 9:]).max()) > 1e-4  # and the change does reach later positions


@pytest.mark.parametrize('fam', FAMILIES)
def test_kv_cache_decode_equals_full_forward(fam):
  m = init_model(FAMILIES[fam], 0)
  x = tokens()
  full = m(x)
  cache = m.init_cache(2)
  out, cache = m.decode(x[:, :5], cache, 0)  # prefill, then one token at a time
  outs = [out]
  for t in range(5, 16):
    out, cache = m.decode(x[:, t:t + 1], cache, t)
    outs.append(out)
  assert float(jnp.abs(jnp.concatenate(outs, 1) - full).max()) <= 1e-5


def test_kv_cache_decode_reads_the_right_cache_prefix():
  # a 256-slot cache is attended through prefixes of 64, 128 or 256 slots: chunks that end exactly on, and one
  # past, each prefix boundary must match the full forward (jitted: two chunk shapes, a traced position)
  m = init_model(dataclasses.replace(LLAMAISH, block_size=256, max_positions=256), 0)
  x = tokens(T=192)
  full = nnx.jit(lambda m, x: m(x))(m, x)
  dec = nnx.jit(lambda m, x, cache, pos: m.decode(x, cache, pos))
  cache, outs = m.init_cache(2), []
  for a, b in [(0, 63), (63, 64), (64, 65), (65, 128), (128, 129), (129, 192)]:
    out, cache = dec(m, x[:, a:b], cache, jnp.int32(a))
    outs.append(out)
  assert float(jnp.abs(jnp.concatenate(outs, 1) - full).max()) <= 1e-5


@pytest.mark.parametrize('fam', FAMILIES)
def test_bfloat16_forward_is_finite_and_close(fam):
  c = FAMILIES[fam]
  x = tokens()
  f32 = init_model(c, 0)(x)
  bf = init_model(dataclasses.replace(c, dtype='bfloat16'), 0)(x)
  assert bf.dtype == jnp.float32 and bool(jnp.isfinite(bf).all())
  assert float(jnp.abs(bf - f32).max()) < 0.05  # same weights, bf16 matmul inputs


@pytest.mark.parametrize('fam', FAMILIES)
def test_bfloat16_gradients_follow_float32(fam, monkeypatch):
  """bfloat16 compute on CPU (bfloat16 gradient products through cpu_matmul.transposed, the tied head's forward
  too; attention on the float32 kernel): the gradients are float32's up to bfloat16 rounding, and those of
  XLA's widened dots up to summation order."""
  from minillm_jax.kernels import matmul as cpu_matmul
  from minillm_jax.training.step import loss_fn
  c, x = FAMILIES[fam], tokens()

  def grads(dtype):
    gdef, params = nnx.split(init_model(dataclasses.replace(c, dtype=dtype), 0), nnx.Param)
    g = jax.jit(jax.grad(loss_fn))(params, gdef, x[:, :-1], x[:, 1:], None)
    return jnp.concatenate([v.reshape(-1) for v in jax.tree.leaves(g)])

  g32, gbf = grads('float32'), grads('bfloat16')
  assert float(jnp.linalg.norm(gbf - g32) / jnp.linalg.norm(g32)) < 0.02
  monkeypatch.setattr(cpu_matmul, 'transpose_supported', lambda x: False)
  np.testing.assert_allclose(gbf, grads('bfloat16'), rtol=0, atol=1e-2 * float(jnp.abs(g32).max()))


def test_dropout_only_with_key():
  m = init_model(dataclasses.replace(GPT2ISH, dropout=0.5), 0)
  x = tokens()
  np.testing.assert_array_equal(m(x), m(x))
  a, b = m(x, key=jax.random.key(0)), m(x, key=jax.random.key(1))
  assert float(jnp.abs(a - b).max()) > 1e-3
  np.testing.assert_array_equal(a, m(x, key=jax.random.key(0)))


def test_mm_custom_vjp_matches_autodiff():
  a = jax.random.normal(jax.random.key(0), (6, 5))
  b = jax.random.normal(jax.random.key(1), (5, 3))
  f = lambda a, b: (jnp.sin(mm(a, b))).sum()
  g = lambda a, b: (jnp.sin(a @ b)).sum()
  for x, y in zip(jax.grad(f, (0, 1))(a, b), jax.grad(g, (0, 1))(a, b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def plain_attention(q, k, v):
  T, H, G = q.shape[1], q.shape[3], q.shape[2] // k.shape[2]
  kk, vv = (jnp.repeat(x, G, axis=2) for x in (k, v))
  s = jnp.einsum('btnh,bsnh->bnts', q, kk, precision='highest') / math.sqrt(H)
  s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
  return jnp.einsum('bnts,bsnh->btnh', jax.nn.softmax(s, -1), vv, precision='highest')


def check_attention(f, B, T, N, K, H, atol):
  q, k, v, w = (jax.random.normal(jax.random.key(i), (B, T, n, H)) for i, n in enumerate((N, K, K, N)))
  loss = lambda f: lambda q, k, v: (f(q, k, v) * w).sum()
  np.testing.assert_allclose(f(q, k, v), plain_attention(q, k, v), atol=atol)
  grads = zip(jax.grad(loss(f), (0, 1, 2))(q, k, v), jax.grad(loss(plain_attention), (0, 1, 2))(q, k, v))
  for name, (got, want) in zip('qkv', grads):
    np.testing.assert_allclose(got, want, atol=10 * atol, err_msg=f'd{name}')


@pytest.mark.parametrize('T', [ATTN_BLOCK + 1, 2 * ATTN_BLOCK + 44])
def test_blockwise_attention_and_its_gradients_match_plain_attention(T):
  """The pure-JAX CPU attention (no C++ compiler): blockwise above ATTN_BLOCK with its own
  backward, GQA included."""
  check_attention(blockwise_attention, 2, T, 4, 2, 8, atol=2e-6)


@pytest.mark.parametrize('B,T,N,K,H', [
    (2, 1, 4, 4, 16), (1, 7, 3, 3, 8), (2, 64, 4, 2, 32), (2, 65, 4, 1, 24),   # one partial key block; H % 16 != 0
    (1, 130, 2, 2, 64), (3, 200, 6, 3, 40)])                                  # several query and key blocks, GQA
def test_fused_cpu_attention_and_its_gradients_match_plain_attention(B, T, N, K, H):
  """The C++ kernel (cpu_attention.cc) CPU training uses: block edges, the masked diagonal, GQA, head sizes off
  the vector width. It must build here: CI runs it (a missing compiler fails, not skips, this test)."""
  assert cpu_attention.available()
  check_attention(cpu_attention.causal_attention, B, T, N, K, H, atol=2e-6)


@pytest.mark.parametrize('B,T,N,K,H,S,pos', [
    (1, 1, 8, 8, 64, 1024, 0), (1, 1, 8, 8, 64, 1024, 700), (3, 1, 4, 2, 24, 64, 63),  # first / late / last slot
    (2, 5, 6, 3, 40, 48, 17), (2, 8, 2, 1, 16, 40, 32)])                              # several queries, GQA
def test_decode_attention_reads_the_cache_prefix_in_place(B, T, N, K, H, S, pos):
  """The decode kernel (queries at [pos, pos+T) against a [B*K, S, H] cache, query t seeing [0, pos+t]) equals
  plain masked attention over the cache; slots past pos+T hold garbage it must not read."""
  assert cpu_attention.available()
  q = jax.random.normal(jax.random.key(0), (B, T, N, H))
  k, v = (jax.random.normal(jax.random.key(i), (B * K, S, H)) for i in (1, 2))
  k, v = (x.at[:, pos + T:].set(jnp.nan) for x in (k, v))
  got = jax.jit(cpu_attention.decode_attention)(q, k, v, jnp.int32(pos))
  G, L = N // K, pos + T
  kk, vv = (jnp.repeat(x[:, :L].reshape(B, K, L, H), G, axis=1) for x in (k, v))  # [B, N, L, H]
  s = jnp.einsum('btnh,bnsh->bnts', q, kk, precision='highest') / math.sqrt(H)
  s = jnp.where(jnp.arange(L)[None, :] <= pos + jnp.arange(T)[:, None], s, -jnp.inf)
  want = jnp.einsum('bnts,bnsh->btnh', jax.nn.softmax(s, -1), vv, precision='highest')
  np.testing.assert_allclose(got, want, atol=2e-6)
  assert 'minillm_attention_decode' in jax.jit(attention_lib.cached_attention).lower(q, k, v, jnp.int32(pos)).as_text()
  bf = lambda x: x.astype(jnp.bfloat16)
  assert 'minillm_attention_decode' not in jax.jit(attention_lib.cached_attention).lower(
      bf(q), bf(k), bf(v), jnp.int32(pos)).as_text()


def test_fused_attention_propagates_nan_and_leaves_float_modes_alone():
  """A NaN key reaches every query that sees it (fast-math let the compiler drop it for the row that sees only
  that key), and loading the library leaves the process's float mode alone: built with -ffast-math, GCC < 13
  linked code that turned on flush-to-zero for the whole process (1e-39 became 0 in numpy)."""
  code = """if 1:
    import jax, jax.numpy as jnp, numpy as np
    from minillm_jax.kernels import attention as cpu_attention
    tiny = np.array([1e-39], np.float32)
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 70, 2, 16)) for i in range(3))
    k = k.at[0, 0].set(jnp.nan)  # key 0 of batch 0: every query of batch 0 sees it
    o = np.asarray(cpu_attention.causal_attention(q, k, v))
    print(cpu_attention.available(), float((tiny * np.float32(1))[0]) > 0,  # (XLA's own programs flush anyway)
          np.isnan(o[0]).all(), np.isfinite(o[1]).all())
  """
  r = subprocess.run([sys.executable, '-c', code], check=False, capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0 and r.stdout.split() == ['True'] * 4, r.stdout + r.stderr[-2000:]


def test_cpu_attention_dispatch():
  q = jnp.ones((1, 4, 2, 8))
  fused = jax.make_jaxpr(attention)(q, q, q)
  assert 'custom_partitioning' in str(fused)   # CPU takes the kernel, float32 and bfloat16 compute alike
  bf = jax.make_jaxpr(attention)(*[q.astype(jnp.bfloat16)] * 3)
  assert 'custom_partitioning' in str(bf) and bf.out_avals[0].dtype == jnp.bfloat16


def test_fused_attention_is_split_along_the_batch_on_several_devices():
  """With the batch sharded over 2 devices each runs the kernel on its own rows: no all-gather in the
  compiled step (custom_partitioning), and the same result as one device."""
  code = """if 1:
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from minillm_jax.kernels import attention as cpu_attention
    q, k, v, w = (jax.random.normal(jax.random.key(i), (4, 70, 4, 16)) for i in range(4))
    f = jax.jit(jax.grad(lambda q, k, v: (cpu_attention.causal_attention(q, k, v) * w).sum(), (0, 1, 2)))
    want = f(q, k, v)
    sh = NamedSharding(Mesh(np.array(jax.devices()), ('d',)), P('d'))
    args = [jax.device_put(x, sh) for x in (q, k, v)]
    got = f(*args)
    hlo = f.lower(*args).compile().as_text()
    print(len(jax.devices()), 'all-gather' in hlo, hlo.count('custom_call_target="minillm_attention'),
          max(float(jnp.abs(a - b).max()) for a, b in zip(got, want)), got[0].sharding.spec)
  """
  r = subprocess.run([sys.executable, '-c', code], check=False, capture_output=True, text=True, cwd=ROOT,
                     env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  assert r.returncode == 0, r.stderr[-2000:]
  n, gathered, calls, diff, spec = r.stdout.split(maxsplit=4)
  assert (n, gathered, calls, spec.strip()) == ('2', 'False', '2', "P('d',)"), r.stdout
  assert float(diff) < 1e-5


def test_fused_attention_falls_back_when_it_cannot_build():
  """No compiler: one warning, available() False, and the model runs on the pure-JAX attention."""
  code = """if 1:
    import jax.numpy as jnp
    from minillm_jax.kernels import attention as cpu_attention
    from minillm_jax.model import attention
    q = jnp.ones((1, 4, 2, 8))
    print(cpu_attention.available(), 'custom_partitioning' in str(__import__('jax').make_jaxpr(attention.attention)(q, q, q)))
  """
  r = subprocess.run([sys.executable, '-c', code], check=False, capture_output=True, text=True, cwd=ROOT,
                     env={**os.environ, 'CXX': '/bin/false', 'XDG_CACHE_HOME': tempfile.mkdtemp()})
  assert r.returncode == 0 and r.stdout.split() == ['False', 'False'], r.stdout + r.stderr[-2000:]
  assert 'fused CPU attention unavailable, using the pure-JAX attention' in r.stderr, r.stderr
  assert '/bin/false could not build cpu_attention.cc: exit status 1' in r.stderr, r.stderr


@pytest.mark.parametrize('center', [True, False])
def test_normalize_custom_vjp_matches_autodiff(center):
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 5, 16))
  s = jax.random.normal(jax.random.key(1), (16,))
  w = jax.random.normal(jax.random.key(2), (2, 5, 16))

  def plain(x, s):
    x = x - x.mean(-1, keepdims=True) if center else x
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5) * s

  np.testing.assert_allclose(normalize(x, s, 1e-5, center), plain(x, s), atol=1e-6)
  got = jax.grad(lambda x, s: (jnp.sin(normalize(x, s, 1e-5, center)) * w).sum(), (0, 1))(x, s)
  want = jax.grad(lambda x, s: (jnp.sin(plain(x, s)) * w).sum(), (0, 1))(x, s)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_split_heads_backward_is_one_concatenate(dtype):
  qkv = jax.random.normal(jax.random.key(0), (2, 3, 8, 4), dtype)  # N=4 query heads, K=2 kv heads
  ws = [jax.random.normal(jax.random.key(i), (2, 3, n, 4), dtype) for i, n in ((1, 4), (2, 2), (3, 2))]
  loss = lambda parts: sum((p.astype(jnp.float32) * w).sum() for p, w in zip(parts, ws))
  plain = lambda x: (x[:, :, :4], x[:, :, 4:6], x[:, :, 6:])
  for a, b in zip(split_heads(qkv, 4, 2), plain(qkv)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(jax.grad(lambda x: loss(split_heads(x, 4, 2)))(qkv),
                                jax.grad(lambda x: loss(plain(x)))(qkv))
  # The slices' own transpose sums three zero pads (in bfloat16, a float32 round trip per add on XLA:CPU).
  hlo = jax.jit(jax.grad(lambda x: loss(split_heads(x, 4, 2)))).lower(qkv).as_text()
  assert 'concatenate' in hlo and ' pad(' not in hlo and 'stablehlo.pad' not in hlo


def test_gpt2_style_init():
  c = dataclasses.replace(GPT2ISH, n_layer=8, d_model=256, d_ff=1024)
  m = init_model(c, 0)
  assert abs(float(m.blocks[0].attn.qkv.kernel[...].std()) - 0.02) < 0.001
  assert abs(float(m.blocks[0].mlp.proj.kernel[...].std()) - 0.02 / math.sqrt(16)) < 0.0005
  assert float(jnp.abs(m.blocks[0].attn.qkv.bias[...]).max()) == 0.0
  assert float(m.ln_f.scale[...].min()) == 1.0


def test_tiny_exact_parameter_count():
  c = model_config(preset('tiny'))
  assert param_counts(c)['total'] == 27_073_024


def test_decode_bytes_of_tiny_by_hand():
  # 6 x (512 x 1536 qkv + 512 x 512 out + 2 x 512 x 2048 MLP) + 512 x 8000 head = 22,970,368 matrix elements;
  # 13 LayerNorm scales of 512; one embedding row; K and V: 6 layers x 2 x 512 floats x 160 positions
  c = model_config(preset('tiny'))
  vec, row, kv = 4 * 13 * 512, 4 * 512, 6 * 2 * 512 * 4 * 160
  assert decode_bytes(c, 1, 160) == 22_970_368 * 4 + vec + row + kv == 95_842_304
  assert decode_bytes(c, 1, 160, weight_bytes=2) == 22_970_368 * 2 + vec + row + kv
  assert decode_bytes(c, 8, 160) == 22_970_368 * 4 + vec + 8 * (row + kv)


@pytest.mark.parametrize('family', FAMILIES)
def test_decode_bytes_counts_the_parameters_a_step_reads(family):
  """From the parameter tree: every matrix but the embedding tables (the tied head is the token table, read
  whole), every vector; plus the rows a token gathers and its K/V cache (GQA: n_kv_head heads)."""
  c = FAMILIES[family]
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(init_model(c, 0), nnx.Param))[0]
  name = lambda p: jax.tree_util.keystr(p)
  tables = [x.size for p, x in leaves if 'wte' in name(p) or 'wpe' in name(p)]
  mats = sum(x.size for p, x in leaves if x.ndim == 2 and 'wte' not in name(p) and 'wpe' not in name(p))
  mats += c.vocab_size * c.d_model if c.tie_embeddings else 0
  vecs = sum(x.size for p, x in leaves if x.ndim == 1)
  rows = len(tables) * c.d_model
  kv = c.n_layer * 2 * c.n_kv_head * c.head_dim * 4 * 5
  assert decode_bytes(c, 3, 5) == 4 * mats + 4 * vecs + 3 * (4 * rows + kv)


@pytest.mark.parametrize('name,target,key', [
    ('nano', 12.5e6, 'total'), ('micro', 30.3e6, 'total'), ('small', 51.4e6, 'total'),
    ('basic10m', 6.3e6, 'non_embedding'), ('llm200m', 251e6, 'total'), ('gpt2_124m', 124.4e6, 'total'),
    ('shakespeare_char', 0.80e6, 'total')])
def test_preset_sizes_within_5_percent(name, target, key):
  cfg = preset(name)
  n = param_counts(model_config(cfg, 65))[key]
  assert abs(n - target) / target < 0.05, n


def test_llama_preset_shape():
  c = model_config(preset('llm200m'))
  assert (c.pos, c.norm, c.mlp, c.bias, c.tie_embeddings, c.d_ff) == ('rope', 'rmsnorm', 'swiglu', False, True, 3072)


def test_param_tree_names_are_stable():
  # torch_compat's conversion table relies on these names
  names = {'.'.join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(init_model(LLAMAISH, 0), nnx.Param))}
  assert {'wte', 'blocks.0.attn.qkv.kernel', 'blocks.1.mlp.fc.kernel', 'blocks.0.ln1.scale', 'ln_f.scale',
          'head.kernel'} <= names
  assert 'wpe' not in names and 'blocks.0.ln1.bias' not in names


def test_model_cli_prints_tiny_count():
  r = run_module('minillm_jax.model', '--config=configs/tiny.py')
  assert r.returncode == 0, r.stderr
  assert 'parameters      27,073,024' in r.stdout
  assert 'FLOPs/token' in r.stdout


def test_gpt_is_nnx_module():
  assert issubclass(GPT, nnx.Module)
