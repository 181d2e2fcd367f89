"""Two-pass attention kernel (interpret mode on CPU) against the materialising reference.

Tolerances: float32 outputs and gradients (dq, dk, dv, dgamma) within 2e-5 absolute of the
reference (O(1) values, float32 accumulation in a different order); bfloat16 outputs within 3e-2
and gradients within 6e-2 absolute (the P.V and gradient products take bf16 operands).
Each configuration compiles once: a jitted function returns kernel and reference values and
gradients together.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx import kernels
from qtx.kernels import attention as attention_lib
from qtx.kernels import reference


def _qkv(B, T, S, H, K, seed=0, dtype=jnp.float32, scale=1.0):
  kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = (scale * jax.random.normal(kq, (B, T, H, K))).astype(dtype)
  k = (scale * jax.random.normal(kk, (B, S, H, K))).astype(dtype)
  v = jax.random.normal(kv, (B, S, H, K)).astype(dtype)
  w = jax.random.normal(kw, (B, T, H, K))
  return q, k, v, w


def _lengths_mask(lengths, S):
  return jnp.arange(S)[None, :] < jnp.asarray(lengths)[:, None]


@functools.partial(jax.jit, static_argnames=("causal", "with_gamma", "zeta", "fn"))
def _grads(q, k, v, w, key_mask, gamma, causal=False, with_gamma=False, zeta=1.0,
           fn=kernels.two_pass_attention):
  """(out, (dq, dk, dv, dgamma)) of sum(w * attention(q, k, v))."""

  def loss(q, k, v, gamma):
    out = fn(q, k, v, causal=causal, key_mask_BxS=key_mask,
             gamma=gamma if with_gamma else None, zeta=zeta)
    return jnp.sum(out.astype(jnp.float32) * w), out

  grads, out = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, gamma)
  return out, grads


def _check(q, k, v, w, key_mask=None, gamma=0.0, causal=False, with_gamma=False, zeta=1.0,
           atol=2e-5):
  gamma = jnp.asarray(gamma, jnp.float32)
  kw = dict(causal=causal, with_gamma=with_gamma, zeta=zeta)
  out, grads = _grads(q, k, v, w, key_mask, gamma, **kw)
  out_r, grads_r = _grads(q, k, v, w, key_mask, gamma, fn=reference.attention_ref, **kw)
  chex.assert_equal_shape((out, q))
  assert out.dtype == q.dtype
  chex.assert_tree_all_finite((out, grads))
  f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
  chex.assert_trees_all_close(f32(out), f32(out_r), atol=atol)
  chex.assert_trees_all_close(f32(grads), f32(grads_r), atol=3 * atol)
  return out, grads


def _clip_fraction(q, k, key_mask, gamma, causal):
  """Fraction of attended weights the clip sets to exactly 0 (to check a test exercises it)."""
  T, S = q.shape[1], k.shape[1]
  s = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
  where = reference.attention_mask(T, S, causal, key_mask)
  where = jnp.ones(s.shape, bool) if where is None else jnp.broadcast_to(where, s.shape)
  a = reference.softmax_ref(s, where=where, gamma=gamma)
  return float(jnp.sum((a == 0) & where) / jnp.sum(where))


def test_single_token():
  q, k, v, w = _qkv(2, 1, 1, 2, 8, seed=1)
  out, _ = _check(q, k, v, w)
  chex.assert_trees_all_close(out, v, atol=1e-6)  # one key: the output is its value


def test_t7_causal_clipped():
  q, k, v, w = _qkv(2, 7, 7, 3, 8, seed=2, scale=2.0)
  _check(q, k, v, w, gamma=-0.1, causal=True, with_gamma=True)
  assert _clip_fraction(q, k, None, -0.1, True) > 0.1


@pytest.mark.parametrize("clipped", [False, True])
def test_t77_text_tower_causal_with_padding(clipped):
  # CLIP text: T = 77, causal, padding after each caption's end; one batch element fully padded.
  q, k, v, w = _qkv(3, 77, 77, 2, 16, seed=3, scale=1.5)
  key_mask = _lengths_mask([77, 20, 0], 77)
  out, (dq, dk, dv, _) = _check(q, k, v, w, key_mask=key_mask, gamma=-1.0 / 77, causal=True,
                                with_gamma=clipped)
  for a in (out[2], dq[2], dk[2], dv[2]):  # no valid key: zeros, no gradient
    np.testing.assert_array_equal(np.asarray(a), 0.0)
  np.testing.assert_array_equal(np.asarray(dk[1, 20:]), 0.0)  # padded keys get no gradient
  if clipped:
    assert _clip_fraction(q, k, key_mask, -1.0 / 77, True) > 0.1


def test_t197_vit_clipped_exact_zeros():
  # ViT: T = 197, no mask, gamma = -0.003 as in the paper's ViT-S/16 run (scaled up to bite).
  q, k, v, w = _qkv(1, 197, 197, 2, 16, seed=4, scale=1.5)
  gamma = -0.01
  assert _clip_fraction(q, k, None, gamma, False) > 0.3
  _check(q, k, v, w, gamma=gamma, with_gamma=True)
  # The output is exactly the clipped weights times V, with the clipped entries exactly 0.
  v_onehot = jax.nn.one_hot(jnp.arange(197) % 16, 16)[None, :, None, :].repeat(2, 2)
  out = jax.jit(lambda q, k, v: kernels.two_pass_attention(q, k, v, gamma=gamma))(q, k, v_onehot)
  out_r = reference.attention_ref(q, k, v_onehot, gamma=gamma)
  chex.assert_trees_all_close(out, out_r, atol=2e-6)


def test_matches_jax_nn_dot_product_attention():
  q, k, v, _ = _qkv(2, 33, 33, 4, 16, seed=5)
  for causal in (False, True):
    out = jax.jit(functools.partial(kernels.two_pass_attention, causal=causal))(q, k, v)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    chex.assert_trees_all_close(out, want, atol=1e-5)


def test_cross_attention_odd_head_dim():
  # T != S, K not a power of two (the head dimension is padded inside the kernel), zeta > 1.
  q, k, v, w = _qkv(2, 19, 45, 2, 24, seed=6, scale=2.0)
  _check(q, k, v, w, key_mask=_lengths_mask([45, 31], 45), gamma=-0.05, zeta=1.05,
         with_gamma=True)


def test_bfloat16():
  q, k, v, w = _qkv(2, 40, 40, 2, 16, seed=7, dtype=jnp.bfloat16)
  out, grads = _check(q, k, v, w, gamma=-0.02, causal=True, with_gamma=True, atol=2e-2)
  assert all(g.dtype == jnp.bfloat16 for g in grads[:3])


def test_gamma_traced_under_jit_and_per_row():
  q, k, v, w = _qkv(2, 20, 20, 2, 8, seed=8, scale=2.0)
  f = jax.jit(jax.grad(lambda q, g: jnp.sum(w * kernels.two_pass_attention(
      q, k, v, causal=True, gamma=g)), argnums=(0, 1)))
  f_ref = jax.jit(jax.grad(lambda q, g: jnp.sum(w * reference.attention_ref(
      q, k, v, causal=True, gamma=g)), argnums=(0, 1)))
  for g in (0.0, -0.03, -0.08):  # a gamma ramp: one compilation
    chex.assert_trees_all_close(f(q, jnp.float32(g)), f_ref(q, jnp.float32(g)), atol=5e-5)
  # gamma = -alpha / (keys each causal row sees), one value per query row.
  g_rows = (-1.0 / jnp.arange(1, 21, dtype=jnp.float32))[None, None, :, None]
  got, want = f(q, g_rows), f_ref(q, g_rows)
  chex.assert_shape(got[1], (1, 1, 20, 1))
  chex.assert_trees_all_close(got, want, atol=5e-5)


def _plan_matches_reference(plan, q, k, v, w, key_mask, gamma):
  """Loss and gradients (q, k, v, gamma) of the kernel with `plan` equal the reference's,
  causal with a key mask."""
  T, K = q.shape[1], q.shape[3]
  st = attention_lib._Static(plan, T, T, K, True, 1 / np.sqrt(K), 1.0)
  km = key_mask.astype(jnp.int32)[:, None, :]

  def f(q, k, v, gamma):
    return jnp.sum(w * attention_lib._attention(q, k, v, km, gamma, None, st))

  def f_ref(q, k, v, gamma):
    return jnp.sum(w * reference.attention_ref(q, k, v, causal=True, key_mask_BxS=key_mask,
                                               gamma=gamma))

  got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(q, k, v, gamma)
  want = jax.jit(jax.value_and_grad(f_ref, argnums=(0, 1, 2, 3)))(q, k, v, gamma)
  chex.assert_trees_all_close(got, want, atol=6e-5)


def test_mosaic_layout_in_interpret_mode():
  """The TPU code path (B x H x T x K, padded blocks, static loops) computes the same."""
  B, T, H, K = 2, 45, 2, 16
  q, k, v, w = _qkv(B, T, T, H, K, seed=9, scale=2.0)
  key_mask = _lengths_mask([45, 30], T)
  plan = attention_lib.make_plan(T, T, K, True, platform="tpu", block_q=16, block_k=32)
  assert not plan.masked
  gamma = jnp.full((B, H, T, 1), -0.05, jnp.float32)
  _plan_matches_reference(plan, q, k, v, w, key_mask, gamma)


def test_errors_name_the_bad_value():
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="gamma <= 0, got gamma=0.1"):
    kernels.two_pass_attention(q, q, q, gamma=0.1)
  with pytest.raises(ValueError, match=r"key_mask_BxS must have shape \(1, 4\)"):
    kernels.two_pass_attention(q, q, q, key_mask_BxS=jnp.ones((1, 5), bool))
  with pytest.raises(ValueError, match="B x T x H x K"):
    kernels.two_pass_attention(q[0], q[0], q[0])
  with pytest.raises(ValueError, match="power of two >= 16, got 8"):
    kernels.two_pass_attention(q, q, q, block_q=8)
  with pytest.raises(ValueError, match="share a dtype"):
    kernels.two_pass_attention(q, q, q.astype(jnp.bfloat16))


def test_gpu_block_plan_in_interpret_mode():
  """The Triton layout (64 x 64 blocks at T = 250, where the CPU plan takes 32; head block
  padded to 16) computes the reference attention and its gradients, causal with a key mask and
  a per-row gamma."""
  B, T, H, K = 2, 250, 1, 12
  q, k, v, w = _qkv(B, T, T, H, K, seed=12, scale=2.0)
  key_mask = _lengths_mask([250, 170], T)
  plan = attention_lib.make_plan(T, T, K, True, platform="gpu")
  assert plan.platform == "gpu" and plan.masked and plan.head_block == 16
  assert (plan.block_q, plan.block_k) == (64, 64)
  assert attention_lib.make_plan(T, T, K, True).block_q == 32
  gamma = jnp.broadcast_to((-1.0 / jnp.arange(1, T + 1, dtype=jnp.float32))[None, None, :, None],
                           (B, H, T, 1))
  _plan_matches_reference(plan, q, k, v, w, key_mask, gamma)
