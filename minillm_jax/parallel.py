"""Device mesh and shardings: data parallel over all devices by default, FSDP (params + optimizer state sharded
over the same 'data' axis, ZeRO-3 style) as an option. Works unchanged across processes (multi-host)."""
from __future__ import annotations

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
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


def batch_sharding(mesh: Mesh, accum: bool) -> NamedSharding:
  return NamedSharding(mesh, P(None, AXIS) if accum else P(AXIS))


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
  """This process's rows -> global arrays sharded over the mesh (the per-process data shards join)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
