"""Multi-head attention with a pluggable normalizer, optional gating and quantization points.

scores = scale * q.k  ->  normalizer  ->  P.V  ->  (gate)  ->  output projection.

Quantization points (active only when a QuantConfig is enabled): q/k/v/out linear outputs,
the scores (normalizer input), the probabilities (normalizer output) and the context P.V (after
the gate, when there is one: it is the input of the output projection). Gates and their
parameters stay in float (Bondarenko et al. 2023, section 4.2).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtx.nn import normalizers
from qtx.quant.layers import ActQuant, QDense, QuantConfig, fused_dense

GATES = ("none", "linear", "mlp", "all_heads_linear", "elementwise")
IMPLS = ("xla", "pallas")


# Keys of a tower's attention block besides the normalizers' own (normalizers.all_params()).
COMMON_KEYS = {"normalizer": "softmax", "gate": "none", "gate_hidden": 4, "gate_pi_init": 0.5,
               "impl": "xla"}


class AttentionConfig:
  """Hashable, validated view of a tower's `attention` config block: the normalizer's name and
  the parameters of every registered normalizer (the block holds them all), the gate, the impl.

    AttentionConfig(normalizer="clipped_softmax", alpha=1.0, gate="linear")
  """

  def __init__(self, **kw):
    known = {**COMMON_KEYS, **normalizers.all_params()}
    unknown = sorted(set(kw) - set(known))
    if unknown:
      raise normalizers.ParamError(unknown[0], f"unknown attention config key; accepted: "
                                   f"{sorted(known)}")
    object.__setattr__(self, "_values", tuple(sorted({**known, **kw}.items())))
    self._check()

  @classmethod
  def from_config(cls, c) -> "AttentionConfig":
    return cls(**(c.to_dict() if hasattr(c, "to_dict") else dict(c)))

  def __getattr__(self, name):
    values = dict(object.__getattribute__(self, "_values"))
    if name in values:
      return values[name]
    raise AttributeError(name)

  def __setattr__(self, name, value):
    raise dataclasses.FrozenInstanceError(f"AttentionConfig is frozen (setting {name!r})")

  def __eq__(self, other):
    return isinstance(other, AttentionConfig) and self._values == other._values

  def __hash__(self):
    return hash(self._values)

  def __repr__(self):
    return f"AttentionConfig({', '.join(f'{k}={v!r}' for k, v in self._values)})"

  @property
  def spec(self) -> normalizers.Spec:
    return normalizers.spec(self.normalizer)

  def values(self) -> dict[str, Any]:
    """The normalizer's own parameters."""
    return {k: getattr(self, k) for k in self.spec.params}

  def _check(self):
    """Raises normalizers.ParamError naming the key of the first bad value."""
    P = normalizers.ParamError
    try:
      spec = self.spec
    except ValueError as e:
      raise P("normalizer", str(e)) from None
    if spec.check is not None:
      spec.check(self.values())
    if self.gate not in GATES:
      raise P("gate", f"unknown attention gate {self.gate!r}; choose one of {GATES}")
    if self.impl not in IMPLS:
      raise P("impl", f"unknown attention impl {self.impl!r}; choose one of {IMPLS}")
    if not 0.0 < self.gate_pi_init < 1.0:
      raise P("gate_pi_init", f"must be in (0, 1), got {self.gate_pi_init}")
    if self.impl == "pallas" and spec.pallas is None:
      with_kernel = tuple(n for n in normalizers.names() if normalizers.spec(n).pallas)
      raise P("impl", f"impl='pallas' supports {with_kernel}, not {self.normalizer!r}")

  def normalizer_at(self, step=None) -> normalizers.Normalizer:
    """The normalizer in force at training step `step` (None: outside training)."""
    return self.spec.from_config(self.values(), step)


