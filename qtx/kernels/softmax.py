"""Two-pass softmax (Dukhan & Ablavatski 2020) as a Pallas kernel, with masking and clipping.

The separate max pass of the three-pass softmax is gone; each row is reduced once and normalised
once:

- Pass 1 folds the row, chunk by chunk, into an accumulator (v, e) with sum_i e^x_i = v * 2^e:
  e is an integer exponent (the largest n_i = round(x_i log2 e) seen so far) and v the sum of the
  scaled exponentials exp(x_i - e ln 2) <= sqrt(2) each. Merging accumulators rescales v by
  2^(e - e'), an exact power of two, so no finite input overflows. The scaled exponentials use a
  Cody-Waite split of ln 2 (e * LN2_HI is exact), which keeps inputs of magnitude 1e4 accurate.
- Pass 2 writes y_i = exp(x_i - e ln 2) / v, then the optional clip of the clipped softmax
  (Bondarenko et al. 2023, eq. 4): clip((zeta - gamma) * y + gamma, 0, 1). Masked entries are
  exactly 0 and a fully masked row is all zeros.

A row that fits one chunk is read from memory once (both passes run on the loaded block); longer
rows are read twice and written once.

The backward pass is its own two-pass kernel: it recomputes the unclipped softmax s from x and the
saved (e, v), forms g_eff = g * (zeta - gamma) * 1[0 < (zeta - gamma) s + gamma < 1] (g_eff = g
without clipping), and writes dx = s * (g_eff - sum(g_eff * s)).

Backends: Pallas Triton on GPU (chunked rows with bounds-masked loads; block shapes are powers of
two), Mosaic on TPU (whole rows in VMEM, row blocks a multiple of the sublane tiling) and the
Triton-style kernels in interpret mode on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qtx.kernels import sharding
from qtx.kernels import platforms as target_lib

Array = jax.Array

# The normalizer arguments two_pass_softmax takes (a normalizer whose kernel arguments go beyond
# these, e.g. a sink or softplus re-weighting, runs only in the two-pass attention kernel).
NORMALIZER_ARGS = frozenset({"gamma", "zeta"})

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# ln 2 split so that e * LN2_HI is exact for integers |e| < 2**14 (|x| up to ~1.1e4; beyond that
# the result only loses the accuracy of a plain fp32 product). LN2_HI = 710 / 1024.
LN2_HI = 0.693359375
LN2_LO = LN2 - LN2_HI

PLATFORMS = target_lib.PLATFORMS


# ----------------------------------------------------------------------------------------------
# Backend selection and block I/O shared by the kernels of this package.


def resolve_platform(interpret: Optional[bool], platform: Optional[str] = None) -> tuple[str, bool]:
  """(platform, interpret): the backend the kernels are laid out for and whether to interpret.

  interpret=None interprets on CPU and compiles on GPU (Triton) and TPU (Mosaic). The platform
  is `platform` when given, else the one qtx.kernels.target resolves (a target() context, the
  mesh's devices, jax's default backend).
  """
  platform = target_lib.normalize(platform) if platform else target_lib.platform()
  if interpret is None:
    interpret = platform == "cpu"
  if platform == "cpu" and not interpret:
    raise ValueError("Pallas kernels run on CPU only with interpret=True (got interpret=False)")
  return platform, bool(interpret)


def compiler_params(platform: str, interpret: bool, num_warps: int = 4, num_stages: int = 2,
                    semantics: tuple[str, ...] = ("parallel",)) -> Any:
  """Backend compiler parameters (None in interpret mode)."""
  if interpret:
    return None
  if platform == "gpu":
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  if platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=semantics,
                                vmem_limit_bytes=64 * 1024 * 1024)
  return None


def load(ref, idx, mask, other, masked: bool):
  """ref[idx]; with `masked`, a bounds-masked load (out-of-range entries read as `other`)."""
  if masked:
    from jax.experimental.pallas import triton as plgpu
    return plgpu.load(ref.at[idx], mask=mask, other=other)
  return ref[idx]


def store(ref, idx, value, mask, masked: bool):
  """ref[idx] = value; with `masked`, only where `mask` holds."""
  if masked:
    from jax.experimental.pallas import triton as plgpu
    plgpu.store(ref.at[idx], value.astype(ref.dtype), mask=mask)
  else:
    ref[idx] = value.astype(ref.dtype)


def chunk_loop(n_chunks: int, body, init):
  """fori_loop over chunks; a single chunk runs inline with a static index."""
  if n_chunks == 1:
    return body(0, init)
  return lax.fori_loop(0, n_chunks, body, init)


def next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


# ----------------------------------------------------------------------------------------------
# Plans: block sizes per backend.


@dataclasses.dataclass(frozen=True)
class RowPlan:
  """How the row kernels are laid out. Hashable; a static argument of the custom_vjp."""
  platform: str
  interpret: bool
  block_rows: int
  block_cols: int
  n_chunks: int
  masked: bool        # bounds-masked loads (Triton style) vs whole in-bounds blocks (Mosaic)
  mask_dtype: Any
  num_warps: int = 4


def make_plan(n_rows: int, n_cols: int, dtype, interpret: Optional[bool] = None,
              platform: Optional[str] = None, block_rows: Optional[int] = None,
              block_cols: Optional[int] = None) -> RowPlan:
  """Block sizes for rows of length n_cols.

  GPU (Triton): rows of up to 16384 entries are one chunk held in registers (read once, written
  once), ~4096 entries per program, ~16 per thread. Longer rows are reduced in chunks of 4096 by
  one program per row and read a second time in pass 2; 32 warps per program keep the rows in
  flight few enough (2 programs per SM) for that second read to come from L2 on H100-class GPUs.
  TPU (Mosaic): the whole row is one block in VMEM, row blocks of 8 (32-bit) or 16 (16-bit)
  sublanes at least, up to ~4 MiB of x per block.
  CPU (interpret): chunks of 128 so that the chunked path is what the tests run.
  """
  platform, interpret = resolve_platform(interpret, platform)
  if n_rows < 1 or n_cols < 1:
    raise ValueError(f"softmax rows must be non-empty, got {n_rows} rows of length {n_cols}")
  for name, b in (("block_rows", block_rows), ("block_cols", block_cols)):
    if b is not None and (b < 1 or b & (b - 1)):
      raise ValueError(f"{name} must be a positive power of two, got {b}")
  if platform == "tpu":
    itemsize = jnp.dtype(dtype).itemsize
    budget = 4 * 1024 * 1024
    fit = max(1, budget // (n_cols * max(itemsize, 4)))
    sublanes = 8 if itemsize >= 4 else 16
    rows = block_rows or min(256, max(sublanes, 1 << (fit.bit_length() - 1)))
    rows = n_rows if n_rows <= rows else rows  # a block equal to the full dimension is allowed
    return RowPlan(platform, interpret, rows, n_cols, 1, masked=False, mask_dtype=jnp.int32)
  if platform == "gpu":
    whole = next_pow2(n_cols)
    cols = block_cols or (whole if whole <= 16384 else 4096)
    rows = block_rows or max(1, 4096 // cols)
    rows = min(rows, next_pow2(n_rows))
    n_chunks = -(-n_cols // cols)
    warps = 32 if n_chunks > 1 else min(16, max(4, rows * cols // 512))
    return RowPlan(platform, interpret, rows, cols, n_chunks, masked=True, mask_dtype=jnp.int8,
                   num_warps=warps)
  cols = block_cols or min(next_pow2(n_cols), 128)
  rows = min(block_rows or max(1, min(1024 // cols, 64)), next_pow2(n_rows))
  return RowPlan(platform, interpret, rows, cols, -(-n_cols // cols), masked=True,
                 mask_dtype=jnp.int8)


# ----------------------------------------------------------------------------------------------
# Kernel math on one chunk (fp32).


def _exponent(x, valid):
  """Integer exponent n = round(x log2 e) of e^x, -inf where not valid."""
  return jnp.where(valid, jnp.floor(x * LOG2E + 0.5), -jnp.inf)


def _finite(e):
  """The accumulator exponent to scale by: 0 while nothing was seen (all terms are then 0)."""
  return jnp.where(e == -jnp.inf, 0.0, e)


def _scaled_exp(x, e_ref, valid):
  """exp(x - e_ref ln 2), with the Cody-Waite split of ln 2; 0 where not valid."""
  return jnp.where(valid, jnp.exp((x - e_ref * LN2_HI) - e_ref * LN2_LO), 0.0)


def _merge(acc, x, valid):
  """Fold a chunk into the per-row accumulator (e, v) (Dukhan & Ablavatski pass 1)."""
  e, v = acc
  e_new = jnp.maximum(e, jnp.max(_exponent(x, valid), axis=1, keepdims=True))
  e_ref = _finite(e_new)
  p = _scaled_exp(x, e_ref, valid)
  # e = -inf (nothing seen yet) scales the empty sum v = 0 by exp2(-inf) = 0.
  v_new = v * jnp.exp2(e - e_ref) + jnp.sum(p, axis=1, keepdims=True)
  return e_new, v_new


def _softmax_chunk(x, valid, e, v):
  """Unclipped softmax of a chunk from the row's accumulator; 0 where not valid."""
  inv_v = jnp.where(v > 0, 1.0 / jnp.where(v > 0, v, 1.0), 0.0)
  return _scaled_exp(x, _finite(e), valid) * inv_v


