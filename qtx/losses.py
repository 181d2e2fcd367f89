"""Contrastive losses on a (global) batch of L2-normalised embeddings.

- clip: InfoNCE, mean of cross-entropy over rows (image->text) and columns (text->image).
- siglip: -sum log_sigmoid(label * logits) / B, label +1 on the diagonal and -1 elsewhere.
- infoloob: InfoNCE with the positive left out of the denominator (CLOOB), both directions.

Under `jax.jit` with sharded inputs these are global-batch losses: XLA's partitioner inserts
the collectives. `qtx.sharded_losses` has memory-bounded ring (shard_map) variants.
Logits are exp(logit_scale) * zi @ zt^T with exp(logit_scale) clamped to `max_scale`.

Each loss is one entry of LOSSES (its plain function, its ring family, whether the model needs
a logit bias, its initial temperature); `loss.name` picks it and `compute` runs it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from qtx import sharded_losses


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


def diagonal(l_BxB):
  """The diagonal of a square matrix as a masked row sum: the same values as `jnp.diagonal`
  (each row adds its diagonal entry to zeros), but elementwise and row-local, so that with the
  rows sharded over devices the partitioner needs no gather (jnp.diagonal lowers to one, which
  under data parallelism all-gathers indices and results across the batch devices)."""
  B = l_BxB.shape[0]
  eye = jax.lax.broadcasted_iota(jnp.int32, (B, B), 0) == jax.lax.broadcasted_iota(
      jnp.int32, (B, B), 1)
  return jnp.sum(jnp.where(eye, l_BxB, 0.0), axis=1)


def clip_loss(zi_BxE, zt_BxE, logit_scale, max_scale: float = 100.0, impl: str = "xla"):
  l_BxB = logits(zi_BxE, zt_BxE, logit_scale, None, max_scale)
  diag = diagonal(l_BxB)
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
  diag = diagonal(l_BxB)
  off = jnp.where(jnp.eye(B, dtype=bool), -jnp.inf, l_BxB)
  i2t = jnp.mean(jax.nn.logsumexp(off, axis=1) - diag)
  t2i = jnp.mean(jax.nn.logsumexp(off, axis=0) - diag)
  return 0.5 * (i2t + t2i)


@dataclasses.dataclass(frozen=True)
class Loss:
  """A contrastive loss as training uses it.

  fn(zi, zt, logit_scale, logit_bias, max_scale, impl) -> scalar (the plain global-batch loss);
  ring: its family in `qtx.sharded_losses` (used when loss.sharded is set), or None when the
    loss has no ring variant;
  uses_bias: the model gets a learned logit bias (init loss.init_logit_bias);
  init_logit_scale: the temperature's initial log value when loss.init_logit_scale < 0;
  min_batch: the smallest batch the loss is defined for.
  """
  fn: Callable[..., jax.Array]
  ring: Optional[str] = None
  uses_bias: bool = False
  init_logit_scale: float = math.log(1 / 0.07)
  min_batch: int = 1


LOSSES: dict[str, Loss] = {
    "clip": Loss(lambda zi, zt, t, b, m, impl: clip_loss(zi, zt, t, m, impl), ring="softmax"),
    "siglip": Loss(lambda zi, zt, t, b, m, impl: siglip_loss(zi, zt, t, b, m), ring="sigmoid",
                   uses_bias=True, init_logit_scale=math.log(10.0)),
    "infoloob": Loss(lambda zi, zt, t, b, m, impl: infoloob_loss(zi, zt, t, m),
                     ring="softmax_leave_out", min_batch=2),
}


def register(name: str, loss: Loss) -> Loss:
  """Add a loss under `name` (then usable as loss.name=<name>)."""
  if name in LOSSES:
    raise ValueError(f"loss {name!r} is already registered")
  if loss.ring is not None and loss.ring not in sharded_losses.FAMILIES:
    raise ValueError(f"loss {name!r}: unknown ring family {loss.ring!r}; choose one of "
                     f"{sharded_losses.FAMILIES} or None")
  LOSSES[name] = loss
  return loss


def get(name: str) -> Loss:
  """The LOSSES entry `name`; ValueError naming the choices otherwise."""
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; choose one of {tuple(LOSSES)}")
  return LOSSES[name]


def compute(name: str, zi_BxE, zt_BxE, logit_scale, logit_bias: Optional[jax.Array] = None,
            max_scale: float = 100.0, impl: str = "xla", mesh=None,
            axes=sharded_losses.BATCH_AXES):
  """The loss `name` of a global batch: the plain function, or its ring variant over the mesh
  axes `axes` of `mesh` when one is given (memory independent of the device count)."""
  loss = get(name)
  if loss.uses_bias and logit_bias is None:
    raise ValueError(f"{name} loss needs the model's logit_bias (build the model with "
                     f"loss.name={name!r})")
  if zi_BxE.shape[0] < loss.min_batch:
    raise ValueError(f"{name} needs a batch of at least {loss.min_batch}, got {zi_BxE.shape[0]}")
  if mesh is not None:
    if loss.ring is None:
      raise ValueError(f"loss {name!r} has no ring variant; set loss.sharded=False")
    return sharded_losses.ring_loss(loss.ring, zi_BxE, zt_BxE, logit_scale,
                                    logit_bias if loss.uses_bias else None, mesh, max_scale,
                                    axes)
  return loss.fn(zi_BxE, zt_BxE, logit_scale, logit_bias, max_scale, impl)