class HeadGate(nn.Module):
  """Sigmoid gate of the attention output, computed from the attention input x.

  Per head and token (Bondarenko et al. 2023, eqs. 5-7), returning B x T x H:
    linear: head i's gate is a linear map of the i-th d_head slice of x (d_head -> 1);
    mlp: d_head -> hidden -> ReLU -> 1 per head; all_heads_linear: d_model -> n_heads.
  Per channel (Qiu et al. 2025, "Gated Attention for Large Language Models", the G1 position:
  after scaled dot-product attention, elementwise, head-specific, multiplicative sigmoid),
  returning B x T x H x K:
    elementwise: Y' = Y * sigmoid(x W + b), W of shape d_model x (H * K), one gate value per
    channel of the concatenated heads.
  The output bias starts at logit(pi_init) so the initial gate is pi_init (with pi_init = 0.5
  the bias is 0, Qiu et al.'s bias-free gate at initialisation).
  """
  kind: str
  num_heads: int
  hidden: int = 4
  pi_init: float = 0.5

  @nn.compact
  def __call__(self, x_BxTxD):
    B, T, D = x_BxTxD.shape
    H = self.num_heads
    x = x_BxTxD.astype(jnp.float32)  # gates stay in float
    b0 = math.log(self.pi_init / (1.0 - self.pi_init))
    bias_init = nn.initializers.constant(b0)
    if self.kind == "all_heads_linear":
      w = self.param("kernel", nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ("embed", "heads")), (D, H))
      b = self.param("bias", nn.with_logical_partitioning(bias_init, ("heads",)), (H,))
      logits = x @ w + b
    elif self.kind == "elementwise":
      K = D // H
      w = self.param("kernel", nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ("embed", "heads")), (D, H * K))
      b = self.param("bias", nn.with_logical_partitioning(bias_init, ("heads",)), (H * K,))
      logits = (x @ w + b).reshape(B, T, H, K)
    else:
      K = D // H
      x_BxTxHxK = x.reshape(B, T, H, K)
      if self.kind == "linear":
        w = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(batch_axis=(0,)), ("heads", "kv")), (H, K))
        b = self.param("bias", nn.with_logical_partitioning(bias_init, ("heads",)), (H,))
        logits = jnp.einsum("bthk,hk->bth", x_BxTxHxK, w) + b
      elif self.kind == "mlp":
        w1 = self.param("hidden_kernel", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(batch_axis=(0,)), ("heads", "kv", None)),
                        (H, K, self.hidden))
        b1 = self.param("hidden_bias", nn.with_logical_partitioning(
            nn.initializers.zeros, ("heads", None)), (H, self.hidden))
        w2 = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(batch_axis=(0,)), ("heads", None)), (H, self.hidden))
        b = self.param("bias", nn.with_logical_partitioning(bias_init, ("heads",)), (H,))
        h = jax.nn.relu(jnp.einsum("bthk,hkn->bthn", x_BxTxHxK, w1) + b1)
        logits = jnp.einsum("bthn,hn->bth", h, w2) + b
      else:
        raise ValueError(f"unknown attention gate {self.kind!r}; choose one of {GATES}")
    gate = jax.nn.sigmoid(logits)
    self.sow("intermediates", "gate", gate)
    return gate


def _row_key_counts(T: int, S: int, causal: bool, key_mask_BxS):
  """Keys each query row sees, broadcastable to B x H x T x 1."""
  n = jnp.full((1, 1, T, 1), float(S), jnp.float32)
  if causal:
    n = jnp.minimum(n, (jnp.arange(T, dtype=jnp.float32) + 1.0 + (S - T))[None, None, :, None])
  if key_mask_BxS is not None:
    n = jnp.minimum(n, jnp.sum(key_mask_BxS, -1, dtype=jnp.float32)[:, None, None, None])
  return n