def _clip(s, gamma, zeta):
  return jnp.clip((zeta - gamma) * s + gamma, 0.0, 1.0)


def _clip_active(s, gamma, zeta, valid):
  a = (zeta - gamma) * s + gamma
  return valid & (a > 0.0) & (a < 1.0)


# ----------------------------------------------------------------------------------------------
# Kernels.


def _chunk_io(plan: RowPlan, n_rows: int, n_cols: int):
  """(row_ok (br x 1), index and bounds mask of chunk c)."""
  br, bc = plan.block_rows, plan.block_cols
  row = pl.program_id(0) * br + lax.broadcasted_iota(jnp.int32, (br, 1), 0)
  row_ok = row < n_rows

  def chunk(c):
    start = c * bc
    col = start + lax.broadcasted_iota(jnp.int32, (1, bc), 1)
    return (slice(None), pl.ds(start, bc)), row_ok & (col < n_cols)

  return row_ok, chunk


def _load_chunk(plan, x_ref, mask_ref, idx, inb):
  x = load(x_ref, idx, inb, 0.0, plan.masked).astype(jnp.float32)
  valid = inb
  if mask_ref is not None:
    valid = valid & (load(mask_ref, idx, inb, 0, plan.masked) != 0)
  return x, valid


def _forward_kernel(*refs, plan: RowPlan, n_rows: int, n_cols: int, has_mask: bool, clip: bool,
                    zeta: float, write_y: bool):
  refs = list(refs)
  x_ref = refs.pop(0)
  mask_ref = refs.pop(0) if has_mask else None
  gamma_ref = refs.pop(0) if clip else None
  y_ref = refs.pop(0) if write_y else None
  e_ref, v_ref = refs
  br = plan.block_rows
  row_ok, chunk = _chunk_io(plan, n_rows, n_cols)
  init = (jnp.full((br, 1), -jnp.inf, jnp.float32), jnp.zeros((br, 1), jnp.float32))
  gamma = load(gamma_ref, (slice(None), slice(None)), row_ok, 0.0, plan.masked) if clip else None

  def write(idx, inb, x, valid, e, v):
    y = _softmax_chunk(x, valid, e, v)
    if clip:
      y = jnp.where(valid, _clip(y, gamma, zeta), 0.0)
    store(y_ref, idx, y, inb, plan.masked)

  if plan.n_chunks == 1:
    idx, inb = chunk(0)
    x, valid = _load_chunk(plan, x_ref, mask_ref, idx, inb)
    e, v = _merge(init, x, valid)
    if write_y:
      write(idx, inb, x, valid, e, v)
  else:
    def pass1(c, acc):
      idx, inb = chunk(c)
      return _merge(acc, *_load_chunk(plan, x_ref, mask_ref, idx, inb))

    e, v = lax.fori_loop(0, plan.n_chunks, pass1, init)
    if write_y:
      def pass2(c, carry):
        idx, inb = chunk(c)
        write(idx, inb, *_load_chunk(plan, x_ref, mask_ref, idx, inb), e, v)
        return carry

      lax.fori_loop(0, plan.n_chunks, pass2, 0)
  full = (slice(None), slice(None))
  store(e_ref, full, e, row_ok, plan.masked)
  store(v_ref, full, v, row_ok, plan.masked)


