"""FLOP accounting: analytic model FLOPs of a CLIP train step, the compiled cost analysis, and
per-device peak throughput for MFU (from the chip table, qtx.chips).

Model FLOPs count each multiply-add as 2 FLOPs, the backward pass as twice the forward, and no
rematerialisation (the usual MFU convention).
"""
from __future__ import annotations

from typing import Optional

import jax


def peak_tflops(device=None) -> Optional[float]:
  """Per-device dense bf16 peak in TFLOP/s from the chip table (qtx.chips), or None (CPU and
  unknown kinds report no MFU)."""
  from qtx import chips
  chip = chips.of_device(device or jax.devices()[0])
  return None if chip is None else chip.bf16_flops / 1e12


def encoder_flops(T: int, D: int, depth: int, mlp: int, causal: bool = False) -> float:
  """Forward FLOPs of one sequence through `depth` pre-LN blocks."""
  dense = 2 * T * (4 * D * D + 2 * D * mlp)
  keys = (T + 1) / 2 if causal else T  # average keys per query
  attn = 2 * 2 * T * keys * D  # q.k and p.v
  return depth * (dense + attn)


def clip_forward_flops(config) -> float:
  """Forward FLOPs of one (image, caption) pair."""
  m = config.model
  im, tx = m.image, m.text
  n_patches = (im.image_size // im.patch_size) ** 2
  T_img = n_patches + 1 + im.get("registers", 0)
  f = 2 * n_patches * im.patch_size ** 2 * im.channels * im.width  # patch embedding
  f += encoder_flops(T_img, im.width, im.depth, im.mlp_dim)
  f += 2 * im.width * m.embed_dim
  f += encoder_flops(tx.context_length, tx.width, tx.depth, tx.mlp_dim, causal=True)
  f += 2 * tx.width * m.embed_dim
  return float(f)


def train_step_flops(config) -> float:
  """Model FLOPs of one train step on the global batch (forward + backward = 3x forward,
  plus the B x B x E logits)."""
  B = config.train.batch_size
  logits = 2 * B * B * config.model.embed_dim
  return 3.0 * (B * clip_forward_flops(config) + logits)


def compiled_flops(compiled) -> Optional[float]:
  """FLOPs from XLA's cost analysis of a compiled executable (None when unavailable)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - backends differ in what they support
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  return float(ca["flops"])
