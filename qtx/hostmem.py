"""Host memory reuse for XLA on the CPU: keep freed buffers instead of handing them back.

On the CPU backend each call of a compiled step allocates its temporary buffer (all live
activations: about 350 MB for the tiny config's train step at batch 128) with malloc and frees
it at the end. glibc serves a request that large from a fresh mmap in the worker thread's arena
and unmaps it on free, so every step page-faults the whole buffer again (77,866 faults per step
on the development machine, about 5 us each under its hypervisor). Keeping one arena, never
mmap-ing and never trimming makes the next step reuse the same pages (docs/benchmarks.md has
the measurement).

`reuse_freed_memory()` sets glibc's malloc to that (mallopt: M_ARENA_MAX=1, M_MMAP_MAX=0,
M_TRIM_THRESHOLD=2 GiB). It must run before JAX starts its CPU threads (before the first
`jax.devices()` or computation) to cover them: threads keep the arena they first allocated
in. The costs: the process keeps its peak heap until it exits, and compiling was 6-25% slower
where measured. `python -m qtx.main`, the backcopy study and the benchmarks call it when the
run will be on the CPU only (`cpu_only()`); QTX_REUSE_HOST_MEMORY=0 turns it off, =1 forces it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

ENV = "QTX_REUSE_HOST_MEMORY"
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM = 2**31 - 1  # mallopt takes an int: 2 GiB, above any single buffer that is freed and reused
# Packages that give JAX an accelerator backend besides the CPU.
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin", "libtpu", "jax_plugins")



def cpu_only(platforms: str | None = None, plugins=ACCELERATOR_PLUGINS) -> bool:
  """True when JAX can only pick the CPU: `platforms` (default: JAX's jax_platforms setting,
  which JAX_PLATFORMS sets) names only cpu, or, when it is empty, none of `plugins` is
  installed (libtpu counts only on a host with TPU chips). Decided without starting a JAX backend."""
  if platforms is None:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if "jax" in sys.modules:
      platforms = sys.modules["jax"].config.jax_platforms or platforms
  if platforms:
    return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
  from qtx import tpu_host
  found = [p for p in plugins if importlib.util.find_spec(p) is not None]
  if "libtpu" in found and not tpu_host.tpu_chips():
    found.remove("libtpu")  # installed to compile for TPUs (qtx.aot); it runs nothing here
  return not found


def reuse_freed_memory() -> bool:
  """Sets glibc malloc to reuse freed memory (see the module docstring). True when it did;
  False where the C library is not glibc or the settings were refused. Calling it again
  changes nothing."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl has no such function
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                                             (_M_TRIM_THRESHOLD, _TRIM)))


def maybe_reuse_freed_memory() -> bool:
  """`reuse_freed_memory()` where it helps: on a CPU-only run, unless QTX_REUSE_HOST_MEMORY=0
  (=1 applies it whatever the backend)."""
  flag = os.environ.get(ENV, "")
  if flag == "0" or (flag != "1" and not cpu_only()):
    return False
  return reuse_freed_memory()
