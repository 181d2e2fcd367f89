"""Memory-bounded contrastive losses: a ring exchange of text embeddings under `jax.shard_map`.

The plain losses in `qtx.losses` build the global B x B logits matrix (under jit the partitioner
shards it, but each device still holds at least a B_local x B_global slab). Here each device
keeps its own image and text shards and the text shards travel around a ring over the batch
mesh axes (SigLIP, Zhai et al. 2023, section 3.3): in step s device k holds the text chunk of
device k+s and computes only the b x b block of logits between its images and that chunk
(b = B_local). Per device the memory is O(b x b + b x E), whatever the number of devices.

- clip / infoloob: the row-wise (image->text) log-sum-exp accumulates on the device that owns the
  images; the column-wise (text->image) log-sum-exp accumulates in a b-vector that travels with
  its text chunk and is home again after a full turn of the ring.
- siglip: the sum of log_sigmoid over the blocks; the positives are the diagonal of the block
  computed before the first exchange (image i and text i always live on the same device).

Gradients use a second ring pass (a `jax.custom_vjp`): with the row and column log-sum-exps
saved from the forward pass, the gradient of the loss w.r.t. a block of logits is local to that
block, so the pass accumulates d(images) in place and d(texts) in a buffer travelling with its
chunk. Autodiff through the forward ring would keep every visiting chunk for the backward pass,
O(B_global x E) per device; the explicit backward ring keeps the memory bound.

All arithmetic is float32, as in `qtx.losses`, and the value equals `qtx.losses.compute` on the
full batch up to float rounding (log-sum-exps are merged block by block).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

# Ring families: the block math a loss of qtx.losses.LOSSES runs on (its `ring` field).
FAMILIES = ("softmax", "softmax_leave_out", "sigmoid")
BATCH_AXES = ("data", "fsdp")


# --------------------------------------------------------------------------------------------
# Block math (pure functions of one b x b block of logits).


def _block_logits(zi_bxE, zt_bxE, scale, bias):
  """u = zi zt^T (cosines) and l = scale * u + bias, both b x b float32."""
  u_bxb = jnp.einsum("ie,je->ij", zi_bxE, zt_bxE)
  l_bxb = scale * u_bxb
  if bias is not None:
    l_bxb = l_bxb + bias
  return u_bxb, l_bxb


def _mask_diag(l_bxb, on_diagonal: bool, leave_out: bool):
  if on_diagonal and leave_out:
    return jnp.where(jnp.eye(l_bxb.shape[0], dtype=bool), -jnp.inf, l_bxb)
  return l_bxb


def _siglip_labels(b: int, on_diagonal: bool):
  if on_diagonal:
    return 2.0 * jnp.eye(b, dtype=jnp.float32) - 1.0
  return -jnp.ones((b, b), jnp.float32)


def _dloss_dlogits(family, l_bxb, row_lse_b, col_lse_b, on_diagonal: bool, inv_B):
  """d loss / d logits of one block (the loss is a sum over blocks, each scaled by 1/B)."""
  b = l_bxb.shape[0]
  if family == "sigmoid":
    z_bxb = _siglip_labels(b, on_diagonal)
    return -inv_B * z_bxb * jax.nn.sigmoid(-z_bxb * l_bxb)
  leave_out = family == "softmax_leave_out"
  lm_bxb = _mask_diag(l_bxb, on_diagonal, leave_out)
  g_bxb = jnp.exp(lm_bxb - row_lse_b[:, None]) + jnp.exp(lm_bxb - col_lse_b[None, :])
  if on_diagonal:
    g_bxb = g_bxb - 2.0 * jnp.eye(b, dtype=jnp.float32)
  return 0.5 * inv_B * g_bxb


# --------------------------------------------------------------------------------------------
# Ring passes (run per device inside shard_map).


def _ring_perm(n: int):
  """Device j sends to j-1: after s exchanges device k holds the chunk of device k+s."""
  return [(j, (j - 1) % n) for j in range(n)]


def _forward_ring(family, axes, n, zi_bxE, zt_bxE, scale, bias):
  """Per-device partial loss sum and the (row, column) log-sum-exps of the local shards."""
  perm = _ring_perm(n)
  shift = lambda x: jax.lax.ppermute(x, axes, perm)
  b = zi_bxE.shape[0]

  if family == "sigmoid":
    def block(zt_c, on_diagonal):
      _, l_bxb = _block_logits(zi_bxE, zt_c, scale, bias)
      return jnp.sum(jax.nn.log_sigmoid(_siglip_labels(b, on_diagonal) * l_bxb))

    acc = block(zt_bxE, True)

    def body(_, carry):
      zt_c, acc = carry
      zt_c = shift(zt_c)
      return zt_c, acc + block(zt_c, False)

    _, acc = jax.lax.fori_loop(1, n, body, (zt_bxE, acc))
    zero_b = jnp.zeros((b,), jnp.float32)
    return -acc, zero_b, zero_b

  leave_out = family == "softmax_leave_out"

  def block(zt_c, row_lse, col_lse, on_diagonal):
    _, l_bxb = _block_logits(zi_bxE, zt_c, scale, None)
    l_bxb = _mask_diag(l_bxb, on_diagonal, leave_out)
    row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(l_bxb, axis=1))
    col_lse = jnp.logaddexp(col_lse, jax.nn.logsumexp(l_bxb, axis=0))
    return row_lse, col_lse

  neg_inf_b = jnp.full((b,), -jnp.inf, jnp.float32)
  row_lse, col_lse = block(zt_bxE, neg_inf_b, neg_inf_b, True)

  def body(_, carry):
    zt_c, row_lse, col_lse = carry
    zt_c, col_lse = shift(zt_c), shift(col_lse)
    row_lse, col_lse = block(zt_c, row_lse, col_lse, False)
    return zt_c, row_lse, col_lse

  _, row_lse, col_lse = jax.lax.fori_loop(1, n, body, (zt_bxE, row_lse, col_lse))
  if n > 1:
    col_lse = shift(col_lse)  # the last step's column sums go home
  diag_b = scale * jnp.einsum("ie,ie->i", zi_bxE, zt_bxE)
  partial = 0.5 * (jnp.sum(row_lse - diag_b) + jnp.sum(col_lse - diag_b))
  return partial, row_lse, col_lse


def _backward_ring(family, axes, n, inv_B, g, zi_bxE, zt_bxE, scale, bias, row_lse, col_lse):
  """Per-device d(images), d(texts) of the local shards and partial d(scale), d(bias)."""
  perm = _ring_perm(n)
  shift = lambda x: jax.lax.ppermute(x, axes, perm)

  def block(zt_c, col_c, dzi, dzt_c, dscale, dbias, on_diagonal):
    u_bxb, l_bxb = _block_logits(zi_bxE, zt_c, scale, bias)
    d_bxb = g * _dloss_dlogits(family, l_bxb, row_lse, col_c, on_diagonal, inv_B)
    dzi = dzi + scale * jnp.einsum("ij,je->ie", d_bxb, zt_c)
    dzt_c = dzt_c + scale * jnp.einsum("ij,ie->je", d_bxb, zi_bxE)
    return dzi, dzt_c, dscale + jnp.sum(d_bxb * u_bxb), dbias + jnp.sum(d_bxb)

  zero = jnp.zeros((), jnp.float32)
  dzi, dzt, dscale, dbias = block(zt_bxE, col_lse, jnp.zeros_like(zi_bxE),
                                  jnp.zeros_like(zt_bxE), zero, zero, True)

  def body(_, carry):
    zt_c, col_c, dzt_c, dzi, dscale, dbias = carry
    zt_c, col_c, dzt_c = shift(zt_c), shift(col_c), shift(dzt_c)
    dzi, dzt_c, dscale, dbias = block(zt_c, col_c, dzi, dzt_c, dscale, dbias, False)
    return zt_c, col_c, dzt_c, dzi, dscale, dbias

  _, _, dzt, dzi, dscale, dbias = jax.lax.fori_loop(
      1, n, body, (zt_bxE, col_lse, dzt, dzi, dscale, dbias))
  if n > 1:
    dzt = shift(dzt)  # each text chunk's gradient goes home
  return dzi, dzt, dscale, dbias


# --------------------------------------------------------------------------------------------
# Global functions (custom_vjp over two shard_maps).


def _ring_loss_fn(family: str, mesh: Mesh, axes: tuple[str, ...]):
  """f(zi_BxE, zt_BxE, scale, bias) -> scalar loss, with a ring backward pass."""
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  batch_spec = P(axes)
  emb_spec = P(axes, None)
  smap = functools.partial(jax.shard_map, mesh=mesh)

  def fwd_local(zi, zt, scale, bias):
    partial, row_lse, col_lse = _forward_ring(family, axes, n, zi, zt, scale,
                                              bias if family == "sigmoid" else None)
    return jax.lax.psum(partial, axes), row_lse, col_lse

  fwd_global = smap(fwd_local, in_specs=(emb_spec, emb_spec, P(), P()),
                    out_specs=(P(), batch_spec, batch_spec))

  def bwd_local(inv_B, g, zi, zt, scale, bias, row_lse, col_lse):
    dzi, dzt, dscale, dbias = _backward_ring(family, axes, n, inv_B, g, zi, zt, scale,
                                             bias if family == "sigmoid" else None,
                                             row_lse, col_lse)
    dbias = jax.lax.psum(dbias, axes) if family == "sigmoid" else jnp.zeros((), jnp.float32)
    return dzi, dzt, jax.lax.psum(dscale, axes), dbias

  @jax.custom_vjp
  def f(zi_BxE, zt_BxE, scale, bias):
    total, _, _ = fwd_global(zi_BxE, zt_BxE, scale, bias)
    return total / zi_BxE.shape[0]

  def f_fwd(zi_BxE, zt_BxE, scale, bias):
    total, row_lse, col_lse = fwd_global(zi_BxE, zt_BxE, scale, bias)
    return total / zi_BxE.shape[0], (zi_BxE, zt_BxE, scale, bias, row_lse, col_lse)

  def f_bwd(res, g):
    zi_BxE, zt_BxE, scale, bias, row_lse, col_lse = res
    inv_B = 1.0 / zi_BxE.shape[0]
    bwd_global = smap(functools.partial(bwd_local, inv_B),
                      in_specs=(P(), emb_spec, emb_spec, P(), P(), batch_spec, batch_spec),
                      out_specs=(emb_spec, emb_spec, P(), P()))
    return bwd_global(g.astype(jnp.float32), zi_BxE, zt_BxE, scale, bias, row_lse, col_lse)

  f.defvjp(f_fwd, f_bwd)
  return f


def _resolve_axes(mesh: Mesh, axes) -> tuple[str, ...]:
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  unknown = [a for a in axes if a not in mesh.shape]
  if not axes or unknown:
    raise ValueError(f"sharded loss axes {axes} must be a non-empty subset of the mesh axes "
                     f"{tuple(mesh.axis_names)}")
  return axes


def ring_loss(family: str, zi_BxE, zt_BxE, logit_scale, logit_bias: Optional[jax.Array],
              mesh: Mesh, max_scale: float = 100.0, axes: Sequence[str] | str = BATCH_AXES):
  """A contrastive loss of a global batch sharded over `axes`, by ring family:

    softmax             InfoNCE in both directions (clip)
    softmax_leave_out   the same with the positive left out of the denominators (infoloob)
    sigmoid             pairwise sigmoid with a bias (siglip)

  zi_BxE, zt_BxE: L2-normalised image and text embeddings of the global batch (under jit they
  may carry any sharding; they are laid out with the batch over `axes`). logits =
  min(exp(logit_scale), max_scale) * zi zt^T (+ logit_bias for sigmoid). Returns the same
  scalar as the plain loss of `qtx.losses` on the whole batch, and the same gradients.
  Use `qtx.losses.compute(name, ..., mesh=mesh)`, which picks the family of a loss by name.
  """
  if family not in FAMILIES:
    raise ValueError(f"unknown ring loss family {family!r}; choose one of {FAMILIES}")
  if family == "sigmoid" and logit_bias is None:
    raise ValueError("the sigmoid (siglip) loss needs the model's logit_bias")
  axes = _resolve_axes(mesh, axes)
  B = zi_BxE.shape[0]
  if zi_BxE.shape != zt_BxE.shape or zi_BxE.ndim != 2:
    raise ValueError(f"image and text embeddings must both be B x E, got {zi_BxE.shape} and "
                     f"{zt_BxE.shape}")
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  if B % n:
    raise ValueError(f"global batch {B} is not divisible by the {n} devices of mesh axes {axes}")
  scale = jnp.minimum(jnp.exp(jnp.asarray(logit_scale, jnp.float32)), max_scale)
  # the softmax families have no bias: a constant keeps d(loss)/d(logit_bias) exactly zero.
  bias = (jnp.asarray(logit_bias, jnp.float32) if family == "sigmoid"
          else jnp.zeros((), jnp.float32))
  f = _ring_loss_fn(family, mesh, axes)
  return f(zi_BxE.astype(jnp.float32), zt_BxE.astype(jnp.float32), scale.reshape(()),
           bias.reshape(()))
