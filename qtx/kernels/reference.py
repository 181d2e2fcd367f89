"""Pure-jnp references for the kernels: the straightforward three-pass computations.

They define the semantics the Pallas kernels must match (tests compare against them, gradients
included) and serve as the XLA fallback. Everything is computed in float32 and returned in the
input dtype.

- softmax_ref: max pass, sum-of-exponentials pass, normalising pass; masked entries are exactly 0,
  a fully masked row is all zeros; with gamma, the clipped softmax of Bondarenko et al. 2023
  (eq. 4) clip((zeta - gamma) * softmax(x) + gamma, 0, 1), masked entries staying 0.
- attention_ref: scores = scale * q.k (B x H x T x S, materialised), the causal mask (query i
  sees keys j <= i) and the key padding mask, softmax_ref, then P.V.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def softmax_ref(x: Array, axis: int = -1, where: Optional[Array] = None, gamma=None,
                zeta: float = 1.0) -> Array:
  """Three-pass (clipped) softmax along `axis`. gamma: None, a scalar, or one value per row."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  if where is not None:
    where = jnp.broadcast_to(jnp.asarray(where, bool), x.shape)
    x = jnp.where(where, x, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(x - m)
  if where is not None:
    e = jnp.where(where, e, 0.0)
  total = jnp.sum(e, axis=axis, keepdims=True)
  y = e / jnp.where(total > 0, total, 1.0)
  if gamma is not None:
    gamma = jnp.asarray(gamma, jnp.float32)
    y = jnp.clip((zeta - gamma) * y + gamma, 0.0, 1.0)
    if where is not None:
      y = jnp.where(where, y, 0.0)
  return y.astype(dtype)


def logsumexp_ref(x: Array, axis: int = -1) -> Array:
  """log(sum(exp(x))) along `axis` in float32 (max-shifted)."""
  return jax.nn.logsumexp(x.astype(jnp.float32), axis=axis)


def attention_mask(T: int, S: int, causal: bool = False,
                   key_mask_BxS: Optional[Array] = None) -> Optional[Array]:
  """Boolean mask broadcastable to B x H x T x S (True = attend), or None.

  Causal: query i sees keys j <= i (top-left aligned, as jax.nn.dot_product_attention).
  """
  where = None
  if causal:
    where = (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])[None, None]
  if key_mask_BxS is not None:
    km = jnp.asarray(key_mask_BxS, bool)[:, None, None, :]
    where = km if where is None else where & km
  return where


def attention_ref(q_BxTxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array, causal: bool = False,
                  key_mask_BxS: Optional[Array] = None, gamma=None, zeta: float = 1.0,
                  scale: Optional[float] = None) -> Array:
  """Multi-head attention with a (clipped) softmax, materialising the B x H x T x S weights.

  gamma: None, a scalar, or an array broadcastable to B x H x T x 1 (one value per query row).
  scale defaults to 1 / sqrt(K). Fully masked rows give zeros.
  """
  B, T, H, K = q_BxTxHxK.shape
  S = k_BxSxHxK.shape[1]
  scale = 1.0 / math.sqrt(K) if scale is None else scale
  q = q_BxTxHxK.astype(jnp.float32)
  k = k_BxSxHxK.astype(jnp.float32)
  v = v_BxSxHxK.astype(jnp.float32)
  s_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q, k, precision="highest") * scale
  p_BxHxTxS = softmax_ref(s_BxHxTxS, where=attention_mask(T, S, causal, key_mask_BxS),
                          gamma=gamma, zeta=zeta)
  out = jnp.einsum("bhts,bshk->bthk", p_BxHxTxS, v, precision="highest")
  return out.astype(q_BxTxHxK.dtype)
