"""Device mesh, logical axis rules, and shardings of params and batches.

The mesh has axes ('data', 'fsdp', 'tensor'). Params and key activations carry logical axis
names (set in qtx/nn with `nn.with_logical_partitioning` / `nn.with_logical_constraint`);
`RULES` maps them to mesh axes. One rule set covers data parallel, FSDP, tensor parallel and
their combinations: an axis of size 1 shards nothing, so the mesh shape picks the strategy.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes); None = replicated.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("joint", None),
    ("patch", None),
    ("layers", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
)

RULE_SETS = {
    "default": RULES,
    # pure data parallel: every parameter replicated
    "replicated": tuple((k, ("data", "fsdp") if k == "batch" else None) for k, _ in RULES),
}


def rules_from_config(config) -> tuple:
  name = config.mesh.get("rules", "default")
  if name not in RULE_SETS:
    raise ValueError(f"unknown mesh.rules {name!r}; choose one of {sorted(RULE_SETS)}")
  return RULE_SETS[name]


def mesh_shape(shape: Mapping[str, int] | Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolve a mesh shape (dict over MESH_AXES or a 3-tuple; at most one -1 = the rest)."""
  if isinstance(shape, Mapping) or hasattr(shape, "items"):
    d = dict(shape.items())
    unknown = set(d) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(d.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(f"mesh.shape {tuple(sizes)} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh.shape {tuple(sizes)}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh.shape {tuple(sizes)}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh.shape {tuple(sizes)} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh.shape {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def num_slices(devices) -> int:
  """Number of TPU slices (multi-slice jobs connect slices over the data-centre network)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(shape, devices=None) -> Mesh:
  """Mesh over `devices` (default all). On multi-slice TPU jobs the 'data' axis spans the
  slices (DCN) and everything else stays inside a slice (ICI)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(shape, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  slices = num_slices(devices)
  if slices > 1:
    if sizes[0] % slices:
      raise ValueError(f"multi-slice job with {slices} slices: mesh.shape.data={sizes[0]} must "
                       f"be a multiple of the number of slices")
    from jax.experimental import mesh_utils
    ici = (sizes[0] // slices,) + tuple(sizes[1:])
    dcn = (slices,) + (1,) * (len(sizes) - 1)
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    return Mesh(arr, MESH_AXES, axis_types=axis_types)
  return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)


def batch_sharding(mesh: Mesh, rules=RULES) -> NamedSharding:
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))


def logical_to_sharding(logical_tree, mesh: Mesh, rules=RULES):
  """Pytree of logical PartitionSpecs -> pytree of NamedShardings. Only PartitionSpec leaves are
  converted, so empty tuple-like nodes (optax's MaskedNode in a partitioned optimizer state)
  keep their place in the tree."""
  return jax.tree.map(lambda spec: nn.logical_to_mesh_sharding(spec, mesh, rules), logical_tree,
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


class OnMesh:
  """A jitted function called (and lowered) with `mesh` in context (jax.set_mesh), so that what
  it traces can ask for the mesh: the Pallas kernels then run per device (qtx.kernels.sharding).
  Everything else about the function (its shardings, its results) is unchanged."""

  def __init__(self, fn, mesh: Mesh):
    self.fn, self.mesh = fn, mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.fn(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.fn.lower(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.fn, name)


def on_mesh(fn, mesh: Mesh | None):
  """`fn` run with `mesh` in context (OnMesh); `fn` itself when mesh is None."""
  return fn if mesh is None else OnMesh(fn, mesh)


def mesh_of(tree):
  """The mesh of the first leaf of `tree` (arrays or ShapeDtypeStructs) that carries a
  NamedSharding, or None."""
  for leaf in jax.tree.leaves(tree):
    sh = getattr(leaf, "sharding", None)
    if isinstance(sh, NamedSharding):
      return sh.mesh
  return None


def global_batch(local_batch: dict, mesh: Mesh, rules=RULES) -> dict:
  """Host-local numpy batch -> global jax.Array sharded over the batch axes."""
  sharding = batch_sharding(mesh, rules)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def check_fsdp(params_shardings, params_shapes, mesh: Mesh, min_bytes: int = 1 << 20):
  """Raise when FSDP is on and a parameter of >= min_bytes is fully replicated."""
  if mesh.shape["fsdp"] == 1:
    return
  bad = []
  for path, (sh, x) in _flat_pairs(params_shardings, params_shapes):
    nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    if nbytes >= min_bytes and all(a is None for a in sh.spec):
      bad.append(f"{path} {tuple(x.shape)}")
  if bad:
    raise ValueError("FSDP is on (mesh fsdp=%d) but these large parameters are replicated: %s"
                     % (mesh.shape["fsdp"], ", ".join(bad)))


def _flat_pairs(a, b):
  fa = jax.tree_util.tree_flatten_with_path(a)[0]
  fb = jax.tree.leaves(b)
  return [(jax.tree_util.keystr(p), (s, x)) for (p, s), x in zip(fa, fb)]
