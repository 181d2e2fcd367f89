"""Two-tower CLIP model with a learned temperature (and a learned bias for SigLIP)."""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from qtx.nn import normalizers
from qtx.nn.attention import AttentionConfig
from qtx.nn.text import TextTower
from qtx.nn.vit import VisionTower
from qtx.quant.layers import QuantConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _l2(x):
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class CLIP(nn.Module):
  """encode_image / encode_text return L2-normalised embeddings; __call__ returns both plus the
  temperature and bias parameters (log-scale, bias)."""
  image: dict
  text: dict
  embed_dim: int
  init_logit_scale: float = math.log(1 / 0.07)
  init_logit_bias: Optional[float] = None
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None
  scan: bool = False
  remat: str = "none"

  def setup(self):
    common = dict(embed_dim=self.embed_dim, dtype=self.dtype, quant=self.quant, scan=self.scan,
                  remat=self.remat)
    self.visual = VisionTower(**dict(self.image), **common)
    self.textual = TextTower(**dict(self.text), **common)
    self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
        nn.initializers.constant(self.init_logit_scale), ()), ())
    if self.init_logit_bias is not None:
      self.logit_bias = self.param("logit_bias", nn.with_logical_partitioning(
          nn.initializers.constant(self.init_logit_bias), ()), ())

  def encode_image(self, images_BxHxWxC, step=None):
    return _l2(self.visual(images_BxHxWxC, step))

  def encode_text(self, tokens_BxT, step=None):
    return _l2(self.textual(tokens_BxT, step))

  def __call__(self, images_BxHxWxC, tokens_BxT, step=None):
    zi = self.encode_image(images_BxHxWxC, step)
    zt = self.encode_text(tokens_BxT, step)
    bias = self.logit_bias if self.init_logit_bias is not None else None
    return zi, zt, self.logit_scale, bias


IMAGE_KEYS = ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "channels",
              "ln_pre", "activation", "registers")
TEXT_KEYS = ("vocab_size", "context_length", "width", "depth", "heads", "mlp_dim", "activation")


def tower_kwargs(t, keys) -> dict:
  """CLIP's keyword arguments of one tower from its config block."""
  out = {k: t[k] for k in keys if k in t}
  out["attention"] = AttentionConfig.from_config(t.attention)
  return out


def check_model_config(m) -> None:
  """Raise ValueError naming the full key (model....) of the first bad value of a model block."""
  from qtx.nn.transformer import ACTIVATIONS
  if m.dtype not in DTYPES:
    raise ValueError(f"unknown model.dtype {m.dtype!r}; choose one of {tuple(DTYPES)}")
  for tower, keys in (("image", IMAGE_KEYS), ("text", TEXT_KEYS)):
    t = m[tower]
    extra = set(t.keys()) - set(keys) - {"attention"}
    if extra:
      raise ValueError(f"unknown keys in model.{tower}: {sorted(extra)}; accepted: "
                       f"{sorted(keys + ('attention',))}")
    try:
      AttentionConfig.from_config(t.attention)
    except normalizers.ParamError as e:
      raise ValueError(f"model.{tower}.attention.{e.key}: {e.message}") from None
    except (ValueError, TypeError) as e:
      raise ValueError(f"model.{tower}.attention: {e}") from None
    if t.get("activation", "gelu_tanh") not in ACTIVATIONS:
      raise ValueError(f"unknown model.{tower}.activation {t.activation!r}; choose one of "
                       f"{tuple(ACTIVATIONS)}")
    if t.width % t.heads:
      raise ValueError(f"model.{tower}: width {t.width} is not divisible by heads {t.heads}")
  registers = m.image.get("registers", 0)
  if not isinstance(registers, int) or isinstance(registers, bool) or registers < 0:
    raise ValueError(f"model.image.registers must be an integer >= 0, got {registers!r}")
  if m.image.image_size % m.image.patch_size:
    raise ValueError(f"model.image.image_size {m.image.image_size} is not a multiple of "
                     f"patch_size {m.image.patch_size}")
