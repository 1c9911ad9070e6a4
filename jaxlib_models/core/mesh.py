"""Device mesh from a config, and logical-axis sharding rules.

The mesh has four axes, ("node", "data", "fsdp", "tensor"). "node" is the
slow hop between hosts or islands (DCN, Ethernet): the axis that hierarchical
gradient sync compresses and that DiLoCo replicas live on; the other three
are the fast links inside a node. A config gives their sizes (missing ones
are 1) and at most one may be -1, which takes the remaining devices.
Parameters and batches carry logical axis names; one rules table maps each
name to mesh axes. A dimension that the mapped mesh axes do not divide is
replicated instead (logged once), so the same model runs on any device count.
"""

import logging
import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("node", "data", "fsdp", "tensor")
BATCH_AXES = ("node", "data", "fsdp")

# Logical name -> mesh axes. Batches split over node, data and fsdp; parameters
# split their input dimension over fsdp (ZeRO-3 style) and their output
# (hidden units, heads, mlp) over tensor.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("in", "fsdp"),
    ("mlp", "tensor"),
    ("out", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
)

_warned: set[tuple] = set()


def mesh_shape(
    sizes: Mapping[str, int], num_devices: int
) -> tuple[int, int, int, int]:
  """Resolves -1 in {node, data, fsdp, tensor} sizes against the device count."""
  unknown = [k for k in sizes if k not in MESH_AXES]
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; valid are {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  fills = [i for i, s in enumerate(shape) if s == -1]
  if len(fills) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(sizes)}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh sizes must be positive or -1, got {dict(sizes)}")
  known = math.prod(s for s in shape if s != -1)
  if fills:
    if num_devices % known:
      raise ValueError(
          f"mesh {dict(sizes)}: {num_devices} devices are not divisible by"
          f" the fixed axes' product {known}"
      )
    shape[fills[0]] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices,"
        f" {num_devices} are available; set one axis to -1 to fill"
    )
  return tuple(shape)


def make_mesh(
    sizes: Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
  """Builds the (node, data, fsdp, tensor) mesh; default is pure data parallel."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(sizes or {"data": -1}, len(devices))
  return jax.make_mesh(
      shape,
      MESH_AXES,
      axis_types=(AxisType.Auto,) * len(MESH_AXES),
      devices=devices,
  )


def _mesh_size(mesh: jax.sharding.Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, object]] = DEFAULT_RULES,
) -> P:
  """Maps logical names of one array to a PartitionSpec for `mesh`."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {names} do not match shape {shape}")
  table = dict(rules)
  spec, used = [], set()
  for name, dim in zip(names, shape):
    axes = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no rule; rules: {list(table)}")
    flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
    flat = tuple(a for a in flat if mesh.shape[a] > 1 and a not in used)
    if flat and dim % _mesh_size(mesh, flat):
      key = (name, dim, flat)
      if key not in _warned:
        _warned.add(key)
        logging.info("replicating %s (size %d) not divisible by %s",
                     name, dim, flat)
      flat = ()
    used.update(flat)
    spec.append(flat[0] if len(flat) == 1 else (flat or None))
  return P(*spec)


def tree_shardings(axes_tree, abstract_tree, mesh, rules=DEFAULT_RULES):
  """NamedShardings for a pytree given a matching pytree of logical names."""
  is_names = lambda x: isinstance(x, tuple) and all(
      n is None or isinstance(n, str) for n in x
  )
  return jax.tree.map(
      lambda names, leaf: NamedSharding(
          mesh, logical_to_spec(names, leaf.shape, mesh, rules)
      ),
      axes_tree,
      abstract_tree,
      is_leaf=is_names,
  )


def batch_sharding(mesh: jax.sharding.Mesh, batch_size: int) -> NamedSharding:
  """Leading-axis sharding of a batch leaf over the data-parallel axes."""
  spec = logical_to_spec(("batch",), (batch_size,), mesh)
  return NamedSharding(mesh, spec)
