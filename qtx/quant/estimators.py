"""Range estimators for fake quantization: pure functions returning (x_min, x_max).

- `minmax`: extremes of the current tensor.
- `running_minmax`: exponential moving average of per-batch extremes (momentum on the old value,
  as in Bondarenko et al. 2023: momentum 0.9 over 16 calibration batches); the first batch
  initialises the state.
- `percentile`: lower bound at the (100 - q)-th, upper bound at the q-th percentile
  (q = 99.99 / 99.999 in the paper's OPT experiments).
- `mse_range`: searches the shrunk ranges alpha * [min, max], alpha in (0, 1], for the one
  minimising ||x - fake_quant(x)||^2.

Granularity (which axes share one range): `per_tensor` (all axes), `per_channel` (weights:
every axis but the output-channel axis), `per_token` (activations: only the last axis, so every
token has its own range). `reduction_axes` maps a granularity to the axes to reduce;
`estimate_range` combines it with an estimator and keeps dims so the result broadcasts to x.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qtx.quant.fake_quant import fake_quant, validate_bits

GRANULARITIES = ("per_tensor", "per_channel", "per_token")
ESTIMATORS = ("minmax", "running_minmax", "percentile", "mse")

Axis = int | Sequence[int] | None


class RangeState(NamedTuple):
  """Running range: x_min, x_max (float32 arrays) and the number of batches seen (int32)."""
  x_min: jax.Array
  x_max: jax.Array
  count: jax.Array


def _f32(x):
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32)) if jnp.issubdtype(
      x.dtype, jnp.floating) else x.astype(jnp.float32)


def reduction_axes(ndim: int, granularity: str, channel_axis: int = -1) -> tuple[int, ...]:
  """Axes reduced to one range for `granularity` on an ndim-dimensional tensor."""
  if granularity not in GRANULARITIES:
    raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
  if granularity == "per_tensor" or ndim == 0:
    return tuple(range(ndim))
  if granularity == "per_channel":
    if not -ndim <= channel_axis < ndim:
      raise ValueError(f"channel_axis={channel_axis} out of range for a {ndim}-d tensor")
    keep = channel_axis % ndim
    return tuple(a for a in range(ndim) if a != keep)
  return (ndim - 1,)


def minmax(x, axis: Axis = None, keepdims: bool = False, where=None):
  """(min, max) of x over axis (all axes when None).

  where: optional boolean mask broadcastable to x (True = counted), e.g. the real tokens of a
  padded text batch or the keys a causal row attends; a slice with no counted entry gets
  (0, 0).
  """
  x = _f32(x)
  if where is None:
    return jnp.min(x, axis=axis, keepdims=keepdims), jnp.max(x, axis=axis, keepdims=keepdims)
  w = jnp.broadcast_to(where, x.shape)
  lo = jnp.min(jnp.where(w, x, jnp.inf), axis=axis, keepdims=keepdims)
  hi = jnp.max(jnp.where(w, x, -jnp.inf), axis=axis, keepdims=keepdims)
  return jnp.where(jnp.isfinite(lo), lo, 0.0), jnp.where(jnp.isfinite(hi), hi, 0.0)


def running_minmax(state: RangeState | None, x, momentum: float = 0.9, axis: Axis = None,
                   keepdims: bool = False, where=None) -> RangeState:
  """EMA of batch extremes: new = momentum * old + (1 - momentum) * batch.

  state None (or state.count == 0, which works under jit) means the batch initialises the
  range. The state holds the raw extremes (not widened to include 0; the quantization grid
  does that when the range is used). Returns the new RangeState with count incremented.
  where: as in `minmax`.
  """
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum={momentum!r} must be in [0, 1)")
  b_min, b_max = minmax(x, axis, keepdims, where)
  if state is None:
    return RangeState(b_min, b_max, jnp.ones((), jnp.int32))
  first = state.count == 0
  new_min = jnp.where(first, b_min, momentum * state.x_min + (1.0 - momentum) * b_min)
  new_max = jnp.where(first, b_max, momentum * state.x_max + (1.0 - momentum) * b_max)
  return RangeState(new_min, new_max, (state.count + 1).astype(jnp.int32))


def _move_to_last(x, axis: Axis):
  """x with the reduced axes flattened into one trailing axis, plus the kept shape."""
  axes = tuple(range(x.ndim)) if axis is None else tuple(
      a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis))
  kept = tuple(a for a in range(x.ndim) if a not in axes)
  x = jnp.transpose(x, kept + axes)
  return x.reshape(x.shape[:len(kept)] + (-1,)), axes


def _lerp(a, b, t: float):
  # numpy's linear interpolation (stable near both ends).
  return a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t)


def percentile(x, q: float = 99.99, axis: Axis = None, keepdims: bool = False, where=None):
  """(percentile 100 - q, percentile q) of x over axis.

  Linear interpolation between order statistics, exactly numpy's default method; positions
  are computed in Python float64 and only the needed order statistics are gathered with
  top_k, so q = 99.99 on a large tensor costs a small top_k, not a full sort.
  where: optional boolean mask broadcastable to x; the percentiles are those of the counted
  entries only (numpy's percentile of x[where], to float32 rounding). With a mask the count
  is data-dependent: the order statistics are gathered at traced positions from top_k.
  """
  if not 50.0 <= q <= 100.0:
    raise ValueError(f"percentile q={q!r} must be in [50, 100]")
  x = _f32(x)
  if where is not None:
    return _masked_percentile(x, jnp.broadcast_to(where, x.shape), q, axis, keepdims)
  flat, axes = _move_to_last(x, axis)
  n = flat.shape[-1]

  def order_stat_pair(pos, largest):
    # Values at ascending ranks floor(pos) and floor(pos) + 1 (clamped) and the fraction.
    i = min(int(np.floor(pos)), n - 1)
    j = min(i + 1, n - 1)
    if largest:  # rank r ascending is the (n - r)-th largest
      top = jax.lax.top_k(flat, n - i)[0]
      a, b = top[..., n - i - 1], top[..., n - j - 1]
    else:
      low = -jax.lax.top_k(-flat, j + 1)[0]
      a, b = low[..., i], low[..., j]
    return _lerp(a, b, pos - i)

  hi = order_stat_pair(q / 100.0 * (n - 1), largest=True)
  lo = order_stat_pair((100.0 - q) / 100.0 * (n - 1), largest=False)
  if keepdims:
    shape = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
    lo, hi = lo.reshape(shape), hi.reshape(shape)
  return lo, hi


def _masked_percentile(x, w, q, axis, keepdims):
  """Percentiles of the counted entries. Positions are taken from the nearer end of the sorted
  counted entries, (1 - q/100) (n - 1) (a small number, exact enough in float32 where the
  position from the other end, near n, would not be), and only the needed extremes are
  gathered with top_k, never a full sort."""
  flat, axes = _move_to_last(x, axis)
  wf, _ = _move_to_last(w, axis)
  N = flat.shape[-1]
  tail = (100.0 - q) / 100.0
  kmax = min(N, int(np.ceil(tail * max(N - 1, 0))) + 2)
  desc = jax.lax.top_k(jnp.where(wf, flat, -jnp.inf), kmax)[0]  # largest counted first
  asc = -jax.lax.top_k(jnp.where(wf, -flat, -jnp.inf), kmax)[0]  # smallest counted first
  n = jnp.sum(wf, axis=-1, keepdims=True)
  last = jnp.maximum(n - 1, 0)
  pos = jnp.float32(tail) * last.astype(jnp.float32)
  i = jnp.minimum(jnp.floor(pos).astype(jnp.int32), jnp.minimum(last, kmax - 1))
  j = jnp.minimum(i + 1, jnp.minimum(last, kmax - 1))
  t = (pos - i.astype(jnp.float32))[..., 0]

  def at(sorted_vals):
    a = jnp.take_along_axis(sorted_vals, i, axis=-1)[..., 0]
    b = jnp.take_along_axis(sorted_vals, j, axis=-1)[..., 0]
    v = jnp.where(t < 0.5, a + (b - a) * t, b - (b - a) * (1.0 - t))
    return jnp.where(n[..., 0] > 0, v, 0.0)

  hi, lo = at(desc), at(asc)
  if keepdims:
    shape = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
    lo, hi = lo.reshape(shape), hi.reshape(shape)
  return lo, hi


def mse_range(x, num_bits: int = 8, symmetric: bool = False, num_candidates: int = 100,
              axis: Axis = None, keepdims: bool = False, where=None):
  """Range alpha * (min, max) minimising the squared quantization error of x.

  alpha runs over 1, 1 - 1/N, ..., 1/N (N = num_candidates); ties keep the larger alpha, so
  the result never exceeds the min-max range. With axis set, every slice (e.g. every output
  channel of a weight) picks its own alpha. Candidates are scanned sequentially, so memory
  stays at a few copies of x. where: optional boolean mask broadcastable to x; only the
  counted entries enter the range and the error.
  """
  validate_bits(num_bits)
  if num_candidates < 1:
    raise ValueError(f"num_candidates={num_candidates!r} must be >= 1")
  x = _f32(x)
  w = None if where is None else jnp.broadcast_to(where, x.shape)
  x_min, x_max = minmax(x, axis, keepdims=True, where=w)
  alphas = 1.0 - jnp.arange(num_candidates, dtype=x.dtype) / num_candidates

  def step(carry, alpha):
    best_err, best_alpha = carry
    sq = jnp.square(x - fake_quant(x, alpha * x_min, alpha * x_max, num_bits, symmetric))
    err = jnp.sum(sq if w is None else jnp.where(w, sq, 0.0), axis=axis, keepdims=True)
    better = err < best_err
    return (jnp.where(better, err, best_err), jnp.where(better, alpha, best_alpha)), None

  init = (jnp.full(x_min.shape, jnp.inf, x.dtype), jnp.ones(x_min.shape, x.dtype))
  (_, best_alpha), _ = jax.lax.scan(step, init, alphas)
  lo, hi = best_alpha * x_min, best_alpha * x_max
  if not keepdims:
    red = tuple(range(x.ndim)) if axis is None else axis
    lo, hi = jnp.squeeze(lo, red), jnp.squeeze(hi, red)
  return lo, hi


def estimate_range(x, estimator: str = "minmax", granularity: str = "per_tensor",
                   channel_axis: int = -1, num_bits: int = 8, symmetric: bool = False,
                   q: float = 99.99, num_candidates: int = 100):
  """Range of x for one estimator and granularity; result broadcasts to x.

  Per-tensor ranges are scalars; other granularities keep the reduced axes with size 1.
  `running_minmax` is stateful and behaves like `minmax` here (one batch).
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
  x = jnp.asarray(x)
  axes = reduction_axes(x.ndim, granularity, channel_axis)
  keepdims = granularity != "per_tensor"
  if estimator in ("minmax", "running_minmax"):
    return minmax(x, axes, keepdims)
  if estimator == "percentile":
    return percentile(x, q, axes, keepdims)
  return mse_range(x, num_bits, symmetric, num_candidates, axes, keepdims)
