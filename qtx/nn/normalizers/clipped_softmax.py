"""clipped_softmax: Bondarenko et al. 2023, eq. 4: clip((zeta - gamma) * softmax(x) + gamma, 0, 1).

Lets a head put exact zeros on tokens without pushing its scores to huge values. Config keys:
gamma (<= 0) or alpha (gamma = -alpha / N, N = keys the row sees), zeta (>= 1), and
gamma_warmup_steps (gamma ramps linearly from 0 over that many training steps).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from qtx.nn.normalizers.base import Normalizer, ParamError, Spec, no_kwargs, register
from qtx.nn.normalizers.softmax import softmax

__all__ = ["clipped_softmax", "gamma_ramp"]

Array = jax.Array


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


def _factory(gamma: Optional[float] = None, alpha: Optional[float] = None,
                  zeta: float = 1.0, gamma_scale=1.0, **kwargs) -> Normalizer:
  """gamma directly, or alpha with gamma = -alpha / N (N = keys the row actually sees)."""
  no_kwargs("clipped_softmax", kwargs)
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


def gamma_ramp(values, step) -> jax.Array | float:
  """Fraction of gamma in force at `step`: a linear warm-up from 0 (1.0 when off)."""
  warmup = values["gamma_warmup_steps"]
  if warmup <= 0 or step is None:
    return 1.0
  return jnp.clip(jnp.asarray(step, jnp.float32) / warmup, 0.0, 1.0)


def _kwargs(values) -> dict:
  if values["alpha"] is not None:
    return dict(alpha=values["alpha"], zeta=values["zeta"])
  return dict(gamma=values["gamma"], zeta=values["zeta"])


def _check(values) -> None:
  alpha, gamma, zeta = values["alpha"], values["gamma"], values["zeta"]
  if alpha is not None and gamma not in (None, 0.0):
    raise ParamError("alpha", f"give gamma ({gamma}) or alpha ({alpha}), not both")
  if alpha is not None and alpha < 0:
    raise ParamError("alpha", f"must be >= 0 (gamma = -alpha / N), got {alpha}")
  if gamma is not None and gamma > 0:
    raise ParamError("gamma", f"must be <= 0, got {gamma}")
  if zeta < 1:
    raise ParamError("zeta", f"must be >= 1, got {zeta}")
  if values["gamma_warmup_steps"] < 0:
    raise ParamError("gamma_warmup_steps", f"must be >= 0, got {values['gamma_warmup_steps']}")


def _pallas(values, step, num_keys, per_row):
  """A constant gamma is what the kernels take; alpha with rows of different lengths gives a
  per-row gamma, which runs through the XLA normalizer instead."""
  if values["alpha"] is not None:
    if per_row:
      return None
    g = -values["alpha"] / num_keys
  else:
    g = values["gamma"]
  return {"gamma": jnp.asarray(g, jnp.float32) * gamma_ramp(values, step), "zeta": values["zeta"]}


register(Spec("clipped_softmax",
              params={"gamma": 0.0, "alpha": None, "zeta": 1.0, "gamma_warmup_steps": 0},
              factory=_factory,
              from_config=lambda values, step: _factory(**_kwargs(values),
                                                        gamma_scale=gamma_ramp(values, step)),
              check=_check, pallas=_pallas))
