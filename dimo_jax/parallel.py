"""Where arrays live: the device mesh and the placements the step uses.

The mesh has two axes, `data` x `fsdp` (fully sharded data parallel). Every device carries a
slice of the batch: batch-shaped arrays are split along their leading axis over both axes
together. Parameters, EMA, optimizer states and the frozen teacher are split over `fsdp` only
(each leaf along one axis, see `param_sharding`), so with `fsdp` = N each device holds about
1/N of them; XLA gathers a leaf where the step needs it whole. With `fsdp` = 1 everything but
the batch is replicated. This is the only module that names mesh axes.
"""

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
# The mesh axes a batch is split over: all of them.
BATCH = (DATA, FSDP)
# Leaves with fewer elements stay replicated: biases, norm scales, counters and keys cost
# little memory, and splitting them would only add collectives.
MIN_SHARD_SIZE = 1024


def make_mesh(num_devices: int = -1, data: int = -1, fsdp: int = 1) -> Mesh:
  """A `data` x `fsdp` mesh over the first `num_devices` devices (-1: all of them).

  One of `data` and `fsdp` may be -1: the rest of the devices. The devices are laid out by
  `jax.experimental.mesh_utils.create_device_mesh`, which follows the physical topology (a TPU
  slice's torus, a host's GPUs) so that an `fsdp` group, the axis with the most traffic
  (gathered parameters), is made of neighbours; where it knows no topology (CPU, a subset of
  the devices) it keeps their order.
  """
  devices = jax.devices()
  if num_devices == 0 or num_devices < -1:
    raise ValueError(f"num_devices must be positive or -1 (all), got {num_devices}")
  if num_devices > len(devices):
    raise ValueError(f"asked for {num_devices} devices, {len(devices)} are visible")
  count = len(devices) if num_devices == -1 else num_devices
  for name, size in ((DATA, data), (FSDP, fsdp)):
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{name} must be positive or -1 (the rest), got {size}")
  if data == -1 and fsdp == -1:
    raise ValueError("at most one of mesh.data and mesh.fsdp may be -1")
  if data == -1 and count % fsdp == 0:
    data = count // fsdp
  elif fsdp == -1 and count % data == 0:
    fsdp = count // data
  if data * fsdp != count:
    raise ValueError(f"a mesh of data={data} x fsdp={fsdp} does not fit the {count} devices "
                     f"in use (num_devices={num_devices})")
  chosen = devices[:count]
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh((data, fsdp), chosen, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):  # no topology rule for this layout
    grid = np.asarray(chosen).reshape(data, fsdp)
  return Mesh(grid, (DATA, FSDP))


def batch_devices(mesh: Mesh) -> int:
  """How many devices a batch is split over (all of the mesh)."""
  return int(np.prod([mesh.shape[a] for a in BATCH]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def batch_sharded_at(mesh: Mesh, axis: int) -> NamedSharding:
  """Arrays whose axis `axis` is the batch (e.g. [rounds, B, ...] with axis 1), split there."""
  return NamedSharding(mesh, P(*([None] * axis), BATCH))


def batch_constraint(mesh: Mesh, batch_size: int) -> Callable[[jax.Array], jax.Array]:
  """Constrains a batch-shaped array to be split over every device of the mesh inside `jit`."""
  if batch_size % batch_devices(mesh):
    raise ValueError(f"the global batch {batch_size} does not split over the "
                     f"{batch_devices(mesh)} devices of the mesh "
                     f"(data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]})")
  sharding = batch_sharded(mesh)
  return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def leaf_spec(shape, fsdp: int, min_size: int = MIN_SHARD_SIZE) -> P:
  """The partition of one parameter-shaped leaf of `shape` over an `fsdp`-device axis.

  The leaf is split along its largest axis whose size `fsdp` divides (the first such, on a
  tie). It stays replicated when `fsdp` is 1, when it has fewer than `min_size` elements, or
  when no axis divides: memory is then spent, never correctness.
  """
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [i for i, n in enumerate(shape) if n % fsdp == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: (shape[i], -i))
  return P(*([None] * axis + [FSDP]))


def param_sharding(mesh: Mesh, tree: Any, min_size: int = MIN_SHARD_SIZE) -> Any:
  """A NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs), by shape alone.

  The same rule serves parameters, their EMA, Adam moments (which mirror the parameters'
  shapes, so they land where their parameters do), the frozen teacher and a whole train
  state: counters, keys and other small leaves come out replicated (see `leaf_spec`).
  """
  fsdp = mesh.shape[FSDP]
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, leaf_spec(x.shape, fsdp, min_size)), tree)


def shard_params(tree: Any, mesh: Mesh) -> Any:
  """`tree` placed by `param_sharding`."""
  return jax.device_put(tree, param_sharding(mesh, tree))


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def round_batch(requested: int, mesh: Mesh) -> int:
  """`requested` rounded up to a multiple of the mesh's device count."""
  devices = batch_devices(mesh)
  return max(1, -(-requested // devices)) * devices


def place_rows(rows: Callable[[np.ndarray], Any], indices: np.ndarray, mesh: Mesh,
               axis: int = 0) -> Any:
  """The pytree `rows(indices)` on the mesh, split along `axis` (the batch axis of `indices`),
  each process building only its own devices' rows: the same call in one process and in many.

  Args:
    rows: int[...] -> a pytree of arrays whose leading axes are those of its argument (an
      identity for class labels, `PromptConditions.condition` for prompts).
    indices: int[..., B, ...] with B at `axis`, the same in every process.
  """
  indices = np.asarray(indices)
  sharding = batch_sharded_at(mesh, axis)
  lead = indices.ndim
  built = {}  # a device's rows, built once for all the leaves

  def device_rows(where):
    key = repr(where[:lead])
    if key not in built:
      built[key] = jax.tree_util.tree_leaves(rows(indices[where[:lead]]))
    return built[key]

  example, tree = jax.tree_util.tree_flatten(rows(indices.reshape(-1)[:1]))
  return jax.tree_util.tree_unflatten(tree, [
      jax.make_array_from_callback(indices.shape + np.shape(value)[1:], sharding,
                                   lambda where, i=i: device_rows(where)[i])
      for i, value in enumerate(example)])


def pad_rows(values: np.ndarray, size: int) -> np.ndarray:
  """values[n <= size, ...] padded with zero rows to `size` (one compiled shape for every
  batch)."""
  values = np.asarray(values)
  return np.concatenate([values, np.zeros((size - len(values),) + values.shape[1:],
                                          values.dtype)])
