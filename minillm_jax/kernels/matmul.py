"""Matrix kernels of XLA:CPU as XLA FFI custom calls:
- `matmul`: float32 products through OpenBLAS (cpu_matmul.cc, linked to the scipy-openblas32 wheel of the
  `blas` extra), the model's `mm` forward and backward. Products under MIN_MACS multiply-adds stay on XLA, whose
  per-call cost is lower; MINILLM_CPU_MATMUL_MIN_MACS moves that threshold (0: every float32 product, as the
  tests use it). Switch: MINILLM_CPU_MATMUL. Decoding batches (traced inside `decoding()`) of DECODE_MIN_ROWS
  rows or more take it at any size, where DECODE_ON says so (the same switch overrides).
- `gemv_bf16` (cpu_bf16.cc): decoding's products with weights stored in bfloat16 (the samplers'
  `weights='bfloat16'`): float32 activations and accumulation, half the bytes of weights read per token, which
  is what bounds batch-1 decoding.
- `transposed` (cpu_bf16.cc): a bfloat16 matrix's transpose written where XLA cannot fold it back into the dot
  that reads it, so the bfloat16 train step's gradient products run as XLA:CPU's native bfloat16 dots instead
  of widened float32 ones. Switch for both: MINILLM_CPU_BF16.
Where each is on by default: build.enabled and BENCHMARKS.md, "CPU kernels". Off or unbuildable, the callers
use XLA's dots, which compute the same function.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from minillm_jax import parallel
from minillm_jax.kernels import build as cpu_kernels

SRC = pathlib.Path(__file__).with_name('cpu_matmul.cc')
SRC_BF16 = pathlib.Path(__file__).with_name('cpu_bf16.cc')
# CPU classes where the kernels made a whole step at least 15% faster than XLA alone (BENCHMARKS.md, "CPU kernels")
MATMUL_ON = ('x86-avx512',)
BF16_ON = ('x86-avx512', 'x86-avx2')
DECODE_ON = ('x86-avx2',)  # OpenBLAS for the KV-cache decode step of a batch of DECODE_MIN_ROWS rows or more
DECODE_MIN_ROWS = 8  # measured faster at 8 and 16 rows; one row gained nothing, 2-7 rows were not measured


def _min_macs(default: int = 2 ** 28) -> int:
  v = os.environ.get('MINILLM_CPU_MATMUL_MIN_MACS', '')
  if not v.strip().isdigit():
    if v:
      logging.warning('MINILLM_CPU_MATMUL_MIN_MACS=%r is not a non-negative integer; using %d', v, default)
    return default
  return int(v)


MIN_MACS = _min_macs()
FALLBACK = "OpenBLAS matmuls unavailable, using XLA's dots (same results, slower)"


def _blas_flags() -> tuple[str, ...]:
  import scipy_openblas32 as blas  # the optional `blas` extra: only NumPy and SciPy should need it at run time
  lib = blas.get_lib_dir()
  return (f'-I{blas.get_include_dir()}', f'-L{lib}', f'-l{blas.get_library()}', f'-Wl,-rpath,{lib}')


@functools.cache
def available() -> bool:
  """True when the OpenBLAS matmul is on for this CPU, built and registered (once per process)."""
  return cpu_kernels.enabled('MINILLM_CPU_MATMUL', MATMUL_ON) and _loaded()


@functools.cache
def decode_available() -> bool:
  """True when decoding batches take the OpenBLAS matmul on this CPU (DECODE_ON), built and registered."""
  return cpu_kernels.enabled('MINILLM_CPU_MATMUL', DECODE_ON) and _loaded()


@functools.cache
def _loaded() -> bool:
  try:
    flags = _blas_flags()
  except ImportError:
    logging.warning("%s: OpenBLAS is not installed; pip install 'minillm-jax[blas]' (scipy-openblas32)", FALLBACK)
    return False
  return cpu_kernels.load(SRC, {'minillm_gemm': 'MinillmGemm'}, FALLBACK, flags) is not None


_tracing = threading.local()


@contextlib.contextmanager
def decoding():
  """Marks the model calls traced inside it as KV-cache decode steps (inference.jax_backend's jitted steps, not
  its prefill, whose 64-token chunks were slower on OpenBLAS): mm then takes OpenBLAS for batches of
  DECODE_MIN_ROWS rows or more where DECODE_ON says so (BENCHMARKS.md, "CPU kernels"). Training never enters
  it, so its programs do not change."""
  before = getattr(_tracing, 'decoding', False)
  _tracing.decoding = True
  try:
    yield
  finally:
    _tracing.decoding = before


def decode_supported(a_RxD: jax.Array, b_DxF: jax.Array) -> bool:
  return (getattr(_tracing, 'decoding', False) and a_RxD.dtype == b_DxF.dtype == jnp.float32
          and a_RxD.shape[0] >= DECODE_MIN_ROWS and jax.default_backend() == 'cpu' and decode_available())


@functools.cache
def bf16_available() -> bool:
  """True when the bfloat16 GEMV and transpose are on for this CPU, built and registered (once per process)."""
  if not cpu_kernels.enabled('MINILLM_CPU_BF16', BF16_ON):
    return False
  targets = {'minillm_gemv_bf16': 'MinillmGemvBf16', 'minillm_transpose_bf16': 'MinillmTransposeBf16'}
  return cpu_kernels.load(SRC_BF16, targets, "bfloat16 CPU kernels unavailable, using XLA's dots (same results, "
                          'slower)', ('-fopenmp-simd', '-ffp-contract=fast')) is not None


def supported(a_RxD: jax.Array, b_DxF: jax.Array) -> bool:
  """Whether mm takes OpenBLAS for a @ b: float32 on CPU, of MIN_MACS multiply-adds or more where MATMUL_ON
  says so, or a decode step's batch (decode_supported)."""
  big = (a_RxD.dtype == b_DxF.dtype == jnp.float32 and math.prod(a_RxD.shape) * b_DxF.shape[1] >= MIN_MACS
         and jax.default_backend() == 'cpu' and available())
  return big or decode_supported(a_RxD, b_DxF)


