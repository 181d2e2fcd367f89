"""softplus: length-scaled softplus attention with re-weighting (Gao & Spratling 2025).

S = softplus(x) masked, A = S / (sum S + eps), B = relu(N * A - O) ** p row-normalised. The
attention module supplies x = log(d) * log(N) * (q_hat . k_hat) (`Normalizer.normalize_qk`,
`score_scale`). Config keys: softplus_p (p) and softplus_eps (eps). attention.impl=pallas runs
it in the two-pass attention kernel (qtx.kernels.two_pass_attention's `softplus_p`).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from qtx.nn.normalizers.base import Normalizer, ParamError, Spec, no_kwargs, register
from qtx.nn.normalizers.softmax import softmax

__all__ = ["softplus_reweight", "plain_softplus_reweight", "autodiff_gradients"]

Array = jax.Array


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
  last = plain_softplus_reweight if _AUTODIFF[0] else _softplus_reweight_last
  y = last(x, w, float(p), float(eps), int(first_row_keys))
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


def _factory(p: float = 15.0, eps: float = 1e-6, **kwargs) -> Normalizer:
  no_kwargs("softplus", kwargs)
  if p <= 0:
    raise ValueError(f"softplus: p must be > 0, got {p}")

  def scale(d, n):
    return math.log(d) * jnp.log(jnp.maximum(jnp.asarray(n, jnp.float32), 2.0))

  return Normalizer(
      "softplus",
      lambda x, where=None, n_keys=None: softplus_reweight(x, where=where, p=p, eps=eps),
      normalize_qk=True, score_scale=scale)


# Set by `autodiff_gradients`: trace softplus_reweight without its written-out VJP.
_AUTODIFF = [False]


@contextlib.contextmanager
def autodiff_gradients():
  """Within this block, functions traced with softplus_reweight differentiate its forward by JAX
  autodiff instead of the written-out VJP (same values; for benchmarks and tests of the VJP).
  It acts at trace time: jit a new function inside the block."""
  saved = _AUTODIFF[0]
  _AUTODIFF[0] = True
  try:
    yield
  finally:
    _AUTODIFF[0] = saved


def _from_config(values, step) -> Normalizer:
  return _factory(p=values["softplus_p"], eps=values["softplus_eps"])


def _check(values) -> None:
  if not values["softplus_p"] > 0:
    raise ParamError("softplus_p", f"must be > 0, got {values['softplus_p']}")
  if not values["softplus_eps"] > 0:
    raise ParamError("softplus_eps", f"must be > 0, got {values['softplus_eps']}")


def _pallas(values, step, num_keys, per_row):
  """The two-pass attention kernel's softplus mode (its own per-row scale comes from the
  attention module; the two-pass softmax kernel has none: with quantization the scores go
  through softplus_reweight in XLA)."""
  return {"softplus_p": float(values["softplus_p"]), "softplus_eps": float(values["softplus_eps"])}


register(Spec("softplus", params={"softplus_p": 15.0, "softplus_eps": 1e-6}, factory=_factory,
              from_config=_from_config, check=_check, pallas=_pallas))