def _backward_kernel(*refs, plan: RowPlan, n_rows: int, n_cols: int, has_mask: bool, clip: bool,
                     zeta: float):
  refs = list(refs)
  x_ref = refs.pop(0)
  mask_ref = refs.pop(0) if has_mask else None
  gamma_ref = refs.pop(0) if clip else None
  e_ref, v_ref, g_ref, dx_ref = refs[:4]
  dgamma_ref = refs[4] if clip else None
  br = plan.block_rows
  full = (slice(None), slice(None))
  row_ok, chunk = _chunk_io(plan, n_rows, n_cols)
  e = load(e_ref, full, row_ok, -jnp.inf, plan.masked)
  v = load(v_ref, full, row_ok, 0.0, plan.masked)
  gamma = load(gamma_ref, full, row_ok, 0.0, plan.masked) if clip else None

  def recompute(c):
    idx, inb = chunk(c)
    x, valid = _load_chunk(plan, x_ref, mask_ref, idx, inb)
    s = _softmax_chunk(x, valid, e, v)
    g = load(g_ref, idx, inb, 0.0, plan.masked).astype(jnp.float32)
    if clip:
      active = _clip_active(s, gamma, zeta, valid)
      g_eff = jnp.where(active, g * (zeta - gamma), 0.0)
      dgam = jnp.where(active, g * (1.0 - s), 0.0)
    else:
      g_eff, dgam = jnp.where(valid, g, 0.0), None
    return idx, inb, s, g_eff, dgam

  def pass1(c, acc):
    _, _, s, g_eff, dgam = recompute(c)
    dot, dg = acc
    dot = dot + jnp.sum(g_eff * s, axis=1, keepdims=True)
    if clip:
      dg = dg + jnp.sum(dgam, axis=1, keepdims=True)
    return dot, dg

  def write(idx, inb, s, g_eff, dot):
    store(dx_ref, idx, s * (g_eff - dot), inb, plan.masked)

  zeros = jnp.zeros((br, 1), jnp.float32)
  if plan.n_chunks == 1:
    idx, inb, s, g_eff, dgam = recompute(0)
    dot = jnp.sum(g_eff * s, axis=1, keepdims=True)
    dg = jnp.sum(dgam, axis=1, keepdims=True) if clip else zeros
    write(idx, inb, s, g_eff, dot)
  else:
    dot, dg = lax.fori_loop(0, plan.n_chunks, pass1, (zeros, zeros))

    def pass2(c, carry):
      idx, inb, s, g_eff, _ = recompute(c)
      write(idx, inb, s, g_eff, dot)
      return carry

    lax.fori_loop(0, plan.n_chunks, pass2, 0)
  if clip:
    store(dgamma_ref, full, dg, row_ok, plan.masked)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers on 2-D rows.


