"""softmax: the usual normalised exponential."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from qtx.nn.normalizers.base import Normalizer, Spec, no_kwargs, register

__all__ = ["softmax"]

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


def _factory(**kwargs) -> Normalizer:
  no_kwargs("softmax", kwargs)
  return Normalizer("softmax", lambda x, where=None, n_keys=None: softmax(x, where=where))


register(Spec("softmax", params={}, factory=_factory,
              from_config=lambda values, step: _factory(),
              pallas=lambda values, step, num_keys, per_row: {}))