class MultiHeadAttention(nn.Module):
  """Self-attention; x_BxTxD is the (pre-LayerNorm'ed) block input."""
  num_heads: int
  cfg: AttentionConfig = AttentionConfig()
  causal: bool = False
  dtype: Any = jnp.float32
  quant: Optional[QuantConfig] = None

  @nn.compact
  def __call__(self, x_BxTxD, key_mask_BxS=None, step=None, valid_BxT=None):
    """valid_BxT: optional bool mask of the query tokens the tower's output depends on; the
    quantization ranges are taken over them (and, for scores and probabilities, over the keys
    each row attends) only. It changes no value of the float computation."""
    B, T, D = x_BxTxD.shape
    H = self.num_heads
    if D % H:
      raise ValueError(f"width {D} is not divisible by the number of heads {H}")
    K = D // H
    cfg = self.cfg
    norm = cfg.normalizer_at(step)

    def proj(name):
      return QDense(H * K, dtype=self.dtype, cfg=self.quant, name=name,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.lecun_normal(), ("embed", "heads")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)))

    v_tok = None if valid_BxT is None else valid_BxT[:, :, None]
    q_BxTxF, k_BxSxF, v_BxSxF = fused_dense(
        [proj("query"), proj("key"), proj("value")], x_BxTxD, v_tok)
    q_BxTxHxK = q_BxTxF.reshape(B, T, H, K)
    k_BxSxHxK = k_BxSxF.reshape(B, T, H, K)
    v_BxSxHxK = v_BxSxF.reshape(B, T, H, K)
    where = _mask(T, T, self.causal, key_mask_BxS)
    valid_scores = where
    if valid_BxT is not None:
      rows = valid_BxT[:, None, :, None]
      valid_scores = rows if where is None else where & rows
    n_keys = _row_key_counts(T, T, self.causal, key_mask_BxS)
    if norm.normalize_qk:
      q_BxTxHxK = _l2_normalize(q_BxTxHxK)
      k_BxSxHxK = _l2_normalize(k_BxSxHxK)

    # parameters the normalizer learns (e.g. a sink logit per head), for either path
    learned = {kw: self.param(name, *make(H)) for kw, (name, make) in norm.learned.items()}
    # the two-pass kernels' arguments, or None where they cannot run this normalizer here
    kernel_args = None
    if cfg.impl == "pallas":
      per_row = self.causal or key_mask_BxS is not None
      extra = {"learned": learned} if learned else {}
      kernel_args = cfg.spec.pallas(cfg.values(), step, T, per_row, **extra)
    pallas = kernel_args is not None
    use_fused = (pallas and not (self.quant and self.quant.enabled)
                 and not self.is_mutable_collection("intermediates"))
    if use_fused:
      from qtx import kernels
      ctx_BxTxHxK = kernels.two_pass_attention(
          q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, causal=self.causal, key_mask_BxS=key_mask_BxS,
          **kernel_args, scale=norm.score_scale(K, n_keys)).astype(self.dtype)
    else:
      scale = jnp.asarray(norm.score_scale(K, n_keys), jnp.float32).astype(q_BxTxHxK.dtype)
      # the scale multiplies q (T x K per head) rather than the T x S scores: one pass over
      # the scores less in each direction; exact where the scale is a power of two (1/sqrt(K)
      # for K = 16, 64, 256), else equal up to float rounding
      s_BxHxTxS = _scores(q_BxTxHxK * _to_query_layout(scale), k_BxSxHxK)
      s_BxHxTxS = ActQuant(cfg=self.quant, point="attn_scores", name="scores_quant")(
          s_BxHxTxS, valid_scores)
      from qtx import kernels
      if pallas and set(kernel_args) <= kernels.SOFTMAX_NORMALIZER_ARGS:
        p_BxHxTxS = kernels.two_pass_softmax(s_BxHxTxS, where=where, **kernel_args)
      else:
        p_BxHxTxS = norm(s_BxHxTxS.astype(jnp.float32), where=where, n_keys=n_keys, **learned)
      p_BxHxTxS = p_BxHxTxS.astype(self.dtype)
      self.sow("intermediates", "attn_probs", p_BxHxTxS)
      p_BxHxTxS = ActQuant(cfg=self.quant, point="attn_probs", name="probs_quant")(
          p_BxHxTxS, valid_scores)
      ctx_BxTxHxK = _context(p_BxHxTxS, v_BxSxHxK)
    if cfg.gate != "none":
      # The gate is computed and applied in float; the gated context is what enters the
      # output projection, so it is the tensor quantized (Bondarenko et al. 2023, sec. 4.2).
      gate = HeadGate(cfg.gate, H, cfg.gate_hidden, cfg.gate_pi_init, name="gate")(x_BxTxD)
      gate_BxTxHx1_or_K = gate if gate.ndim == 4 else gate[..., None]
      ctx_BxTxHxK = ctx_BxTxHxK * gate_BxTxHx1_or_K.astype(ctx_BxTxHxK.dtype)
    ctx_BxTxHxK = ActQuant(cfg=self.quant, point="attn_context", name="context_quant")(
        ctx_BxTxHxK, None if valid_BxT is None else valid_BxT[:, :, None, None])
    ctx_BxTxD = nn.with_logical_constraint(ctx_BxTxHxK.reshape(B, T, D),
                                           ("batch", "length", "act_heads"))
    return QDense(D, dtype=self.dtype, cfg=self.quant, name="out",
                  kernel_init=nn.with_logical_partitioning(
                      nn.initializers.lecun_normal(), ("heads", "embed")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(
                      ctx_BxTxD, v_tok)


def _to_query_layout(scale):
  """A score multiplier broadcastable to B x H x T x S that is constant along S (per batch,
  head and/or query row) as a multiplier of q_BxTxHxK: q.k * scale == (q * scale').k."""
  if scale.ndim == 0:
    return scale
  s = jnp.reshape(scale, (1,) * (4 - scale.ndim) + scale.shape)
  if s.shape[-1] != 1:
    raise ValueError(f"a score scale of shape {scale.shape} varies along the keys")
  return jnp.swapaxes(s, 1, 2)


@jax.custom_vjp
def _scores(q_BxTxHxK, k_BxSxHxK):
  return jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK)


def _scores_fwd(q, k):
  return _scores(q, k), (q, k)


def _scores_bwd(res, ds_BxHxTxS):
  q, k = res
  dq = jnp.einsum("bhts,bshk->bthk", ds_BxHxTxS, k)
  dk = jnp.einsum("bhst,bthk->bshk", jnp.swapaxes(ds_BxHxTxS, -1, -2), q)
  return dq.astype(q.dtype), dk.astype(k.dtype)


_scores.defvjp(_scores_fwd, _scores_bwd)


@jax.custom_vjp
def _context(p_BxHxTxS, v_BxSxHxK):
  return jnp.einsum("bhts,bshk->bthk", p_BxHxTxS, v_BxSxHxK)


def _context_fwd(p, v):
  return _context(p, v), (p, v)


def _context_bwd(res, dc_BxTxHxK):
  p, v = res
  dp = jnp.einsum("bthk,bshk->bhts", dc_BxTxHxK, v)
  dv = jnp.einsum("bhst,bthk->bshk", jnp.swapaxes(p, -1, -2), dc_BxTxHxK)
  return dp.astype(p.dtype), dv.astype(v.dtype)


_context.defvjp(_context_fwd, _context_bwd)


def _l2_normalize(x, eps=1e-6):
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, -1, keepdims=True) + eps)).astype(x.dtype)


def _mask(T, S, causal, key_mask_BxS):
  """Boolean mask broadcastable to B x H x T x S (True = attend), or None."""
  where = None
  if causal:
    where = (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T))[None, None]
  if key_mask_BxS is not None:
    km = key_mask_BxS.astype(bool)[:, None, None, :]
    where = km if where is None else where & km
  return where