def _specs(plan: RowPlan, n_cols: int):
  br = plan.block_rows
  width = plan.n_chunks * plan.block_cols if plan.masked else n_cols
  row_block = pl.BlockSpec((br, width), lambda i: (i, 0))
  stat_block = pl.BlockSpec((br, 1), lambda i: (i, 0))
  return row_block, stat_block


# Per element of the R x N rows: (FLOPs, transcendentals) of each kernel, counted from its
# passes. Forward: pass 1 scales, rounds and exponentiates (Cody-Waite: 2 multiply-adds) and
# accumulates; pass 2 exponentiates again and divides; the clip adds a multiply-add and two
# comparisons. logsumexp runs pass 1 only. Backward: the recomputed softmax (as pass 2), then
# g_eff * s, its row sum, and s * (g_eff - sum).
ROW_COST = {
    "two_pass_softmax_fwd": (10, 2),
    "two_pass_softmax_fwd_clip": (13, 2),
    "two_pass_softmax_lse": (6, 1),
    "two_pass_softmax_bwd": (9, 1),
    "two_pass_softmax_bwd_clip": (13, 1),
}


def cost_estimate(name: str, n_rows: int, n_cols: int, args, out_shape) -> pl.CostEstimate:
  """pl.CostEstimate of one row-kernel call: ROW_COST x R x N; bytes = every operand read once
  and every result written once."""
  fl, tr = ROW_COST[name]
  n = n_rows * n_cols
  nbytes = sum(a.size * a.dtype.itemsize for a in args)
  nbytes += sum(math.prod(o.shape) * jnp.dtype(o.dtype).itemsize for o in out_shape)
  return pl.CostEstimate(flops=fl * n, transcendentals=tr * n, bytes_accessed=int(nbytes))


