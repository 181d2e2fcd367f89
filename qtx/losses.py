"""Contrastive losses on a (global) batch of L2-normalised embeddings.

- clip: InfoNCE, mean of cross-entropy over rows (image->text) and columns (text->image).
- siglip: -sum log_sigmoid(label * logits) / B, label +1 on the diagonal and -1 elsewhere.
- infoloob: InfoNCE with the positive left out of the denominator (CLOOB), both directions.

Under `jax.jit` with sharded inputs these are global-batch losses: XLA's partitioner inserts
the collectives. `qtx.sharded_losses` has memory-bounded ring (shard_map) variants.
Logits are exp(logit_scale) * zi @ zt^T with exp(logit_scale) clamped to `max_scale`.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

LOSSES = ("clip", "siglip", "infoloob")


def logits(zi_BxE, zt_BxE, logit_scale, logit_bias=None, max_scale: float = 100.0):
  scale = jnp.minimum(jnp.exp(logit_scale.astype(jnp.float32)), max_scale)
  out = scale * jnp.einsum("ie,je->ij", zi_BxE.astype(jnp.float32), zt_BxE.astype(jnp.float32))
  if logit_bias is not None:
    out = out + logit_bias.astype(jnp.float32)
  return out


def _lse(x, axis, impl):
  if impl == "pallas":
    from qtx import kernels
    return kernels.logsumexp(jnp.moveaxis(x, axis, -1), axis=-1)
  return jax.nn.logsumexp(x, axis=axis)


def clip_loss(zi_BxE, zt_BxE, logit_scale, max_scale: float = 100.0, impl: str = "xla"):
  l_BxB = logits(zi_BxE, zt_BxE, logit_scale, None, max_scale)
  diag = jnp.diagonal(l_BxB)
  i2t = jnp.mean(_lse(l_BxB, 1, impl) - diag)
  t2i = jnp.mean(_lse(l_BxB, 0, impl) - diag)
  return 0.5 * (i2t + t2i)


def siglip_loss(zi_BxE, zt_BxE, logit_scale, logit_bias, max_scale: float = 100.0):
  l_BxB = logits(zi_BxE, zt_BxE, logit_scale, logit_bias, max_scale)
  B = l_BxB.shape[0]
  labels = 2.0 * jnp.eye(B, dtype=jnp.float32) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * l_BxB)) / B


def infoloob_loss(zi_BxE, zt_BxE, logit_scale, max_scale: float = 100.0):
  l_BxB = logits(zi_BxE, zt_BxE, logit_scale, None, max_scale)
  B = l_BxB.shape[0]
  if B < 2:
    raise ValueError(f"infoloob needs a batch of at least 2 (the positive is left out), got {B}")
  diag = jnp.diagonal(l_BxB)
  off = jnp.where(jnp.eye(B, dtype=bool), -jnp.inf, l_BxB)
  i2t = jnp.mean(jax.nn.logsumexp(off, axis=1) - diag)
  t2i = jnp.mean(jax.nn.logsumexp(off, axis=0) - diag)
  return 0.5 * (i2t + t2i)


def compute(name: str, zi_BxE, zt_BxE, logit_scale, logit_bias: Optional[jax.Array] = None,
            max_scale: float = 100.0, impl: str = "xla"):
  """Loss by name: 'clip' | 'siglip' | 'infoloob'."""
  if name == "clip":
    return clip_loss(zi_BxE, zt_BxE, logit_scale, max_scale, impl)
  if name == "siglip":
    if logit_bias is None:
      raise ValueError("siglip loss needs the model's logit_bias (build the model with "
                       "loss.name='siglip')")
    return siglip_loss(zi_BxE, zt_BxE, logit_scale, logit_bias, max_scale)
  if name == "infoloob":
    return infoloob_loss(zi_BxE, zt_BxE, logit_scale, max_scale)
  raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")
