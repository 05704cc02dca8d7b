"""Device mesh, logical-axis rules, and the shardings of parameters and batches.

The mesh has three axes: `data` (batch only), `fsdp` (batch, and parameters + optimizer state
sharded along their 'embed' axis) and `tensor` (attention heads and feed-forward units). Batches are
split over data x fsdp. Parameters carry logical axis names (see attention.dense), mapped to mesh
axes by RULES; an axis whose size does not divide stays replicated.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from transformer import errors

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
RULES = {'embed': 'fsdp', 'heads': 'tensor', 'mlp': 'tensor'}  # others ('vocab', None): replicated


def mesh_shape(config, num_devices: int) -> dict[str, int]:
  """{axis: size} of config's mesh over num_devices; config.mesh_data = -1 takes the devices
  left by the others. ConfigError if the sizes do not fit num_devices."""
  sizes = [config.mesh_data, config.mesh_fsdp, config.mesh_tensor]
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1 or num_devices % fixed:
    raise errors.ConfigError(
        f'Mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) does not fit '
        f'{num_devices} devices; set config.mesh_* so their product divides it and at most one '
        'is -1.')
  sizes = [num_devices // fixed if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != num_devices:
    raise errors.ConfigError(f'Mesh {dict(zip(AXES, sizes))} uses {int(np.prod(sizes))} devices '
                             f'but {num_devices} are available.')
  return dict(zip(AXES, sizes))


def make_mesh(config, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh of mesh_shape(config) over `devices` (default: all)."""
  devices = jax.devices() if devices is None else devices
  sizes = tuple(mesh_shape(config, len(devices)).values())
  return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_sharding(logical_spec, shape, mesh: Mesh) -> NamedSharding:
  """Maps logical axis names to mesh axes by RULES, replicating dims the mesh axis can't divide."""
  mesh_axes = []
  for name, dim in zip(tuple(logical_spec) + (None,) * len(shape), shape):
    axis = RULES.get(name)
    mesh_axes.append(axis if axis and dim % mesh.shape[axis] == 0 else None)
  return NamedSharding(mesh, P(*mesh_axes))


def tree_shardings(boxed_tree, mesh: Mesh):
  """Shardings for the unboxed version of a tree whose leaves may be nn.Partitioned boxes.

  Works on abstract trees (jax.eval_shape output): Partitioned leaves get their logical names
  mapped by RULES, every other leaf (step counters, rng) is replicated.
  """
  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      return logical_to_sharding(leaf.names, leaf.value.shape, mesh)
    return NamedSharding(mesh, P())

  return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def data_parallel_size(shape) -> int:
  """How many ways a batch is split: the devices along the batch axes of a mesh's shape
  (mesh.shape, or mesh_shape()'s dict)."""
  return math.prod(shape[axis] for axis in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's numpy batch -> global jax arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