def _call(kernel, plan: RowPlan, n_rows: int, in_specs, out_specs, out_shape, name, cost=None):
  return pl.pallas_call(
      kernel, grid=(pl.cdiv(n_rows, plan.block_rows),), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=plan.interpret, name=name, cost_estimate=cost,
      compiler_params=compiler_params(plan.platform, plan.interpret, plan.num_warps,
                                      num_stages=1))


def _forward_rows(x_RxN, mask_RxN, gamma_Rx1, plan: RowPlan, zeta: float, write_y: bool = True):
  """Pass 1 (+ pass 2 when write_y): (y, e, v) with e, v the per-row accumulator (R x 1)."""
  R, N = x_RxN.shape
  row_block, stat_block = _specs(plan, N)
  has_mask, clip = mask_RxN is not None, gamma_Rx1 is not None
  kernel = functools.partial(_forward_kernel, plan=plan, n_rows=R, n_cols=N, has_mask=has_mask,
                             clip=clip, zeta=zeta, write_y=write_y)
  args = [x_RxN] + ([mask_RxN] if has_mask else []) + ([gamma_Rx1] if clip else [])
  in_specs = [row_block] + [row_block] * has_mask + [stat_block] * clip
  stat = jax.ShapeDtypeStruct((R, 1), jnp.float32)
  out_shape = ([jax.ShapeDtypeStruct((R, N), x_RxN.dtype)] if write_y else []) + [stat, stat]
  out_specs = [row_block] * write_y + [stat_block, stat_block]
  which = ("two_pass_softmax_fwd" + ("_clip" if clip else "")) if write_y else "two_pass_softmax_lse"
  cost = cost_estimate(which, R, N, args, out_shape)
  outs = _call(kernel, plan, R, in_specs, out_specs, out_shape, "two_pass_softmax_fwd",
               cost)(*args)
  return (outs[0] if write_y else None), outs[-2], outs[-1]


def _backward_rows(x_RxN, mask_RxN, gamma_Rx1, e_Rx1, v_Rx1, g_RxN, plan: RowPlan, zeta: float):
  R, N = x_RxN.shape
  row_block, stat_block = _specs(plan, N)
  has_mask, clip = mask_RxN is not None, gamma_Rx1 is not None
  kernel = functools.partial(_backward_kernel, plan=plan, n_rows=R, n_cols=N, has_mask=has_mask,
                             clip=clip, zeta=zeta)
  args = ([x_RxN] + ([mask_RxN] if has_mask else []) + ([gamma_Rx1] if clip else [])
          + [e_Rx1, v_Rx1, g_RxN])
  in_specs = [row_block] + [row_block] * has_mask + [stat_block] * clip + [stat_block] * 2 + [
      row_block]
  out_shape = [jax.ShapeDtypeStruct((R, N), x_RxN.dtype)]
  out_specs = [row_block]
  if clip:
    out_shape.append(jax.ShapeDtypeStruct((R, 1), jnp.float32))
    out_specs.append(stat_block)
  cost = cost_estimate("two_pass_softmax_bwd" + ("_clip" if clip else ""), R, N, args, out_shape)
  outs = _call(kernel, plan, R, in_specs, out_specs, out_shape, "two_pass_softmax_bwd",
               cost)(*args)
  return outs[0], (outs[1] if clip else None)


