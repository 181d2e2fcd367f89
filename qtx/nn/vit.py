"""Image tower: patch embedding, class token, learned positions, optional register tokens,
optional ln_pre, pre-LN blocks.

Registers (Darcet et al. 2023, "Vision Transformers Need Registers"): `registers` = N learned
tokens r_1..r_N (no positional embedding) appended after the class and patch tokens,
    x = [cls + p_0; patch_1 + p_1; ...; patch_P + p_P; r_1; ...; r_N],
attended like any other token and dropped at the output (the class token is pooled), so they
give the heads somewhere other than background patches to put attention that changes nothing.

Images arrive as uint8 (B, H, W, C) and are normalised on device with the CLIP mean/std.
The patch embedding is a linear map of flattened P x P x C patches (identical to a stride-P
convolution without bias, as in CLIP). Pooling: LayerNorm of the class token, then a
projection to the joint embedding (kept in float under quantization).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from qtx.nn.attention import AttentionConfig
from qtx.nn.transformer import Encoder, layer_norm
from qtx.quant.layers import ActQuant, QDense, QuantConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_images(images_BxHxWxC, dtype=jnp.float32):
  """uint8 [0, 255] (or float [0, 1]) images -> CLIP-normalised float (any shape with the
  channels last)."""
  x = images_BxHxWxC.astype(jnp.float32)
  if images_BxHxWxC.dtype == jnp.uint8:
    x = x / 255.0
  x = (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
  return x.astype(dtype)


def patch_grid(x_BxHxWxC, patch_size):
  """(B, H/P, W/P, P, P, C): the image cut into P x P patches, channels still last."""
  B, H, W, C = x_BxHxWxC.shape
  P = patch_size
  return x_BxHxWxC.reshape(B, H // P, P, W // P, P, C).transpose(0, 1, 3, 2, 4, 5)


def patchify(x_BxHxWxC, patch_size):
  """(B, number of patches, P * P * C): patches in row-major order, each flattened in
  (row, col, channel) order."""
  B, H, W, C = x_BxHxWxC.shape
  P = patch_size
  return patch_grid(x_BxHxWxC, P).reshape(B, (H // P) * (W // P), P * P * C)


class VisionTower(nn.Module):
  image_size: int
  patch_size: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  embed_dim: int
  channels: int = 3
  ln_pre: bool = True
  registers: int = 0
  attention: AttentionConfig = AttentionConfig()
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None
  scan: bool = False
  remat: str = "none"
  activation: str = "gelu_tanh"

  @nn.compact
  def __call__(self, images_BxHxWxC, step=None):
    B, Hh, Ww, C = images_BxHxWxC.shape
    if (Hh, Ww, C) != (self.image_size, self.image_size, self.channels):
      raise ValueError(
          f"image tower expects images of shape (B, {self.image_size}, {self.image_size}, "
          f"{self.channels}), got {tuple(images_BxHxWxC.shape)}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")
    # Cut into patches first, so the transpose may run on the uint8 batch (XLA:CPU fuses it
    # into the normalisation either way; docs/benchmarks.md). Normalisation is per channel
    # and the input quantizer's ranges (per tensor, or per pixel over its channels) do not
    # depend on the pixels' order, so both apply to the patch grid exactly as to the image.
    x = patch_grid(images_BxHxWxC, self.patch_size)
    x = normalize_images(x, self.dtype)
    x = ActQuant(cfg=self.quant, point="input", name="input_quant")(x)
    patches = x.reshape(B, -1, self.patch_size ** 2 * C)
    x = QDense(self.width, use_bias=False, dtype=self.dtype, cfg=self.quant, name="patch_embed",
               kernel_init=nn.with_logical_partitioning(
                   nn.initializers.lecun_normal(), ("patch", "embed")))(patches)
    scale = self.width ** -0.5
    cls = self.param("cls_token", nn.with_logical_partitioning(
        nn.initializers.normal(scale), ("embed",)), (self.width,))
    T = patches.shape[1] + 1
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(scale), ("length", "embed")), (T, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (B, 1, self.width)), x], axis=1)
    x = x + pos.astype(x.dtype)
    if self.registers < 0:
      raise ValueError(f"registers must be >= 0, got {self.registers}")
    if self.registers:
      reg = self.param("registers", nn.with_logical_partitioning(
          nn.initializers.normal(scale), ("length", "embed")), (self.registers, self.width))
      x = jnp.concatenate([x, jnp.broadcast_to(reg.astype(x.dtype),
                                               (B, self.registers, self.width))], axis=1)
    x = ActQuant(cfg=self.quant, point="embed", name="embed_quant")(x)
    if self.ln_pre:
      x = layer_norm(self.quant, self.dtype, "ln_pre")(x)
    x = Encoder(self.depth, self.heads, self.mlp_dim, self.attention, causal=False,
                dtype=self.dtype, quant=self.quant, scan=self.scan, remat=self.remat,
                activation=self.activation, name="encoder")(x, None, step)
    pooled = layer_norm(self.quant, self.dtype, "ln_post")(x[:, 0])
    keep_head = self.quant is None or "head" in self.quant.keep_float
    init = nn.with_logical_partitioning(nn.initializers.normal(scale), ("embed", "joint"))
    pooled = pooled.astype(jnp.float32)
    if keep_head:
      return nn.Dense(self.embed_dim, use_bias=False, name="proj", kernel_init=init)(pooled)
    return QDense(self.embed_dim, use_bias=False, cfg=self.quant, quantize_output=False,
                  name="proj", kernel_init=init)(pooled)
