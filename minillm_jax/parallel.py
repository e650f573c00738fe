"""Device mesh and shardings: data parallel over all devices by default, FSDP (params + optimizer state sharded
over the same 'data' axis, ZeRO-3 style) as an option. Works unchanged across processes (multi-host)."""
from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = 'data'


def host_cores() -> int:
  """The cores this process may run on (its affinity mask where the OS has one)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def cpu_flags() -> set[str]:
  """The CPU's feature flags (Linux /proc/cpuinfo: `flags` on x86, `Features` on ARM; empty elsewhere)."""
  try:
    with open('/proc/cpuinfo') as f:
      line = next(ln for ln in f if ln.startswith(('flags', 'Features')))
    return set(line.split(':', 1)[1].split())
  except (OSError, StopIteration, IndexError):
    return set()


def cpu_device_count(requested: int, batch_size: int, weights: float) -> int:
  """How many CPU devices to train on. 0 (auto): one per usable core, at most 8, the largest count that divides
  the batch and keeps a replica of params + Adam state + grads per device (16 bytes/weight) under 1/4 of RAM."""
  if requested > 0:
    return requested
  cores = min(host_cores(), 8)
  ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  fits = max(1, int(ram / 4 // max(16 * weights, 1)))
  return largest_divisor(batch_size, min(cores, fits))


def largest_divisor(n: int, limit: int) -> int:
  """The most devices (<= limit) that split a batch of n rows evenly."""
  return max(d for d in range(1, limit + 1) if n % d == 0)


def use_cpu_devices(n: int) -> bool:
  """Splits the host CPU into n JAX devices (JAX's jax_num_cpu_devices), so data parallelism spreads a step over
  the cores: XLA:CPU parallelises a single small op poorly (BENCHMARKS.md, "CPU"). Must run before JAX starts
  its backends; a device count already in XLA_FLAGS wins, and machines with an accelerator plugin are left
  alone. Returns whether it applied. Callers keep few programs in flight: dozens of queued programs with
  collectives deadlocked XLA:CPU's in-process all-reduce on 2 cores (jax 0.10.2)."""
  accelerator = os.environ.get('JAX_PLATFORMS', '') != 'cpu' and any(
      importlib.util.find_spec(m) for m in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'libtpu', 'jax_plugins'))
  if n <= 1 or accelerator or 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return False
  try:
    jax.config.update('jax_num_cpu_devices', n)
  except RuntimeError:  # the backends already started (a library call ran JAX first): keep what they have
    return False
  return True


def make_mesh(devices=None) -> Mesh:
  # each process's devices side by side, so a process's rows of a global batch are one contiguous block
  # (data.pipeline gives process p rows [p*B/n, (p+1)*B/n))
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id)) if devices is None else devices
  # Auto axes (GSPMD): jax.make_mesh defaults to Explicit axes in jax 0.10 (STACK_NOTES §7)
  return Mesh(np.array(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], n: int, fsdp: bool, min_size: int = 2 ** 14) -> P:
  """FSDP: shard the largest axis that the device count divides; small tensors stay replicated."""
  if not fsdp or n == 1 or int(np.prod(shape)) < min_size:
    return P()
  for ax in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[ax] % n == 0:
      return P(*([None] * ax + [AXIS]))
  return P()


def param_shardings(mesh: Mesh, params, fsdp: bool):
  n = mesh.shape[AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, n, fsdp)), params)


def opt_shardings(mesh: Mesh, tx: optax.GradientTransformation, params, p_shardings):
  """Optimizer moments follow their parameter's sharding; counters and schedules are replicated
  (a plain jit(tx.init) would leave them on one device: STACK_NOTES §7)."""
  abstract = jax.eval_shape(tx.init, params)
  return optax.tree_utils.tree_map_params(tx, lambda _, s: s, abstract, p_shardings,
                                          transform_non_params=lambda _: replicated(mesh))


def batch_sharding(mesh: Mesh, lead: int = 0) -> NamedSharding:
  """Rows split over the mesh; `lead` leading axes (steps of a call, accumulated micro-batches) unsplit."""
  return NamedSharding(mesh, P(*[None] * lead, AXIS))


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
  """This process's rows -> global arrays sharded over the mesh (the per-process data shards join). The row axis
  is the one `sharding` splits; each process holds an equal, contiguous block of it (make_mesh's order)."""
  n = jax.process_count()
  if n == 1:  # same result, with less host work per step
    return jax.device_put(batch, sharding)
  ax = len(sharding.spec) - 1
  return {k: jax.make_array_from_process_local_data(
      sharding, v, (*v.shape[:ax], v.shape[ax] * n, *v.shape[ax + 1:])) for k, v in batch.items()}


def shared_batch(batch: dict, sharding: NamedSharding) -> dict:
  """Arrays every process holds whole (the validation batches) -> global arrays sharded over the mesh."""
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in batch.items()}
