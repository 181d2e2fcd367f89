"""libtpu on a host without TPU chips: compile-only, and quiet.

With libtpu installed (`pip install 'jax[tpu]'`), a CPU-only host can compile for a TPU topology
ahead of time (qtx.aot). But libtpu, when JAX starts it on such a host, looks for the TPU VM's
metadata, prints two warnings (it cannot determine the accelerator type and the worker
hostnames) and lets only one process hold it (a second one, e.g. a second pytest worker, fails
to load it). None of that matters without chips: `quiet_compile_only()` sets the environment
that says so before JAX starts its backends (qtx/__init__ calls it): a placeholder accelerator
type and worker address for the runtime it never starts, no metadata query, and several
processes allowed. It changes nothing on a host with TPU chips, nor where the user has set any
of these variables.
"""
from __future__ import annotations

import glob
import os
import pathlib

_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v3, v4, v5p, v5e, v6e, and later) as JAX's own detection lists them
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
TPU_ENV_KEYS = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_SKIP_MDS_QUERY",
                "ALLOW_MULTIPLE_LIBTPU_LOAD")
# set (with the placeholders) by quiet_compile_only, so that qtx.distributed does not take the
# placeholder worker address for a TPU pod's
MARK = "QTX_TPU_COMPILE_ONLY"


def tpu_chips(root: str = "/sys/bus/pci/devices") -> int:
  """Number of TPU chips attached to this host (over PCI, or as /dev/accel* devices)."""
  n = 0
  for vendor in glob.glob(os.path.join(root, "*", "vendor")):
    try:
      if pathlib.Path(vendor).read_text().strip() != _GOOGLE_PCI_VENDOR:
        continue
      dev = pathlib.Path(os.path.dirname(vendor), "device").read_text().strip()
    except OSError:
      continue
    n += dev in _TPU_PCI_DEVICES
  return n or len(glob.glob("/dev/accel[0-9]*"))


def quiet_compile_only(environ=None) -> bool:
  """On a host without TPU chips, set libtpu's environment for compile-only use (module
  docstring); True when it did. Must run before JAX starts a backend to take effect."""
  env = os.environ if environ is None else environ
  if env.get(MARK) == "1":
    return False  # set already (a parent process)
  # (jax itself sets TPU_SKIP_MDS_QUERY on a host without chips when it is imported)
  if tpu_chips() or any(k in env for k in TPU_ENV_KEYS[:2]):
    return False
  env["TPU_ACCELERATOR_TYPE"] = "v5litepod-1"  # never used: no runtime starts without chips
  env["TPU_WORKER_HOSTNAMES"] = "localhost"
  env.setdefault("TPU_SKIP_MDS_QUERY", "1")
  env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  env[MARK] = "1"
  return True


_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def accelerator_devices() -> bool:
  """True when this host has TPU chips or GPU device files (NVIDIA, WSL, AMD)."""
  return bool(tpu_chips()) or any(os.path.exists(p) for p in _GPU_DEVICE_FILES)


def cpu_platform_default(environ=None) -> bool:
  """On a host without any accelerator, JAX_PLATFORMS=cpu unless the user set it: JAX would
  fall back to the CPU anyway, but an installed accelerator plugin (libtpu, the CUDA plugin
  for compiling without a GPU) would first try to start and print its failure. Compiling for
  TPU topologies or GPUs without devices (qtx.aot) works with it. True when it set it."""
  env = os.environ if environ is None else environ
  if env.get("JAX_PLATFORMS") is not None or accelerator_devices():
    return False
  env["JAX_PLATFORMS"] = "cpu"
  return True


def placeholder_env(environ=None) -> bool:
  """True when the TPU variables are quiet_compile_only's placeholders, not a real pod's."""
  return (os.environ if environ is None else environ).get(MARK) == "1"