@dataclasses.dataclass(frozen=True)
class _Static:
  plan: RowPlan
  zeta: float


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _softmax_rows(x_RxN, mask_RxN, gamma_Rx1, static: _Static):
  y, _, _ = _forward_rows(x_RxN, mask_RxN, gamma_Rx1, static.plan, static.zeta)
  return y


def _softmax_rows_fwd(x_RxN, mask_RxN, gamma_Rx1, static: _Static):
  y, e, v = _forward_rows(x_RxN, mask_RxN, gamma_Rx1, static.plan, static.zeta)
  return y, (x_RxN, mask_RxN, gamma_Rx1, e, v)


def _softmax_rows_bwd(static: _Static, res, g_RxN):
  x_RxN, mask_RxN, gamma_Rx1, e, v = res
  dx, dgamma = _backward_rows(x_RxN, mask_RxN, gamma_Rx1, e, v, g_RxN, static.plan, static.zeta)
  return dx, None, dgamma


_softmax_rows.defvjp(_softmax_rows_fwd, _softmax_rows_bwd)


# ----------------------------------------------------------------------------------------------
# Public functions.


def check_clip_params(gamma, zeta) -> None:
  """Validates concrete clipped-softmax parameters: gamma <= 0, zeta >= 1."""
  if isinstance(gamma, (int, float)) and gamma > 0:
    raise ValueError(f"clipped softmax needs gamma <= 0, got gamma={gamma}")
  try:
    zeta = float(zeta)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise TypeError(f"zeta must be a static float, got {zeta!r}") from None
  if zeta < 1:
    raise ValueError(f"clipped softmax needs zeta >= 1, got zeta={zeta}")


def _check_float(x, name="x"):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating array (float32, bfloat16, float16), "
                    f"got {x.dtype}")


def _to_rows(x, axis):
  """Moves `axis` last and flattens the rest: (x_RxN, shape after the move)."""
  x = jnp.moveaxis(x, axis, -1)
  return x.reshape(-1, x.shape[-1]), x.shape


def _gamma_full(gamma, shape, axis):
  """gamma (a scalar or an array broadcastable to the rows: size 1 along `axis`) broadcast to
  the row shape (`shape` with size 1 along `axis`)."""
  gamma = jnp.asarray(gamma, jnp.float32)
  row_shape = shape[:axis] + (1,) + shape[axis + 1:]
  try:
    return jnp.broadcast_to(gamma, row_shape)
  except ValueError:
    raise ValueError(f"gamma of shape {gamma.shape} does not broadcast to the rows "
                     f"{row_shape} (a scalar or one value per row)") from None


