"""Fused causal attention on CPU (cpu_attention.cc, an XLA FFI custom call): training's forward and backward in
float32, and decode steps reading the KV cache in place. Switch: MINILLM_CPU_ATTENTION; where it is on by
default: build.enabled and BENCHMARKS.md, "CPU kernels". Off or unbuildable, `available()` is False and the
model keeps its pure-JAX attention, which computes the same function.
"""
from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from minillm_jax.kernels import build as cpu_kernels

SRC = pathlib.Path(__file__).with_name('cpu_attention.cc')
# CPU classes where the kernel made a whole step at least 15% faster than XLA alone (BENCHMARKS.md, "CPU kernels")
ATTENTION_ON = ('x86-avx512',)


@functools.cache
def available() -> bool:
  """True when the fused kernel is built and registered (once per process)."""
  if not cpu_kernels.enabled('MINILLM_CPU_ATTENTION', ATTENTION_ON):
    return False
  targets = {f'minillm_attention_{n.lower()}': f'MinillmAttention{n}' for n in ('Forward', 'Backward', 'Decode')}
  return cpu_kernels.load(SRC, targets, 'fused CPU attention unavailable, using the pure-JAX attention (same '
                          'results, slower)') is not None


@jax.custom_vjp
def causal_attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(H), causal) v with kv head n // (N/K) for query head n, in float32."""
  return _fwd(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)[0]


def _forward_call(q, k, v):
  B, T, N, _ = q.shape
  return jax.ffi.ffi_call('minillm_attention_forward', (jax.ShapeDtypeStruct(q.shape, q.dtype),
                                                  jax.ShapeDtypeStruct((B, N, T), jnp.float32)))(q, k, v)


def _backward_call(q, k, v, o, lse, do):
  return jax.ffi.ffi_call('minillm_attention_backward', tuple(jax.ShapeDtypeStruct(x.shape, x.dtype)
                                                             for x in (q, k, v)))(q, k, v, o, lse, do)


def _batch_sharded(fn, rule: str):
  """fn as a custom call the SPMD partitioner splits along the batch axis (each device runs the kernel on its
  own rows) and keeps whole along the others; without a rule it would gather the batch onto every device."""
  f = custom_partitioning(fn)

  def shardings(mesh, arg_shapes, result_shape):
    spec = arg_shapes[0].sharding.spec
    batch = NamedSharding(mesh, P(spec[0] if len(spec) else None))
    return batch, jax.tree.map(lambda _: batch, result_shape)

  def partition(mesh, arg_shapes, result_shape):
    batch, results = shardings(mesh, arg_shapes, result_shape)
    return mesh, fn, results, tuple(batch for _ in arg_shapes)

  f.def_partition(partition, infer_sharding_from_operands=lambda *a: shardings(*a)[1], sharding_rule=rule,
                  need_replication_factors=('t', 'n', 'h', 'k'))  # in order of appearance
  return f


_forward = _batch_sharded(_forward_call, 'b t n h, b t k h, b t k h -> b t n h, b n t')
_backward = _batch_sharded(_backward_call, 'b t n h, b t k h, b t k h, b t n h, b n t, b t n h '
                                           '-> b t n h, b t k h, b t k h')


def _fwd(q, k, v):
  if not available() or q.dtype != jnp.float32:
    raise RuntimeError('the fused CPU attention runs float32 and is not available here; check available() first')
  o, lse_BxNxT = _forward(q, k, v)
  return o, (q, k, v, o, lse_BxNxT)


def _bwd(res, do_BxTxNxH):
  return tuple(_backward(*res, do_BxTxNxH))


causal_attention.defvjp(_fwd, _bwd)


DECODE_MAX_T = 8  # decode steps; prefill chunks (64 queries) stay on XLA's batched dots


def decode_supported(q_BxTxNxH: jax.Array, k_CxSxH: jax.Array) -> bool:
  return (q_BxTxNxH.shape[1] <= DECODE_MAX_T and q_BxTxNxH.dtype == k_CxSxH.dtype == jnp.float32
          and jax.default_backend() == 'cpu' and available())


def decode_attention(q_BxTxNxH: jax.Array, k_CxSxH: jax.Array, v_CxSxH: jax.Array, pos) -> jax.Array:
  """Queries at positions [pos, pos+T) against a KV cache [C = B*K, S, H] written at [0, pos+T), read in place."""
  return jax.ffi.ffi_call('minillm_attention_decode', jax.ShapeDtypeStruct(q_BxTxNxH.shape, jnp.float32))(
      q_BxTxNxH, k_CxSxH, v_CxSxH, jnp.asarray(pos, jnp.int32).reshape(()))
