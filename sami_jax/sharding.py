"""Device mesh and the shardings of parameters and batches.

The mesh has two axes, ("data", "fsdp"). Batches are split over both (every device holds a distinct
slice of the global batch). Parameters and optimizer state are replicated by default; under FSDP
(an "fsdp" axis larger than 1) every leaf with at least `config.fsdp_min_size` elements is split
along its largest dimension that the fsdp axis divides, and XLA inserts the all-gathers.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sami_jax import configlib

BATCH_AXES = ("data", "fsdp")


def make_mesh(config, devices=None) -> Mesh:
  """The ("data", "fsdp") mesh over all (or the given) devices, sized by `config.mesh`."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = configlib.parse_mesh(config.mesh, len(devices))
  shape = (sizes["data"], sizes["fsdp"])
  if devices == list(jax.devices()):
    # Auto axes: XLA propagates shardings (jax.make_mesh defaults to Explicit axes, under which
    # a conv of a batch-sharded input with an fsdp-sharded kernel is a ShardingTypeError).
    return jax.make_mesh(shape, ("data", "fsdp"), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
  return Mesh(np.asarray(devices).reshape(shape), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """The PartitionSpec of one array under the FSDP rule (replicated when it does not apply)."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh, config):
  """A pytree of NamedShardings matching `abstract_state` (a pytree of ShapeDtypeStructs)."""
  fsdp_size = mesh.shape["fsdp"]

  def one(leaf):
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, fsdp_spec(tuple(shape), fsdp_size, config.fsdp_min_size))
  return jax.tree.map(one, abstract_state)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Per-process numpy batch -> global jax.Arrays split over the mesh's devices."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