def two_pass_softmax(x: Array, axis: int = -1, where: Optional[Array] = None, gamma=None,
                     zeta: float = 1.0, interpret: Optional[bool] = None, *,
                     block_rows: Optional[int] = None,
                     block_cols: Optional[int] = None) -> Array:
  """Softmax along `axis` by the two-pass algorithm; clipped softmax when gamma is given.

  Args:
    x: float32 / bfloat16 / float16 array; computed in float32, returned in x.dtype.
    axis: the axis to normalise.
    where: boolean mask broadcastable to x, True = attend. Masked entries are exactly 0; a fully
      masked row is all zeros.
    gamma: None (plain softmax), or gamma <= 0 for clip((zeta - gamma) * softmax(x) + gamma, 0, 1)
      (Bondarenko et al. 2023, eq. 4): a Python float, a traced scalar, or an array with one value
      per row (size 1 along `axis`). Differentiable.
    zeta: the clipped softmax's stretch, a Python float >= 1.
    interpret: None = interpret on CPU, compile on GPU/TPU.
    block_rows, block_cols: block sizes (powers of two); chosen per backend when None.

  Gradients come from a backward Pallas kernel (jax.custom_vjp); clipped entries get none.
  """
  x = jnp.asarray(x)
  _check_float(x)
  if x.ndim == 0:
    raise ValueError("two_pass_softmax needs at least one axis, got a scalar")
  axis = axis % x.ndim
  if gamma is not None:
    check_clip_params(gamma, zeta)
  if where is not None:
    where = jnp.broadcast_to(jnp.asarray(where, bool), x.shape)
  if gamma is not None:
    gamma = _gamma_full(gamma, x.shape, axis)

  def local(x, where, gamma):
    x_RxN, moved_shape = _to_rows(x, axis)
    R, N = x_RxN.shape
    plan = make_plan(R, N, x.dtype, interpret, block_rows=block_rows, block_cols=block_cols)
    mask_RxN = None if where is None else _to_rows(where, axis)[0].astype(plan.mask_dtype)
    gamma_Rx1 = None if gamma is None else _to_rows(gamma, axis)[0]
    y_RxN = _softmax_rows(x_RxN, mask_RxN, gamma_Rx1, _Static(plan, float(zeta)))
    return jnp.moveaxis(y_RxN.reshape(moved_shape), -1, axis)

  # per device under a mesh: the leading (batch) axis and, of 4-D scores, the heads axis
  dims = _split_dims(x.ndim, axis)
  return sharding.sharded_call(local, [x, where, gamma], [dims] * 3, dims, x.ndim,
                               batch=x.shape[0], heads=x.shape[1] if dims[1] is not None else None)


def _split_dims(ndim: int, axis: int):
  """(batch dim, heads dim) a kernel over `axis` may split: axis 0 unless normalised, axis 1 of
  B x H x T x S scores unless normalised."""
  return (0 if axis != 0 and ndim >= 2 else None,
          1 if ndim == 4 and axis not in (0, 1) else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _logsumexp_rows(x_RxN, plan: RowPlan):
  return _logsumexp_rows_fwd(x_RxN, plan)[0]


def _lse(e, v):
  # e * LN2_HI is exact, so only the final sum rounds.
  return jnp.where(v > 0, e * LN2_HI + (e * LN2_LO + jnp.log(jnp.where(v > 0, v, 1.0))), -jnp.inf)


def _logsumexp_rows_fwd(x_RxN, plan):
  _, e, v = _forward_rows(x_RxN, None, None, plan, 1.0, write_y=False)
  return _lse(e, v)[:, 0], (x_RxN, e, v)


def _logsumexp_rows_bwd(plan, res, g_R):
  """softmax(x) * g, the softmax rebuilt elementwise from the saved accumulator."""
  x_RxN, e, v = res
  s = _softmax_chunk(x_RxN.astype(jnp.float32), True, e, v)
  return ((s * g_R[:, None].astype(jnp.float32)).astype(x_RxN.dtype),)


_logsumexp_rows.defvjp(_logsumexp_rows_fwd, _logsumexp_rows_bwd)


def logsumexp(x: Array, axis: int = -1, interpret: Optional[bool] = None) -> Array:
  """log(sum(exp(x))) along `axis` from the two-pass accumulator (pass 1 only).

  Returns float32 with `axis` removed. Differentiable: the gradient is softmax(x) * g.
  """
  x = jnp.asarray(x)
  _check_float(x)
  if x.ndim == 0:
    raise ValueError("logsumexp needs at least one axis, got a scalar")
  axis = axis % x.ndim

  def local(x):
    x_RxN, moved_shape = _to_rows(x, axis)
    plan = make_plan(*x_RxN.shape, x.dtype, interpret)
    return _logsumexp_rows(x_RxN, plan).reshape(moved_shape[:-1])

  batch_dim = 0 if axis != 0 and x.ndim >= 2 else None
  return sharding.sharded_call(local, [x], [(batch_dim, None)], (batch_dim, None), x.ndim - 1,
                               batch=x.shape[0])
