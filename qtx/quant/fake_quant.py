"""Uniform fake quantization (quantize -> dequantize in floating point).

The grid follows Bondarenko et al. 2023 (section 5 of the paper, PAPERS.md section 1):

  x_hat = s * (clip(round(x / s) + z, q_lo, q_hi) - z)

- asymmetric (activations): grid [0, 2^b - 1]; the range [x_min, x_max] is first widened to
  include 0, scale s = (x_max - x_min) / (2^b - 1), zero point z = round(-x_min / s).
- symmetric (weights): grid [-2^(b-1), 2^(b-1) - 1], s = max(|x_min|, |x_max|) / (2^(b-1) - 1),
  z = 0.

Gradients use the straight-through estimator (STE): d x_hat / d x = 1 where x lies inside the
representable range [s * (q_lo - z), s * (q_hi - z)] (endpoints included) and 0 outside, where
the value is clipped. No gradient flows into x_min / x_max: ranges are calibration statistics.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MIN_BITS = 2
MAX_BITS = 16


class QuantGrid(NamedTuple):
  """Scale, zero point and integer bounds of a uniform grid (arrays broadcastable to x)."""
  scale: jax.Array
  zero_point: jax.Array
  q_lo: int
  q_hi: int


def validate_bits(num_bits) -> int:
  """Returns num_bits as int, or raises ValueError naming the accepted range."""
  if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not (
      MIN_BITS <= num_bits <= MAX_BITS):
    raise ValueError(
        f"num_bits={num_bits!r} is not supported; choose an integer in "
        f"[{MIN_BITS}, {MAX_BITS}]")
  return int(num_bits)


def integer_bounds(num_bits: int, symmetric: bool) -> tuple[int, int]:
  """(q_lo, q_hi): [0, 2^b - 1] asymmetric, [-2^(b-1), 2^(b-1) - 1] symmetric."""
  b = validate_bits(num_bits)
  if symmetric:
    return -(2 ** (b - 1)), 2 ** (b - 1) - 1
  return 0, 2 ** b - 1


def _compute_dtype(dtype) -> jnp.dtype:
  """Grid arithmetic runs in at least float32 (bf16 cannot hold a 16-bit grid)."""
  return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(
      dtype, jnp.floating) else jnp.dtype(jnp.float32)


def quant_grid(x_min, x_max, num_bits: int = 8, symmetric: bool = False,
               dtype=jnp.float32) -> QuantGrid:
  """Scale and zero point of the grid covering [x_min, x_max].

  A degenerate range (x_min == x_max == 0) yields the smallest positive normal scale instead
  of 0, so that nothing divides by zero; `fake_quant` then maps every input to exactly 0.
  """
  q_lo, q_hi = integer_bounds(num_bits, symmetric)
  x_min = jnp.asarray(x_min, dtype)
  x_max = jnp.asarray(x_max, dtype)
  tiny = jnp.finfo(dtype).tiny
  if symmetric:
    absmax = jnp.maximum(jnp.abs(x_min), jnp.abs(x_max))
    scale = jnp.maximum(absmax / q_hi, tiny)
    zero_point = jnp.zeros_like(scale)
  else:
    x_min = jnp.minimum(x_min, 0.0)
    x_max = jnp.maximum(x_max, 0.0)
    scale = jnp.maximum((x_max - x_min) / (q_hi - q_lo), tiny)
    zero_point = jnp.clip(jnp.round(-x_min / scale), q_lo, q_hi)
  return QuantGrid(scale, zero_point, q_lo, q_hi)


def quantize(x, grid: QuantGrid):
  """Integer codes clip(round(x / s) + z, q_lo, q_hi), as floats of x's compute dtype."""
  return jnp.clip(jnp.round(x / grid.scale) + grid.zero_point, grid.q_lo, grid.q_hi)


def dequantize(q, grid: QuantGrid):
  return grid.scale * (q - grid.zero_point)


def fake_quant(x, x_min, x_max, num_bits: int = 8, symmetric: bool = False):
  """Quantize-dequantize x on the uniform grid covering [x_min, x_max].

  Args:
    x: array to quantize (any floating dtype; the result has x's dtype).
    x_min, x_max: range, scalars or arrays broadcastable to x (per-channel / per-token ranges
      keep the reduced axes with size 1).
    num_bits: integer bit width in [2, 16].
    symmetric: symmetric signed grid (weights) instead of asymmetric unsigned (activations).

  Returns:
    x_hat with x's shape and dtype. Gradient w.r.t. x: 1 inside the representable range,
    0 where clipped (straight-through estimator); none w.r.t. x_min / x_max.
  """
  x = jnp.asarray(x)
  out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  dtype = _compute_dtype(x.dtype)
  x_c = x.astype(dtype)
  grid = quant_grid(jax.lax.stop_gradient(x_min), jax.lax.stop_gradient(x_max),
                    num_bits, symmetric, dtype)
  x_hat = dequantize(quantize(jax.lax.stop_gradient(x_c), grid), grid)
  lo = grid.scale * (grid.q_lo - grid.zero_point)
  hi = grid.scale * (grid.q_hi - grid.zero_point)
  # Degenerate range [0, 0]: the only representable value is 0.
  degenerate = grid.scale <= jnp.finfo(dtype).tiny
  x_hat = jnp.where(degenerate, 0.0, x_hat)
  lo = jnp.where(degenerate, 0.0, lo)
  hi = jnp.where(degenerate, 0.0, hi)
  inside = jax.lax.stop_gradient((x_c >= lo) & (x_c <= hi))
  # Forward value is exactly x_hat (the where-term is 0); backward passes 1 where `inside`.
  ste = jnp.where(inside, x_c - jax.lax.stop_gradient(x_c), jnp.zeros_like(x_c))
  out = jax.lax.stop_gradient(x_hat) + ste
  return out.astype(out_dtype)
