"""Running the kernels per device under a mesh.

`pallas_call` has no sharding rule: on a mesh XLA would gather its operands and run the whole
kernel on every device. When a mesh is in context (`jax.set_mesh(mesh)` around the jitted call,
as qtx's train step, encoders and losses do), `sharded_call` wraps a kernel in `jax.shard_map`
so that each device runs it on its own shard: the batch axis split over the mesh axes the batch
is sharded over (BATCH_AXES, those whose sizes divide it) and the heads axis over the tensor axis
(HEAD_AXES) where there is one. Axes of size 1, axes already manual (inside another shard_map,
e.g. the ring loss) and axes that do not divide the dimension are left alone; with no mesh, or
nothing to split, the kernel runs as it is.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import jax
from jax.sharding import AxisType, PartitionSpec as P

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
  """fn(*args), per device when a mesh is in context (module docstring).

  args: arrays, or None for absent optional operands (passed through as None). dims: each
  operand's (batch dim, heads dim), None where it has none (a size-1 broadcast dimension must
  say None). out_dims / out_ndim: the same for the output. batch / heads: the sizes split.
  """
  batch_axes, head_axes = split_axes(batch, heads)
  if not batch_axes and not head_axes:
    return fn(*args)
  present = [i for i, a in enumerate(args) if a is not None]
  in_specs = tuple(_spec(args[i].ndim, dims[i], batch_axes, head_axes) for i in present)

  def body(*xs):
    full = list(args)
    for i, x in zip(present, xs):
      full[i] = x
    return fn(*full)

  out_spec = _spec(out_ndim, out_dims, batch_axes, head_axes)
  return jax.shard_map(body, mesh=context_mesh(), in_specs=in_specs, out_specs=out_spec,
                       check_vma=False)(*[args[i] for i in present])
