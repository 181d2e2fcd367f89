"""Text tower: token + learned position embeddings, causal pre-LN blocks, ln_final, pooling at
the end-of-text token (the highest id in each row, as in CLIP), projection to the joint space."""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from qtx.nn.attention import AttentionConfig
from qtx.nn.transformer import Encoder, layer_norm
from qtx.quant.layers import ActQuant, QDense, QuantConfig


def valid_tokens(tokens_BxT, eot_B=None):
  """B x T bool: True up to and including each row's end-of-text token (its highest id;
  `eot_B` when already known)."""
  eot_B = jnp.argmax(tokens_BxT, axis=-1) if eot_B is None else eot_B
  return jnp.arange(tokens_BxT.shape[1])[None, :] <= eot_B[:, None]


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
    B, T = tokens_BxT.shape
    emb = self.param("token_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", "embed")), (self.vocab_size, self.width))
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), ("length", "embed")), (T, self.width))
    eot = jnp.argmax(tokens_BxT, axis=-1)
    # Tokens after the end-of-text token never reach the pooled output (causal attention):
    # quantization ranges are calibrated on the others only.
    valid_BxT = valid_tokens(tokens_BxT, eot)
    x = jnp.take(emb, tokens_BxT, axis=0).astype(self.dtype) + pos.astype(self.dtype)
    x = ActQuant(cfg=self.quant, point="embed", name="embed_quant")(x, valid_BxT[:, :, None])
    x = Encoder(self.depth, self.heads, self.mlp_dim, self.attention, causal=True,
                dtype=self.dtype, quant=self.quant, scan=self.scan, remat=self.remat,
                activation=self.activation, name="encoder")(x, None, step, valid_BxT)
    x = layer_norm(self.quant, self.dtype, "ln_final")(x, valid_BxT[:, :, None])
    pooled = x[jnp.arange(B), eot].astype(jnp.float32)
    keep_head = self.quant is None or "head" in self.quant.keep_float
    init = nn.with_logical_partitioning(nn.initializers.normal(self.width ** -0.5),
                                        ("embed", "joint"))
    if keep_head:
      return nn.Dense(self.embed_dim, use_bias=False, name="proj", kernel_init=init)(pooled)
    return QDense(self.embed_dim, use_bias=False, cfg=self.quant, quantize_output=False,
                  name="proj", kernel_init=init)(pooled)
