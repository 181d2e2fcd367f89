"""A small causal language model on qtx's own blocks: token and position embeddings, the same
pre-LN Encoder as CLIP's text tower (attention normalizers, gates, quantization points), a final
LayerNorm and an output head. Used by the Bigram-Backcopy study (qtx.analysis.backcopy); the
output head is kept in float under quantization, as CLIP's projections are by default."""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from qtx.nn.attention import AttentionConfig
from qtx.nn.transformer import Encoder, layer_norm
from qtx.quant.layers import ActQuant, QDense, QuantConfig


class CausalLM(nn.Module):
  vocab_size: int
  context_length: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  attention: AttentionConfig = AttentionConfig()
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None
  activation: str = "gelu_tanh"

  @nn.compact
  def __call__(self, tokens_BxT):
    """B x T int tokens -> B x T x vocab logits (float32)."""
    B, T = tokens_BxT.shape
    if T > self.context_length:
      raise ValueError(f"sequence length {T} exceeds context_length {self.context_length}")
    emb = self.param("token_embed", nn.initializers.normal(0.02), (self.vocab_size, self.width))
    pos = self.param("pos_embed", nn.initializers.normal(0.01), (self.context_length, self.width))
    x = jnp.take(emb, tokens_BxT, axis=0).astype(self.dtype) + pos[:T].astype(self.dtype)
    x = ActQuant(cfg=self.quant, point="embed", name="embed_quant")(x)
    x = Encoder(self.depth, self.heads, self.mlp_dim, self.attention, causal=True,
                dtype=self.dtype, quant=self.quant, activation=self.activation,
                name="encoder")(x)
    x = layer_norm(self.quant, self.dtype, "ln_final")(x).astype(jnp.float32)
    keep_head = self.quant is None or "head" in self.quant.keep_float
    if keep_head:
      return nn.Dense(self.vocab_size, name="head")(x)
    return QDense(self.vocab_size, cfg=self.quant, quantize_output=False, name="head")(x)
