"""Text tower: token + learned position embeddings, causal pre-LN blocks, ln_final, pooling at
the end-of-text token (the highest id in each row, as in CLIP), projection to the joint space."""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qtx.kernels.sharding import context_mesh
from qtx.nn.attention import AttentionConfig
from qtx.nn.transformer import Encoder, layer_norm
from qtx.quant.layers import ActQuant, QDense, QuantConfig


def valid_tokens(tokens_BxT, eot_B=None):
  """B x T bool: True up to and including each row's end-of-text token (its highest id;
  `eot_B` when already known)."""
  eot_B = jnp.argmax(tokens_BxT, axis=-1) if eot_B is None else eot_B
  return jnp.arange(tokens_BxT.shape[1])[None, :] <= eot_B[:, None]


def embed_lookup(table_VxD, ids_BxT):
  """`jnp.take(table_VxD, ids_BxT, axis=0)` (B x T x D), with a gradient that costs less
  communication under data parallelism when the batch has fewer tokens than the table rows.

  Autodiff's gradient scatters each device's tokens into a zero V x D table, which the
  partitioner then all-reduces across the batch devices: V x D values, whatever the batch. When
  the global batch has fewer tokens than the table has rows (B T < V: small batches, large
  vocabularies), all-gathering the B x T x D cotangent and the ids and scattering them on every
  device moves less, and gives the same table gradient up to the order of float additions
  (tokens that repeat sum in a different order). Above that the autodiff form is kept.
  """
  if ids_BxT.size >= table_VxD.shape[0] or context_mesh() is None:
    return jnp.take(table_VxD, ids_BxT, axis=0)
  return _gathered_grad_lookup(table_VxD, ids_BxT)


def whole_table(table_VxD):
  """The token table gathered whole (replicated) on every device when a mesh is in context.
  Under FSDP the table is split along its width over the same axis the batch is split over;
  the partitioner then kept the lookup's width split and gathered the batch instead, so the
  whole text tower ran on the global batch on every device. With the table whole, the lookup's
  output follows the ids' sharding (the batch split when training, whatever the encoders are
  given when evaluating). A no-op for a replicated table (data parallelism)."""
  if context_mesh() is None:
    return table_VxD
  return jax.lax.with_sharding_constraint(table_VxD, P())


@jax.custom_vjp
def _gathered_grad_lookup(table_VxD, ids_BxT):
  return jnp.take(table_VxD, ids_BxT, axis=0)


def _gathered_grad_lookup_fwd(table_VxD, ids_BxT):
  # The zero-size slice carries the table's row count and dtype to the backward pass.
  return jnp.take(table_VxD, ids_BxT, axis=0), (ids_BxT, table_VxD[:, :0])


def _gathered_grad_lookup_bwd(res, g_BxTxD):
  ids_BxT, empty_Vx0 = res
  # Replicated operands (embed_lookup only comes here under a mesh): the partitioner
  # all-gathers them (B T x D values) and each device scatters the whole batch, instead of
  # scattering its shard and all-reducing V x D.
  g_BxTxD = jax.lax.with_sharding_constraint(g_BxTxD, P())
  ids_BxT = jax.lax.with_sharding_constraint(ids_BxT, P())
  d_VxD = jnp.zeros((empty_Vx0.shape[0], g_BxTxD.shape[-1]), empty_Vx0.dtype)
  return d_VxD.at[ids_BxT].add(g_BxTxD.astype(empty_Vx0.dtype)), None


_gathered_grad_lookup.defvjp(_gathered_grad_lookup_fwd, _gathered_grad_lookup_bwd)


class TextTower(nn.Module):
  vocab_size: int
  context_length: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  embed_dim: int
  attention: AttentionConfig = AttentionConfig()
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None
  scan: bool = False
  remat: str = "none"
  activation: str = "gelu_tanh"

  @nn.compact
  def __call__(self, tokens_BxT, step=None):
    if tokens_BxT.ndim != 2 or tokens_BxT.shape[1] != self.context_length:
      raise ValueError(f"text tower expects tokens of shape (B, {self.context_length}), got "
                       f"{tuple(tokens_BxT.shape)}")
    T = tokens_BxT.shape[1]
    emb = self.param("token_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", "embed")), (self.vocab_size, self.width))
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), ("length", "embed")), (T, self.width))
    eot = jnp.argmax(tokens_BxT, axis=-1)
    # Tokens after the end-of-text token never reach the pooled output (causal attention):
    # quantization ranges are calibrated on the others only.
    valid_BxT = valid_tokens(tokens_BxT, eot)
    x = embed_lookup(whole_table(emb), tokens_BxT).astype(self.dtype) + pos.astype(self.dtype)
    x = ActQuant(cfg=self.quant, point="embed", name="embed_quant")(x, valid_BxT[:, :, None])
    x = Encoder(self.depth, self.heads, self.mlp_dim, self.attention, causal=True,
                dtype=self.dtype, quant=self.quant, scan=self.scan, remat=self.remat,
                activation=self.activation, name="encoder")(x, None, step, valid_BxT)
    x = layer_norm(self.quant, self.dtype, "ln_final")(x, valid_BxT[:, :, None])
    # take_along_axis keeps the gather batch-local (x[arange(B), eot] does not: under data
    # parallelism it all-gathers the indices and all-reduces the pooled rows).
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    keep_head = self.quant is None or "head" in self.quant.keep_float
    init = nn.with_logical_partitioning(nn.initializers.normal(self.width ** -0.5),
                                        ("embed", "joint"))
    if keep_head:
      return nn.Dense(self.embed_dim, use_bias=False, name="proj", kernel_init=init)(pooled)
    return QDense(self.embed_dim, use_bias=False, cfg=self.quant, quantize_output=False,
                  name="proj", kernel_init=init)(pooled)
