"""Where arrays live: the device mesh and the two placements the step uses.

Parameters, optimizer states and keys are replicated; every batch-shaped array is split along
its leading axis over the `data` mesh axis. This is the only module that names mesh axes.
"""

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(num_devices: int = -1) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (-1: all of them)."""
  devices = jax.devices()
  if num_devices > len(devices):
    raise ValueError(f"asked for {num_devices} devices, {len(devices)} are visible")
  count = len(devices) if num_devices == -1 else num_devices
  return Mesh(np.asarray(devices[:count]), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def batch_constraint(mesh: Mesh, batch_size: int) -> Callable[[jax.Array], jax.Array]:
  """Constrains a batch-shaped array to be split over the data axis inside `jit`."""
  if batch_size % mesh.shape[DATA]:
    raise ValueError(f"the global batch {batch_size} does not split over "
                     f"{mesh.shape[DATA]} devices of the data axis")
  sharding = batch_sharded(mesh)
  return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))