def _call(a, b, ta: bool, tb: bool, devices: int):
  M, N = a.shape[1 if ta else 0], b.shape[0 if tb else 1]
  # this process's devices of one program run their calls at the same time (a multi-host mesh counts all hosts')
  threads = max(1, parallel.host_cores() // min(devices, jax.local_device_count()))
  return jax.ffi.ffi_call('minillm_gemm', jax.ShapeDtypeStruct((M, N), jnp.float32))(
      a, b, ta=ta, tb=tb, threads=np.int32(threads))


def _rows(arg) -> object:
  spec = arg.sharding.spec
  return spec[0] if len(spec) else None


@functools.cache
def _partitioned(ta: bool, tb: bool):
  """The call as the SPMD partitioner sees it: rows (tokens) stay split over the devices and the rest is whole
  on each; a product that contracts the rows (the weight gradient, ta) adds the devices' partial sums."""
  f = custom_partitioning(lambda a, b: _call(a, b, ta, tb, 1))

  def shardings(mesh, args, result):
    rows = _rows(args[0])
    ins = (NamedSharding(mesh, P(rows, None)), NamedSharding(mesh, P(rows if ta else None, None)))
    return ins, NamedSharding(mesh, P(None if ta else rows, None))

  def partition(mesh, args, result):
    ins, out = shardings(mesh, args, result)
    rows = _rows(args[0])
    reduce = (lambda y: jax.lax.psum(y, rows)) if ta and rows is not None else (lambda y: y)
    return mesh, lambda a, b: reduce(_call(a, b, ta, tb, mesh.size)), out, ins

  rule = 'n k, n m -> k m' if ta else ('n k, m k -> n m' if tb else 'n k, k m -> n m')
  f.def_partition(partition, infer_sharding_from_operands=lambda *a: shardings(*a)[1], sharding_rule=rule,
                  reduction_factors=('n',) if ta else (), need_replication_factors=('k', 'm'))
  return f


def _require(ready: bool):
  if not ready:
    raise RuntimeError('this CPU kernel is not available here; check matmul.available() or bf16_available() first')


def _shard_map_mesh() -> jax.sharding.AbstractMesh | None:
  """Inside shard_map (a per-device program, nothing to partition): its mesh; else None."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh if not mesh.empty and mesh.manual_axes else None


def matmul(a: jax.Array, b: jax.Array, ta: bool = False, tb: bool = False) -> jax.Array:
  """op(a) @ op(b) in float32, op transposing when ta / tb: a [M, D] (ta: [D, M]), b [D, N] (tb: [N, D])."""
  _require(available() or decode_available())
  if (mesh := _shard_map_mesh()) is not None:
    return _call(a, b, ta, tb, mesh.size)
  return _partitioned(ta, tb)(a, b)


GEMV_MAX_ROWS = 16  # more rows (a prefill chunk) read each weight often enough for widened float32 dots to win
# Smaller matrices are widened for XLA's dots too: they sit in cache, and splitting them over threads costs more
# than the bytes saved (BENCHMARKS.md, "bfloat16 decode weights")
GEMV_MIN_WEIGHTS = 2 ** 18


def gemv_supported(x_RxD: jax.Array, w: jax.Array) -> bool:
  return (x_RxD.dtype == jnp.float32 and w.dtype == jnp.bfloat16 and x_RxD.ndim == 2
          and x_RxD.shape[0] <= GEMV_MAX_ROWS and w.size >= GEMV_MIN_WEIGHTS and jax.default_backend() == 'cpu'
          and bf16_available())


def gemv_bf16(x_RxD: jax.Array, w: jax.Array, tb: bool = False) -> jax.Array:
  """x @ w (tb: x @ w.T) in float32 for float32 x [R, D] and bfloat16 w [D, F] (tb: [F, D]), on XLA's
  intra-op thread pool."""
  _require(bf16_available())
  N = w.shape[0 if tb else 1]
  return jax.ffi.ffi_call('minillm_gemv_bf16', jax.ShapeDtypeStruct((x_RxD.shape[0], N), jnp.float32))(
      x_RxD, w, tb=tb)


def transpose_supported(x: jax.Array) -> bool:
  return x.dtype == jnp.bfloat16 and x.ndim == 2 and jax.default_backend() == 'cpu' and bf16_available()


def _transpose_call(x):
  return jax.ffi.ffi_call('minillm_transpose_bf16', jax.ShapeDtypeStruct(x.shape[::-1], x.dtype))(x)


@functools.cache
def _partitioned_transpose():
  """The transpose as the SPMD partitioner sees it: each device transposes its own block, the sharding swaps."""
  f = custom_partitioning(_transpose_call)

  def shardings(mesh, args, result):
    spec = tuple(args[0].sharding.spec) + (None, None)
    return (NamedSharding(mesh, P(spec[0], spec[1])),), NamedSharding(mesh, P(spec[1], spec[0]))

  def partition(mesh, args, result):
    ins, out = shardings(mesh, args, result)
    return mesh, _transpose_call, out, ins

  f.def_partition(partition, infer_sharding_from_operands=lambda *a: shardings(*a)[1], sharding_rule='n d -> d n')
  return f


@jax.custom_vjp
def transposed(x_RxC: jax.Array) -> jax.Array:
  """x.T for a 2-D bfloat16 x on CPU, written out row-major (see the module docstring)."""
  _require(bf16_available())
  return _transpose_call(x_RxC) if _shard_map_mesh() is not None else _partitioned_transpose()(x_RxC)


transposed.defvjp(lambda x: (transposed(x), None), lambda _, g: (transposed(g),))
