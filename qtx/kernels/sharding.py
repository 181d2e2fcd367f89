"""Running the kernels per device under a mesh.

`pallas_call` has no sharding rule: on a mesh XLA would gather its operands and run the whole
kernel on every device (Mosaic refuses outright). When a mesh is in context (`jax.set_mesh(mesh)`
around the jitted call, as qtx's train step, encoders and losses do), or else when the operands
carry NamedShardings (a plain jax.jit), `sharded_call` wraps a kernel in `jax.shard_map` so that
each device runs it on its own shard: the batch axis split over the mesh axes the batch
is sharded over (BATCH_AXES, those whose sizes divide it) and the heads axis over the tensor axis
(HEAD_AXES) where there is one. Axes of size 1, axes already manual (inside another shard_map,
e.g. the ring loss) and axes that do not divide the dimension are left alone; with nothing to
split on a mesh of several devices every device runs the whole kernel on gathered operands
(correct, not fast); with no mesh the kernel runs as it is.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import jax
from jax.sharding import AxisType, PartitionSpec as P

from qtx.kernels import platforms as target_lib

BATCH_AXES = ("data", "fsdp")
HEAD_AXES = ("tensor",)

Dims = tuple[Optional[int], Optional[int]]  # (batch dim, heads dim) of one operand


def context_mesh():
  """The mesh in context (jax.set_mesh), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def _fit(mesh, names: Sequence[str], n: int) -> tuple[str, ...]:
  """The axes of `names` (in order) that split a dimension of size n evenly."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  axes, size = [], 1
  for a in names:
    if a not in types or types[a] == AxisType.Manual:
      continue
    k = mesh.shape[a]
    if k > 1 and n % (size * k) == 0:
      axes.append(a)
      size *= k
  return tuple(axes)


def split_axes(batch: int, heads: Optional[int] = None, mesh=None
               ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(batch axes, head axes) the kernels split over for these sizes under `mesh` (default:
  the context mesh); ((), ()) without one."""
  mesh = context_mesh() if mesh is None else mesh
  if mesh is None:
    return (), ()
  return _fit(mesh, BATCH_AXES, batch), (_fit(mesh, HEAD_AXES, heads) if heads else ())


def _spec(ndim: int, dims: Dims, batch_axes, head_axes) -> P:
  parts = [None] * ndim
  b, h = dims
  if b is not None and batch_axes:
    parts[b] = batch_axes
  if h is not None and head_axes:
    parts[h] = head_axes
  return P(*parts)


def sharded_call(fn: Callable, args: Sequence, dims: Sequence[Dims], out_dims: Dims,
                 out_ndim: int, batch: int, heads: Optional[int] = None):
  """fn(*args), per device on the mesh in context or, without one, on the mesh of the operands'
  shardings (module docstring); traced for that mesh's platform (qtx.kernels.target).

  args: arrays, or None for absent optional operands (passed through as None). dims: each
  operand's (batch dim, heads dim), None where it has none (a size-1 broadcast dimension must
  say None). out_dims / out_ndim: the same for the output. batch / heads: the sizes split.
  """
  with target_lib.target(target_lib.platform(*args)):
    return _sharded_call(fn, args, dims, out_dims, out_ndim, batch, heads)


def _sharded_call(fn, args, dims, out_dims, out_ndim, batch, heads):
  mesh = context_mesh() or target_lib.operand_mesh(*args)
  batch_axes, head_axes = split_axes(batch, heads, mesh)
  if not batch_axes and not head_axes and (mesh is None or _free_size(mesh) <= 1):
    return fn(*args)
  # with nothing to split on a mesh of several devices the kernel still runs inside shard_map,
  # on whole (replicated) operands: a pallas_call cannot be partitioned by XLA
  present = [i for i, a in enumerate(args) if a is not None]
  in_specs = tuple(_spec(args[i].ndim, dims[i], batch_axes, head_axes) for i in present)

  def body(*xs):
    full = list(args)
    for i, x in zip(present, xs):
      full[i] = x
    return fn(*full)

  out_spec = _spec(out_ndim, out_dims, batch_axes, head_axes)
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_spec,
                       check_vma=False)(*[args[i] for i in present])


def _free_size(mesh) -> int:
  """Devices along the mesh's axes that are not manual already."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  size = 1
  for a in mesh.axis_names:
    if types[a] != AxisType.Manual:
      size *= mesh.shape[a]
  return size
