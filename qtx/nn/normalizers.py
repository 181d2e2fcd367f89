"""Attention normalizers: pure functions over attention scores, plus a registry.

Every normalizer maps scores `x` (any shape, normalised along `axis`) and an optional boolean mask
`where` (True = attend, broadcastable to `x`) to attention weights of the same shape. Masked
entries are exactly 0 and a fully masked row is all zeros (never NaN). Computation happens in
float32 and the result is cast back to the input dtype.

- softmax: the usual normalised exponential.
- clipped_softmax: Bondarenko et al. 2023, eq. 4: clip((zeta - gamma) * softmax(x) + gamma, 0, 1).
  Lets a head put exact zeros on tokens without pushing its scores to huge values.
- softplus: length-scaled softplus attention with re-weighting (Gao & Spratling 2025):
  S = softplus(x) masked, A = S / (sum S + eps), B = relu(N * A - O) ** p row-normalised.
  The attention module supplies x = log(d) * log(N) * (q_hat . k_hat) (see `Normalizer`).

Gated attention is not a normalizer: it multiplies the context of each head and is applied in
`qtx.nn.attention`, on top of any normalizer here.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def softmax(x: Array, axis: int = -1, where: Optional[Array] = None) -> Array:
  """Masked softmax; masked entries are exactly 0, a fully masked row is all zeros."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  if where is not None:
    where = jnp.broadcast_to(where, x.shape)
    x = jnp.where(where, x, -jnp.inf)
  m = jnp.max(x, axis=axis, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  m = jax.lax.stop_gradient(m)
  e = jnp.exp(x - m)
  if where is not None:
    e = jnp.where(where, e, 0.0)
  s = jnp.sum(e, axis=axis, keepdims=True)
  y = e / jnp.where(s > 0, s, 1.0)
  return y.astype(dtype)


def clipped_softmax(x: Array, gamma, zeta: float = 1.0, axis: int = -1,
                    where: Optional[Array] = None) -> Array:
  """Clipped softmax, clip((zeta - gamma) * softmax(x) + gamma, 0, 1) (Bondarenko et al. eq. 4).

  gamma <= 0 (a scalar or an array broadcastable to the rows, e.g. -alpha / N_row), zeta >= 1.
  Probabilities below -gamma / (zeta - gamma) become exactly 0 and receive no gradient.
  Masked entries stay exactly 0 after clipping.
  """
  if isinstance(gamma, (int, float)) and gamma > 0:
    raise ValueError(f"clipped_softmax needs gamma <= 0, got {gamma}")
  if isinstance(zeta, (int, float)) and zeta < 1:
    raise ValueError(f"clipped_softmax needs zeta >= 1, got {zeta}")
  dtype = x.dtype
  s = softmax(x.astype(jnp.float32), axis=axis, where=where)
  gamma = jnp.asarray(gamma, jnp.float32)
  y = jnp.clip((zeta - gamma) * s + gamma, 0.0, 1.0)
  if where is not None:
    y = jnp.where(jnp.broadcast_to(where, y.shape), y, 0.0)
  return y.astype(dtype)


def softplus_reweight(x: Array, axis: int = -1, where: Optional[Array] = None,
                      p: float = 15.0, eps: float = 1e-6,
                      first_row_keys: int = 1) -> Array:
  """Softplus attention with re-weighting (Gao & Spratling 2025).

  S = softplus(x) * mask;  A = S / (sum S + eps);  B = relu(N * A - O) ** p, row-normalised.
  N is the number of attended keys in the row; O = 1, except for rows with N <= first_row_keys
  (whose only possible row is uniform and would vanish), which use O = 0. For p != 1 the power
  and the normalisation are done as a softmax over p * log(relu(N A - O)), so large p cannot
  overflow or underflow. A row whose entries are all <= O/N (exactly uniform) is all zeros.

  The gradient is written out rather than differentiated through the masking: with r = N A - O
  and y the output, dr = p * y / r * (g - sum(g * y)) on the kept entries, dA = N dr,
  dS = (dA - sum(dA * A)) / (sum S + eps), dx = dS * sigmoid(x) * mask.
  """
  if p <= 0:
    raise ValueError(f"softplus re-weighting needs p > 0, got {p}")
  dtype = x.dtype
  w = jnp.ones(x.shape, bool) if where is None else jnp.broadcast_to(where, x.shape)
  x, w = jnp.moveaxis(x.astype(jnp.float32), axis, -1), jnp.moveaxis(w, axis, -1)
  y = _softplus_reweight_last(x, w, float(p), float(eps), int(first_row_keys))
  return jnp.moveaxis(y, -1, axis).astype(dtype)


def _softplus_reweight_parts(x, where, p, eps, first_row_keys):
  s = jnp.where(where, jax.nn.softplus(x), 0.0)
  denom = jnp.sum(s, axis=-1, keepdims=True) + eps
  a = s / denom
  n = jnp.sum(where, axis=-1, keepdims=True, dtype=jnp.float32)
  r = n * a - jnp.where(n <= first_row_keys, 0.0, 1.0)
  pos = (r > 0) & where
  if p == 1.0:  # B = relu(r) / sum relu(r): the same values without the log/exp round trip
    b = jnp.where(pos, r, 0.0)
    tot = jnp.sum(b, axis=-1, keepdims=True)
    y = b / jnp.where(tot > 0, tot, 1.0)
  else:
    y = softmax(jnp.where(pos, p * jnp.log(jnp.where(pos, r, 1.0)), 0.0), where=pos)
  return y, (a, r, pos, n, denom)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _softplus_reweight_last(x, where, p, eps, first_row_keys):
  return _softplus_reweight_parts(x, where, p, eps, first_row_keys)[0]


def _softplus_reweight_fwd(x, where, p, eps, first_row_keys):
  y, (a, r, pos, n, denom) = _softplus_reweight_parts(x, where, p, eps, first_row_keys)
  # dy/dr = p * y / r (times the normalisation term); 0 where the entry was cut by the relu
  y_over_r = jnp.where(pos, y / jnp.where(pos, r, 1.0), 0.0) * p
  ds_dx = jnp.where(where, jax.nn.sigmoid(x), 0.0)
  return y, (y, y_over_r, a, ds_dx, n / denom)


def _softplus_reweight_bwd(p, eps, first_row_keys, res, g):
  del p, eps, first_row_keys
  y, y_over_r, a, ds_dx, n_over_denom = res
  dr = y_over_r * (g - jnp.sum(g * y, axis=-1, keepdims=True))
  da = dr * n_over_denom  # N * dr, already divided by (sum S + eps)
  ds = da - jnp.sum(dr * a, axis=-1, keepdims=True) * n_over_denom
  return ds * ds_dx, None


_softplus_reweight_last.defvjp(_softplus_reweight_fwd, _softplus_reweight_bwd)


def plain_softplus_reweight(x: Array, where: Array, p: float = 15.0, eps: float = 1e-6,
                            first_row_keys: int = 1) -> Array:
  """`softplus_reweight`'s forward over the last axis, differentiated by JAX autodiff instead of
  the written-out VJP: the reference that VJP is tested and benchmarked against."""
  return _softplus_reweight_parts(x, where, p, eps, first_row_keys)[0]


@dataclasses.dataclass(frozen=True)
class Normalizer:
  """A normalizer as the attention module uses it.

  fn(scores, where, n_keys) -> weights; `n_keys` is the number of keys each row sees
  (broadcastable to the rows), used by length-dependent normalizers.
  normalize_qk: L2-normalise queries and keys before the dot product (softplus attention).
  score_scale(head_dim, n_keys): multiplier of q.k (1/sqrt(d) for softmax variants,
  log(d) * log(N) for softplus attention).
  """
  name: str
  fn: Callable[..., Array]
  normalize_qk: bool = False
  score_scale: Callable[[int, Array], Array] = lambda d, n: 1.0 / math.sqrt(d)

  def __call__(self, x: Array, where: Optional[Array] = None, n_keys=None) -> Array:
    """Normalise scores along the last axis."""
    return self.fn(x, where=where, n_keys=n_keys)


def _make_softmax(**kwargs) -> Normalizer:
  _no_kwargs("softmax", kwargs)
  return Normalizer("softmax", lambda x, where=None, n_keys=None: softmax(x, where=where))


def _make_clipped(gamma: Optional[float] = None, alpha: Optional[float] = None,
                  zeta: float = 1.0, gamma_scale=1.0, **kwargs) -> Normalizer:
  """gamma directly, or alpha with gamma = -alpha / N (N = keys the row actually sees)."""
  _no_kwargs("clipped_softmax", kwargs)
  if alpha is not None and gamma not in (None, 0.0):
    raise ValueError(f"clipped_softmax: give gamma ({gamma}) or alpha ({alpha}), not both")
  if alpha is not None and alpha < 0:
    raise ValueError(f"clipped_softmax: alpha must be >= 0, got {alpha}")
  if gamma is not None and gamma > 0:
    raise ValueError(f"clipped_softmax: gamma must be <= 0, got {gamma}")
  if zeta < 1:
    raise ValueError(f"clipped_softmax: zeta must be >= 1, got {zeta}")

  def fn(x, where=None, n_keys=None):
    if alpha is not None:
      n = n_keys if n_keys is not None else x.shape[-1]
      g = -alpha / jnp.maximum(jnp.asarray(n, jnp.float32), 1.0)
    else:
      g = gamma or 0.0
    return clipped_softmax(x, jnp.asarray(g, jnp.float32) * gamma_scale, zeta, where=where)

  return Normalizer("clipped_softmax", fn)


def _make_softplus(p: float = 15.0, eps: float = 1e-6, **kwargs) -> Normalizer:
  _no_kwargs("softplus", kwargs)
  if p <= 0:
    raise ValueError(f"softplus: p must be > 0, got {p}")

  def scale(d, n):
    return math.log(d) * jnp.log(jnp.maximum(jnp.asarray(n, jnp.float32), 2.0))

  return Normalizer(
      "softplus",
      lambda x, where=None, n_keys=None: softplus_reweight(x, where=where, p=p, eps=eps),
      normalize_qk=True, score_scale=scale)


def _no_kwargs(name, kwargs):
  if kwargs:
    raise TypeError(f"normalizer {name!r} got unexpected parameters {sorted(kwargs)}")


_REGISTRY: dict[str, Callable[..., Normalizer]] = {
    "softmax": _make_softmax,
    "clipped_softmax": _make_clipped,
    "softplus": _make_softplus,
}


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def get(name: str, **kwargs) -> Normalizer:
  """Normalizer by name: "softmax" | "clipped_softmax" | "softplus" (gating is orthogonal)."""
  if name not in _REGISTRY:
    hint = " (gated attention is `attention.gate`, used with any normalizer)" if "gate" in name else ""
    raise ValueError(f"unknown normalizer {name!r}; choose one of {names()}{hint}")
  return _REGISTRY[name](**kwargs)


def register(name: str, factory: Callable[..., Normalizer]) -> None:
  """Add a normalizer factory (kwargs -> Normalizer) under `name`."""
  if name in _REGISTRY:
    raise ValueError(f"normalizer {name!r} is already registered")
  _REGISTRY[name] = factory
