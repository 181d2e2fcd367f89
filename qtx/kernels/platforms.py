"""Which backend the kernels lay themselves out for.

A kernel's block sizes and lowering (Mosaic on TPU, Triton on GPU, the interpreter on CPU) are
chosen when it is traced, for, in this order:

1. the platform of `with qtx.kernels.target("gpu" | "tpu" | "cpu"):`, for lowering for a
   platform this host lacks (`jax.export(..., platforms=["cuda"])`);
2. the devices of the mesh in context (jax.set_mesh) or of the shard_map the kernel runs in,
   so that a program compiled for compile-only TPU devices gets TPU kernels on a CPU host;
3. the devices of the operands' shardings (a plain jax.jit whose inputs carry NamedShardings);
4. jax's default backend.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}
_state = threading.local()


def normalize(platform: str) -> str:
  p = _ALIASES.get(platform, platform)
  if p not in PLATFORMS:
    raise ValueError(f"unsupported platform {platform!r}; choose one of {PLATFORMS} "
                     "(or cuda / rocm)")
  return p


@contextlib.contextmanager
def target(platform: str):
  """Kernels traced inside lay themselves out for `platform` (module docstring, 1)."""
  p = normalize(platform)
  stack = getattr(_state, "stack", [])
  _state.stack = stack + [p]
  try:
    yield p
  finally:
    _state.stack = stack


def explicit() -> Optional[str]:
  """The innermost target() platform, or None."""
  stack = getattr(_state, "stack", [])
  return stack[-1] if stack else None


def _mesh_platform(mesh) -> Optional[str]:
  if mesh is None or getattr(mesh, "empty", True):
    return None
  dev = getattr(mesh, "abstract_device", None)
  if dev is not None and getattr(dev, "platform", None):
    return normalize(dev.platform)
  devices = getattr(mesh, "devices", None)
  if devices is not None and getattr(devices, "size", 0):
    return normalize(devices.flat[0].platform)
  return None


def operand_mesh(*arrays):
  """The mesh of the first operand whose sharding (jax.typeof(x).sharding inside a trace, the
  array's own outside) is a NamedSharding on a non-empty mesh, or None."""
  for a in arrays:
    if a is None:
      continue
    try:
      sh = getattr(jax.typeof(a), "sharding", None)
    except TypeError:
      sh = None
    mesh = getattr(sh, "mesh", None)
    if mesh is None:
      sh = getattr(a, "sharding", None)
      mesh = getattr(sh, "mesh", None)
    if mesh is not None and not getattr(mesh, "empty", True) and mesh.size > 0:
      return mesh
  return None


def platform(*arrays) -> str:
  """The platform the kernels are laid out for (module docstring's order)."""
  p = explicit()
  if p:
    return p
  p = _mesh_platform(jax.sharding.get_abstract_mesh())
  if p:
    return p
  p = _mesh_platform(operand_mesh(*arrays))
  if p:
    return p
  return normalize(jax.default_backend())
