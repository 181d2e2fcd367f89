"""Accelerator chips: the one table of their published peaks, and lookup by device kind.

Every figure is per JAX device (a v4 or v5p chip is one device: its two TensorCores run as one
"megacore"), as the vendor publishes it:

- TPU v4:  Google Cloud, "TPU v4" system architecture page (275 TFLOP/s bf16, 32 GiB HBM2 at
  1200 GB/s). Its per-chip ICI bandwidth is not on that page: None (no ICI bound is computed).
- TPU v5e: Google Cloud, "TPU v5e" page (197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, 400 GB/s
  bidirectional ICI per chip).
- TPU v5p: Google Cloud, "TPU v5p" page (459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s, 1200 GB/s
  bidirectional ICI per chip).
- TPU v6e: Google Cloud, "TPU v6e" (Trillium) page (918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s,
  800 GB/s bidirectional ICI per chip).
- H100 / H200 SXM: NVIDIA's data sheets (989 TFLOP/s dense bf16; 80 GB HBM3 at 3.35 TB/s,
  141 GB HBM3e at 4.8 TB/s; NVLink 900 GB/s). A100 SXM 80 GB: 312 TFLOP/s, 2.04 TB/s, 600 GB/s.

The pages write "GB" for HBM capacity; the TPU compiler's own limit for a v5e is 15.75 GiB
(its RESOURCE_EXHAUSTED message), so capacities are taken as GiB (16 GiB = 17.18e9 bytes), and
`fits` decisions keep a headroom below them (qtx.aot).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # short name used in topology names ("v5e")
  kinds: tuple[str, ...]  # lower-case substrings of jax's device_kind that identify it
  bf16_flops: float  # dense bf16 FLOP/s per device
  hbm_bytes: int  # HBM capacity per device
  hbm_bw: float  # HBM bytes/s per device
  ici_bw: Optional[float]  # bidirectional inter-chip bytes/s per device (None: not published)
  source: str


CHIPS: tuple[Chip, ...] = (
    Chip("v6e", ("tpu v6 lite", "tpu v6e"), 918e12, 32 * GiB, 1638e9, 800e9,
         "cloud.google.com/tpu/docs/v6e"),
    Chip("v5p", ("tpu v5p",), 459e12, 95 * GiB, 2765e9, 1200e9,
         "cloud.google.com/tpu/docs/v5p"),
    Chip("v5e", ("tpu v5 lite", "tpu v5e"), 197e12, 16 * GiB, 819e9, 400e9,
         "cloud.google.com/tpu/docs/v5e"),
    # device_kind "TPU v5" without "lite" is a v5p
    Chip("v5p", ("tpu v5",), 459e12, 95 * GiB, 2765e9, 1200e9,
         "cloud.google.com/tpu/docs/v5p"),
    Chip("v4", ("tpu v4",), 275e12, 32 * GiB, 1200e9, None,
         "cloud.google.com/tpu/docs/v4"),
    Chip("h200", ("h200",), 989e12, 141 * GiB, 4.8e12, 900e9, "NVIDIA H200 data sheet"),
    Chip("h100", ("h100",), 989e12, 80 * GiB, 3.35e12, 900e9, "NVIDIA H100 SXM data sheet"),
    Chip("a100", ("a100",), 312e12, 80 * GiB, 2.04e12, 600e9, "NVIDIA A100 SXM data sheet"),
)

TPU_NAMES = ("v4", "v5e", "v5p", "v6e")


def by_kind(device_kind: str) -> Optional[Chip]:
  """The chip whose kinds match `device_kind` (jax's Device.device_kind), or None."""
  kind = device_kind.lower()
  for chip in CHIPS:
    if any(k in kind for k in chip.kinds):
      return chip
  return None


def of_device(device) -> Optional[Chip]:
  """The chip of a jax device (None on CPU and for kinds not in the table)."""
  if device.platform == "cpu":
    return None
  return by_kind(device.device_kind)


def by_name(name: str) -> Chip:
  for chip in CHIPS:
    if chip.name == name:
      return chip
  raise ValueError(f"unknown chip {name!r}; the table has {sorted({c.name for c in CHIPS})}")
