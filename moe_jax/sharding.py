"""Device mesh and logical-axis sharding (DESIGN.md: Sharding).

Layer code names logical axes (`batch`, `embed`, `heads`, `mlp`, `vocab`,
`expert`, ...); `config.mesh` gives the mesh shape over the axes
(data, fsdp, expert, tensor) and the logical -> mesh rules. Everything jitted
in training gets explicit NamedShardings from here.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, ...]:
  """Axis sizes of MESH_AXES, the one -1 axis taking the remaining devices."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f'mesh: fixed axis sizes {dict(zip(MESH_AXES, sizes))} '
                       f'do not divide the {num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh: axis sizes {dict(zip(MESH_AXES, sizes))} '
                     f'multiply to {math.prod(sizes)}, not the {num_devices} '
                     'devices')
  return tuple(sizes)


def make_mesh(mesh_config: Any,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The Mesh of `config.mesh` over `devices` (default: every device)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_rules(mesh_config: Any) -> tuple[tuple[str, Any], ...]:
  """`config.mesh.rules` as the tuple flax's logical partitioning expects."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in mesh_config.rules)


def tree_shardings(boxed_abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings of a tree whose leaves may be nn.LogicallyPartitioned.

  Args:
    boxed_abstract_tree: e.g. `jax.eval_shape` of an init that keeps the
      logical boxes; unboxed leaves are replicated.
    mesh, rules: from `make_mesh` / `logical_rules`.

  Returns:
    A tree shaped like `nn.unbox(boxed_abstract_tree)` of NamedShardings.
  """
  check_divisible(boxed_abstract_tree, mesh, rules)
  specs = nn.get_partition_spec(boxed_abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(boxed_abstract_tree: Any, mesh: Mesh, rules) -> None:
  """Raises a ValueError naming the parameter, logical and mesh axes when a
  dimension does not split evenly over the mesh axes its logical axis maps to.
  """
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  leaves = jax.tree_util.tree_flatten_with_path(boxed_abstract_tree,
                                                is_leaf=is_box)[0]
  for path, leaf in leaves:
    if not is_box(leaf):
      continue
    spec = nn.logical_to_mesh_axes(leaf.names, rules)
    for dim, (size, name, axes) in enumerate(
        zip(leaf.value.shape, leaf.names, spec)):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        raise ValueError(
            f'{jax.tree_util.keystr(path)}: dimension {dim} (logical axis '
            f"'{name}') has size {size}, which does not split over mesh "
            f'axes {axes} of {ways} devices; change config.mesh '
            f"({', '.join(f'{a}={mesh.shape[a]}' for a in axes)}) or the "
            'model size')


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of a [B, S] token batch: B over the rule of logical 'batch'."""
  spec = nn.logical_to_mesh_axes(('batch', 'seq'), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict[str, np.ndarray],
                 sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's slice of the global batch -> global jax Arrays."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}
