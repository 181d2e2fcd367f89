"""Pre-LayerNorm transformer: MLP, block, and the encoder stack (optional nn.scan / nn.remat).

Each block sows its FFN output (`ffn_out`) and its output (`block_out`) into the
'intermediates' collection; the outlier statistics read exactly these (Bondarenko et al.).
Quantization points: both LayerNorm outputs, the FFN linears, and both residual sums.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qtx.nn.attention import AttentionConfig, MultiHeadAttention
from qtx.quant.layers import ActQuant, QDense, QLayerNorm, QuantConfig

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ACTIVATIONS = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    # open_clip's exact GELU, x * Phi(x), written with erf: XLA's erfc (jax.nn.gelu's form)
    # costs ~40% more on the CPU for the same values to float32 round-off
    "gelu": lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(np.sqrt(0.5)))),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
}


def activation_fn(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; choose one of {tuple(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class Mlp(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None
  activation: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x_BxTxD, valid_BxTx1=None):
    D = x_BxTxD.shape[-1]
    h = QDense(self.mlp_dim, dtype=self.dtype, cfg=self.quant, name="fc1",
               kernel_init=nn.with_logical_partitioning(
                   nn.initializers.lecun_normal(), ("embed", "mlp")),
               bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(
                   x_BxTxD, valid_BxTx1)
    h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
    h = activation_fn(self.activation)(h)
    h = ActQuant(cfg=self.quant, point="mlp_act", name="act_quant")(h, valid_BxTx1)
    return QDense(D, dtype=self.dtype, cfg=self.quant, name="fc2",
                  kernel_init=nn.with_logical_partitioning(
                      nn.initializers.lecun_normal(), ("mlp", "embed")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(
                      h, valid_BxTx1)


def layer_norm(quant, dtype, name):
  return QLayerNorm(cfg=quant, dtype=dtype, name=name, epsilon=1e-5,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class Block(nn.Module):
  """x + attn(ln_1(x)); x + mlp(ln_2(x)).

  valid_BxT (optional, bool): the tokens the tower's output can depend on (the text tower's
  tokens up to its end-of-text token). Quantization ranges are taken over these tokens only;
  the computation itself does not change.
  """
  num_heads: int
  mlp_dim: int
  attention: AttentionConfig = AttentionConfig()
  causal: bool = False
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None
  activation: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x_BxTxD, key_mask_BxS=None, step=None, valid_BxT=None):
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "act_embed"))
    v = None if valid_BxT is None else valid_BxT[:, :, None]
    y = layer_norm(self.quant, self.dtype, "ln_1")(x_BxTxD, v)
    y = MultiHeadAttention(self.num_heads, self.attention, self.causal, self.dtype, self.quant,
                           name="attn")(y, key_mask_BxS, step, valid_BxT)
    x_BxTxD = ActQuant(cfg=self.quant, point="resid", name="resid_1_quant")(x_BxTxD + y, v)
    y = layer_norm(self.quant, self.dtype, "ln_2")(x_BxTxD, v)
    y = Mlp(self.mlp_dim, self.dtype, self.quant, self.activation, name="mlp")(y, v)
    self.sow("intermediates", "ffn_out", y)
    x_BxTxD = ActQuant(cfg=self.quant, point="resid", name="resid_2_quant")(x_BxTxD + y, v)
    self.sow("intermediates", "block_out", x_BxTxD)
    return x_BxTxD


class _ScanBlock(nn.Module):
  """Block with the (carry, xs) -> (carry, ys) signature of nn.scan."""
  block_kwargs: Any

  @nn.compact
  def __call__(self, x, key_mask_BxS, step, valid_BxT):
    return Block(**dict(self.block_kwargs), name="block")(x, key_mask_BxS, step, valid_BxT), None


def _remat_policy(name):
  if name == "none":
    return None
  policies = {
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  }
  if name not in policies:
    raise ValueError(f"unknown remat policy {name!r}; choose one of {REMAT_POLICIES}")
  return policies[name]


class Encoder(nn.Module):
  """`depth` pre-LN blocks; `scan` stacks their params on a leading 'layers' axis."""
  depth: int
  num_heads: int
  mlp_dim: int
  attention: AttentionConfig = AttentionConfig()
  causal: bool = False
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None
  scan: bool = False
  remat: str = "none"
  activation: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x_BxTxD, key_mask_BxS=None, step=None, valid_BxT=None):
    activation_fn(self.activation)  # validate early
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, attention=self.attention,
              causal=self.causal, dtype=self.dtype, quant=self.quant,
              activation=self.activation)
    policy = _remat_policy(self.remat)
    if self.scan:
      body = _ScanBlock
      if self.remat != "none":
        body = nn.remat(body, policy=policy, prevent_cse=False)
      stack = nn.scan(body, variable_axes={"params": 0, "intermediates": 0, "quant_stats": 0},
                      split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                      length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxTxD, _ = stack(block_kwargs=tuple(kw.items()), name="blocks")(
          x_BxTxD, key_mask_BxS, step, valid_BxT)
      return x_BxTxD
    block = Block
    if self.remat != "none":
      block = nn.remat(Block, policy=policy, static_argnums=())
    for i in range(self.depth):
      x_BxTxD = block(**kw, name=f"block_{i}")(x_BxTxD, key_mask_BxS, step, valid_BxT)
    return x_BxTxD
