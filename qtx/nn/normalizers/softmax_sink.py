"""softmax_sink: softmax with a sink logit (a learned one per head, gpt-oss style).

  p_ij = exp(s_ij) / (exp(b) + sum_k exp(s_ik))    over the keys k that row i sees

The sink b absorbs probability mass, so a head can attend to "nothing" (its weights sum to less
than 1) without pushing its scores to huge values (PAPERS.md section 8). b = 0 fixed is
"softmax + 1" (off-by-one attention); b = -inf is plain softmax. Config keys: sink_init (the
initial, or fixed, b) and sink_learned (True: one learned b per head, initialised at sink_init;
False: b = sink_init for every head, not a parameter). The learned logits are a (H,) parameter
'sink' of the attention module, kept in float and without weight decay. attention.impl=pallas
runs it in the two-pass attention kernel (qtx.kernels.two_pass_attention's `sink`).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtx.nn.normalizers.base import Normalizer, ParamError, Spec, no_kwargs, register

__all__ = ["softmax_with_sink"]

Array = jax.Array


def softmax_with_sink(x: Array, sink, axis: int = -1, where: Optional[Array] = None) -> Array:
  """exp(x_j) / (exp(sink) + sum_k exp(x_k)) along `axis`, over the entries `where` marks.

  sink broadcasts against x with the normalised axis of size 1: a scalar, one value per row, or
  one per head (e.g. (H, 1, 1) for B x H x T x S scores). Masked entries are exactly 0; a row
  with no visible key gives zeros (its mass is all on the sink, or there is none when sink =
  -inf), never NaN. Computed in float32 with the row maximum (sink included) subtracted, so
  scores of any magnitude are exact to float32 round-off.
  """
  dtype = x.dtype
  x = x.astype(jnp.float32)
  axis = axis % x.ndim
  row_shape = x.shape[:axis] + (1,) + x.shape[axis + 1:]
  sink = jnp.asarray(sink, jnp.float32)
  try:
    shape = jnp.broadcast_shapes(sink.shape, row_shape)
  except ValueError:
    shape = None
  if shape != row_shape:
    raise ValueError(f"sink of shape {sink.shape} does not broadcast against scores of shape "
                     f"{x.shape} with the normalised axis {axis} of size 1 (rows {row_shape})")
  sink = jnp.broadcast_to(sink, row_shape)
  if where is not None:
    where = jnp.broadcast_to(where, x.shape)
    x = jnp.where(where, x, -jnp.inf)
  m = jnp.maximum(jnp.max(x, axis=axis, keepdims=True), sink)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.exp(x - m)
  if where is not None:
    e = jnp.where(where, e, 0.0)
  s = jnp.sum(e, axis=axis, keepdims=True) + jnp.exp(sink - m)
  return (e / jnp.where(s > 0, s, 1.0)).astype(dtype)


def _factory(sink: float = 0.0, **kwargs) -> Normalizer:
  """A fixed sink logit (learned sinks come from the attention module's 'sink' parameter)."""
  no_kwargs("softmax_sink", kwargs)
  return Normalizer(
      "softmax_sink",
      lambda x, where=None, n_keys=None, sink_H=None: softmax_with_sink(
          x, sink if sink_H is None else sink_H[:, None, None], where=where))


def _from_config(values, step) -> Normalizer:
  norm = _factory(values["sink_init"])
  if not values["sink_learned"]:
    return norm
  init = nn.initializers.constant(values["sink_init"])
  return Normalizer(norm.name, norm.fn, learned={
      "sink_H": ("sink", lambda H: (nn.with_logical_partitioning(init, ("heads",)), (H,)))})


def _check(values) -> None:
  if not isinstance(values["sink_learned"], bool):
    raise ParamError("sink_learned", f"must be True or False, got {values['sink_learned']!r}")
  b = values["sink_init"]
  if values["sink_learned"] and not jnp.isfinite(b):
    raise ParamError("sink_init", f"a learned sink needs a finite initial logit, got {b}")


def _pallas(values, step, num_keys, per_row, learned=None):
  """The two-pass attention kernel's sink: the learned (H,) logits as (H, 1, 1), or the fixed
  one. (The two-pass softmax kernel has none: with quantization the scores go through
  softmax_with_sink in XLA.)"""
  if values["sink_learned"]:
    return {"sink": learned["sink_H"][:, None, None]}
  return {"sink": float(values["sink_init"])}


register(Spec("softmax_sink", params={"sink_init": 0.0, "sink_learned": True}, factory=_factory,
              from_config=_from_config, check=_check, pallas=_pallas))
