"""TPU topologies as compile-only devices, on any host with libtpu installed.

A topology is named as the TPU compiler names it, `<chip>:<shape>` (`v5e:2x4`, `v5e:16x16`,
`v4:2x2x2`, `v5p:4x4x4`, `v6e:2x4`), or as Cloud TPU accelerator types are named,
`<chip>-<n>` (`v5e-8`, `v5e-256`, `v6e-8`; for v4 and v5p n counts TensorCores, two per chip:
`v4-8` and `v5p-8` are 4 chips). `v5e:1x1` / `v5e-1` and `v6e:1x1` / `v6e-1` are the single
chip of a Colab TPU runtime. `h100-8` / `h100:2x8` (hosts x GPUs) compile for H100s through
JAX's CUDA plugin and a target description of the GPU (no GPU needed). Hosts follow Cloud TPU's machine shapes: v5e and v6e slices of up to
8 chips are one host, larger ones 4 chips per host; v4 and v5p 4 chips per host. With
num_slices > 1 the slices are joined by the data-centre network (multi-slice).
"""
from __future__ import annotations

import dataclasses
import math
import re

from qtx import chips as chips_lib

# chips -> 2-D shape of v5e / v6e slices (Cloud TPU's v5litepod-N / v6e-N)
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
# chips -> 3-D shape of v4 / v5p slices
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16)}
_MEGACORE = ("v4", "v5p")  # one device per chip of two TensorCores
# GPUs compiled for without one: the XLA GPU compiler's target description shipped with qtx
GPU_SPECS = {"h100": "h100_sxm.txtpb"}
GPU_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class Topology:
  chip: str  # "v5e"
  shape: tuple[int, ...]  # chips along each torus axis: (2, 4) or (2, 2, 2)
  num_slices: int = 1

  @property
  def platform(self) -> str:
    return "gpu" if self.chip in GPU_SPECS else "tpu"

  @property
  def name(self) -> str:
    return f"{self.chip}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    """Chips per host along each axis (3-D, as libtpu takes it); for GPUs (hosts, GPUs per
    host) is the shape."""
    if self.platform == "gpu":
      return (self.shape[1], 1, 1)
    shape3 = tuple(self.shape) + (1,) * (3 - len(self.shape))
    n = self.chips_per_slice
    if self.chip in _MEGACORE:
      return shape3 if n <= 4 else (2, 2, 1)
    if n <= 8:
      return shape3
    return (2, 2, 1)

  @property
  def hosts(self) -> int:
    return self.chips // math.prod(self.host_bounds)

  @property
  def spec(self) -> chips_lib.Chip:
    return chips_lib.by_name(self.chip)


def parse(name: str, num_slices: int = 1) -> Topology:
  """Topology from 'v5e:2x4' or 'v5e-8' (module docstring); ValueError naming the forms."""
  forms = ("a topology such as v5e:2x4, v5e:16x16, v6e:2x4, v4:2x2x1, v5p:2x2x2, or an "
           "accelerator type such as v5e-8, v5e-256, v6e-8, v4-8, v5p-8 (v5e-1 / v6e-1: the "
           "single chip of a Colab TPU runtime)")
  s = name.strip().lower()
  if num_slices < 1:
    raise ValueError(f"compile.num_slices must be >= 1, got {num_slices}")
  m = re.fullmatch(r"(h100)(?:-(\d+)|:(\d+)x(\d+))", s)
  if m:  # h100-N (8 GPUs per host) or h100:HOSTSxGPUS
    if m.group(2):
      n = int(m.group(2))
      shape = (max(1, -(-n // GPU_PER_HOST)), min(n, GPU_PER_HOST))
      if shape[0] * shape[1] != n:
        raise ValueError(f"compile.topology {name!r}: {n} GPUs do not fill hosts of "
                         f"{GPU_PER_HOST}; give h100:HOSTSxGPUS")
    else:
      shape = (int(m.group(3)), int(m.group(4)))
    if num_slices != 1:
      raise ValueError("compile.num_slices applies to TPU topologies only")
    return Topology("h100", shape, 1)
  m = re.fullmatch(r"(v\d+[a-z]*)[:=_]((?:\d+x)*\d+)", s)
  if m:
    chip, shape = m.group(1), tuple(int(k) for k in m.group(2).split("x"))
  else:
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", s)
    if not m:
      raise ValueError(f"compile.topology {name!r} is not {forms}")
    chip, n = m.group(1), int(m.group(2))
    if chip in _MEGACORE:
      if n % 2:
        raise ValueError(f"compile.topology {name!r}: {chip}-N counts TensorCores (2 per chip)")
      n //= 2
    table = _SHAPES_3D if chip in _MEGACORE else _SHAPES_2D
    if n not in table:
      raise ValueError(f"compile.topology {name!r}: no standard {chip} slice of {n} chips "
                       f"({sorted(table)}); give its shape, e.g. {chip}:"
                       f"{'x'.join(map(str, next(iter(table.values()))))}")
    shape = table[n]
  if chip not in chips_lib.TPU_NAMES:  # (GPUs were handled above)
    raise ValueError(f"compile.topology {name!r}: chip {chip!r} is not in the chip table "
                     f"(qtx.chips: {chips_lib.TPU_NAMES})")
  want = 3 if chip in _MEGACORE else 2
  if len(shape) != want or min(shape) < 1:
    raise ValueError(f"compile.topology {name!r}: a {chip} topology has {want} axes, e.g. "
                     f"{chip}:{'x'.join(['2'] * want)}")
  return Topology(chip, shape, num_slices)


def devices(topo: Topology) -> list:
  """Compile-only jax devices of the topology (libtpu needed, no TPU; for GPUs the CUDA
  plugin, no GPU)."""
  if topo.platform == "gpu":
    return _gpu_devices(topo)
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover - jax always has it
    raise ValueError(f"this jax cannot describe TPU topologies: {e}") from None
  kw = dict(chip_config_name="megacore" if topo.chip in _MEGACORE else "default",
            chips_per_host_bounds=topo.host_bounds)
  if topo.num_slices > 1:
    kw["num_slices"] = topo.num_slices
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.name, **kw)
  except Exception as e:  # noqa: BLE001 - missing plugin or a topology libtpu refuses
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "libtpu" in msg.lower() or "plugin" in msg.lower() or "tpu" not in msg.lower():
      raise ValueError(
          f"cannot compile for TPU topology {topo.name}: {msg}. Compiling for a TPU on a host "
          "without one needs libtpu: pip install 'jax[tpu]' (the version matching jax)") from None
    raise ValueError(f"libtpu refuses topology {topo.name}: {msg}") from None
  return list(desc.devices)


def _gpu_devices(topo: Topology) -> list:
  """Compile-only GPU devices: the CUDA PJRT plugin compiles for the target description in
  qtx/aot/gpu_specs without a GPU (the shape is 1 slice x hosts x GPUs per host)."""
  import importlib.resources
  from jax.experimental import topologies
  spec = importlib.resources.files("qtx.aot").joinpath("gpu_specs", GPU_SPECS[topo.chip])
  shape = f"1x{topo.shape[0]}x{topo.shape[1]}"
  try:
    desc = topologies.get_topology_desc(platform="cuda", topology_name=shape, topology=shape,
                                        target_config=spec.read_text())
  except Exception as e:  # noqa: BLE001 - no CUDA plugin, or one that refuses
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(
        f"cannot compile for {topo.name} without a GPU: {msg}. It needs JAX's CUDA plugin "
        "(no GPU or CUDA libraries needed): pip install jax-cuda13-plugin jax-cuda13-pjrt "
        "(the version of jax)") from None
  return list(desc.devices)
