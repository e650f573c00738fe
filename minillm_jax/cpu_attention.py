"""Fused causal attention on CPU: cpu_attention.cc compiled on first use and called as an XLA FFI custom call.

The library is built with the machine's C++ compiler into a cache keyed by the source, jaxlib's version and the
CPU, once per machine (3-7 s on 2 cores). Without a compiler (or with MINILLM_CPU_ATTENTION=0) `available()` is False
and the model keeps its pure-JAX blockwise attention, which computes the same function.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
from absl import logging
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from minillm_jax import cli

SRC = pathlib.Path(__file__).with_name('cpu_attention.cc')
# No -ffast-math: with GCC < 13 it links code into the library that sets flush-to-zero for the whole process.
FLAGS = ['-O3', '-march=native', '-fno-math-errno', '-mprefer-vector-width=512', '-std=c++17', '-shared', '-fPIC', '-w']


def _cpu_id() -> str:
  try:  # -march=native: a library built for one CPU may not run on another sharing the cache (home on NFS)
    return next(l for l in open('/proc/cpuinfo') if l.startswith('flags'))
  except (OSError, StopIteration):
    return platform.processor() + platform.machine()


def build() -> pathlib.Path:
  """Path of the compiled library, building it if this source/jaxlib/CPU has none yet. Raises on failure."""
  cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')
  if cxx is None:
    raise RuntimeError('no C++ compiler (g++, c++ or clang++) on PATH; set CXX to one')
  key = hashlib.sha256(b'\0'.join(x.encode() for x in [SRC.read_text(), jaxlib.__version__, _cpu_id(),
                                                         ' '.join(FLAGS), cxx])).hexdigest()[:16]
  out = pathlib.Path(cli.cache_dir()) / f'cpu_attention-{key}.so'
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, then renamed: parallel builds are safe
    so = pathlib.Path(tmp) / out.name
    cmd = [*shlex.split(cxx), *FLAGS, f'-I{jax.ffi.include_dir()}', str(SRC), '-o', str(so)]  # CXX='ccache g++'
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if r.returncode != 0:
      lines = r.stderr.splitlines()
      why = next((l for l in lines if 'error' in l), lines[-1] if lines else f'exit status {r.returncode}')
      raise RuntimeError(f'{cxx} could not build {SRC.name}: {why.strip()}')
    os.replace(so, out)
  return out


@functools.cache
def available() -> bool:
  """True when the fused kernel is built and registered (once per process)."""
  if os.environ.get('MINILLM_CPU_ATTENTION', '1') == '0':
    return False
  try:
    path = build()
    try:
      lib = ctypes.cdll.LoadLibrary(str(path))
    except OSError:  # e.g. built by a C compiler (CXX=gcc): unloadable, so rebuilt next time rather than kept
      path.unlink(missing_ok=True)
      raise
  except (RuntimeError, OSError) as e:
    logging.warning('fused CPU attention unavailable, using the pure-JAX attention (same results, slower): %s',
                    str(e).splitlines()[0])
    return False
  for name in ('Forward', 'Backward'):
    jax.ffi.register_ffi_target(f'minillm_attention_{name.lower()}',
                                jax.ffi.pycapsule(getattr(lib, f'MinillmAttention{name}')), platform='cpu')
  return True


def supported(q_BxTxNxH: jax.Array) -> bool:
  return q_BxTxNxH.dtype == jnp.float32 and available()


@jax.custom_vjp
def causal_attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(H), causal) v with kv head n // (N/K) for query head n; float32."""
  return _fwd(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)[0]


def _forward_call(q, k, v):
  B, T, N, _ = q.shape
  return jax.ffi.ffi_call('minillm_attention_forward', (jax.ShapeDtypeStruct(q.shape, q.dtype),
                                                        jax.ShapeDtypeStruct((B, N, T), q.dtype)))(q, k, v)


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
  if not available():
    raise RuntimeError('the fused CPU attention is not available here; check cpu_attention.available() first')
  o, lse_BxNxT = _forward(q, k, v)
  return o, (q, k, v, o, lse_BxNxT)


def _bwd(res, do_BxTxNxH):
  return tuple(_backward(*res, do_BxTxNxH))


causal_attention.defvjp(_fwd, _bwd)
