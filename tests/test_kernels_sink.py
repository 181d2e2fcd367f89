"""The two-pass attention kernel with a sink logit (interpret mode) against the XLA path:
einsum scores, qtx.nn.normalizers.softmax_with_sink (checked against its formula in
test_softmax_sink.py), einsum with the values. Outputs and the gradients of q, k, v and the
sink, on the clipped kernel's adversarial cases: ViT length, causal text with padding and a
fully padded sequence, per-head and per-row sinks, -inf sinks, huge scores and sinks, the TPU
layout, the GPU block plan."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx import kernels
from qtx.kernels import attention as attention_lib
from qtx.kernels import reference
from qtx.nn.normalizers import softmax_with_sink


def _qkv(B, T, H, K, seed=0, scale=1.0):
  kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
  q, k = (scale * jax.random.normal(x, (B, T, H, K)) for x in (kq, kk))
  return q, k, jax.random.normal(kv, (B, T, H, K)), jax.random.normal(kw, (B, T, H, K))


def xla_sink_attention(q, k, v, sink, causal=False, key_mask=None):
  T, K = q.shape[1], q.shape[3]
  s = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(K)
  where = reference.attention_mask(T, T, causal, key_mask)
  p = softmax_with_sink(s, jnp.broadcast_to(sink, s.shape[:3] + (1,)), where=where)
  return jnp.einsum("bhts,bshk->bthk", p, v)


@functools.partial(jax.jit, static_argnames=("causal", "fn"))
def _grads(q, k, v, w, sink, key_mask, causal, fn):
  def loss(q, k, v, sink):
    out = fn(q, k, v, sink, causal, key_mask)
    return jnp.sum(out * w), out
  return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, sink)


def _kernel(q, k, v, sink, causal, key_mask):
  return kernels.two_pass_attention(q, k, v, causal=causal, key_mask_BxS=key_mask, sink=sink)


def _check(q, k, v, w, sink, key_mask=None, causal=False, atol=2e-5, rtol=1e-4):
  sink = jnp.asarray(sink, jnp.float32)
  grads, out = _grads(q, k, v, w, sink, key_mask, causal, _kernel)
  grads_r, out_r = _grads(q, k, v, w, sink, key_mask, causal, xla_sink_attention)
  chex.assert_tree_all_finite((out, grads))
  chex.assert_trees_all_close(out, out_r, atol=atol, rtol=rtol)
  chex.assert_trees_all_close(grads, grads_r, atol=3 * atol, rtol=rtol)
  return out, grads


def test_t197_vit_per_head_sinks():
  q, k, v, w = _qkv(2, 197, 3, 16, seed=1, scale=1.5)
  _, (_, _, _, dsink) = _check(q, k, v, w, jnp.array([-1.0, 0.0, 2.5])[:, None, None])
  assert dsink.shape == (3, 1, 1) and np.all(np.asarray(dsink) != 0)


def test_t77_causal_text_with_padding_and_an_empty_sequence():
  q, k, v, w = _qkv(3, 77, 2, 16, seed=2, scale=1.5)
  key_mask = jnp.arange(77)[None, :] < jnp.array([77, 20, 0])[:, None]
  out, (dq, dk, dv, _) = _check(q, k, v, w, jnp.array([0.3, -0.7])[:, None, None], key_mask,
                                causal=True)
  for a in (out[2], dq[2], dk[2], dv[2]):  # no visible key: all mass on the sink, zeros
    np.testing.assert_array_equal(np.asarray(a), 0.0)
  np.testing.assert_array_equal(np.asarray(dk[1, 20:]), 0.0)


def test_per_row_sinks_and_minus_infinity_is_softmax():
  q, k, v, w = _qkv(2, 33, 2, 8, seed=3, scale=2.0)
  rows = jnp.linspace(-3.0, 3.0, 2 * 2 * 33).reshape(2, 2, 33, 1)
  _check(q, k, v, w, rows, causal=True)
  # sink = -inf: exactly the softmax kernel's attention
  neg = jnp.full((2, 1, 1), -jnp.inf)
  got = kernels.two_pass_attention(q, k, v, causal=True, sink=neg)
  want = kernels.two_pass_attention(q, k, v, causal=True)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  g = jax.grad(lambda s: jnp.sum(kernels.two_pass_attention(q, k, v, sink=s) * w))(neg)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_huge_scores_and_sinks_stay_exact():
  """|s| up to ~1e4 and sinks of +-1e4: no overflow, no NaN; outputs and the v and sink
  gradients equal the XLA path to the round-off of float32 scores of that size. dq and dk
  cancel nearly one-hot weights (dS = P (dA - D)) and the kernels recompute P, which at
  |s| ~ 1e4 is reproducible only to one ulp of the score, so they are compared to that bound:
  ulp(|s| log2 e) ln 2 |dA| |k or q| scale, summed over the keys (FlashAttention's recompute
  has the same property; the XLA path materialises P once)."""
  q, k, v, w = _qkv(1, 24, 3, 8, seed=4, scale=60.0)
  s = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(8)
  s_max = float(jnp.max(jnp.abs(s)))
  assert s_max > 5e3
  sink = jnp.array([1e4, -1e4, 30.0])[:, None, None]
  (dq, dk, dv, db), out = _grads(q, k, v, w, sink, None, False, _kernel)
  (dq_r, dk_r, dv_r, db_r), out_r = _grads(q, k, v, w, sink, None, False, xla_sink_attention)
  chex.assert_tree_all_finite((out, dq, dk, dv, db))
  chex.assert_trees_all_close(out, out_r, atol=1e-4, rtol=2e-3)
  chex.assert_trees_all_close((dv, db), (dv_r, db_r), atol=1e-3, rtol=2e-3)
  ulp = float(np.spacing(np.float32(s_max * np.log2(np.e))))
  da = float(jnp.max(jnp.abs(v)) * jnp.max(jnp.abs(w))) * 8
  for g, g_r, x in ((dq, dq_r, k), (dk, dk_r, q)):
    bound = 24 * ulp * np.log(2) * da * float(jnp.max(jnp.abs(x))) * 8 / np.sqrt(8)
    assert float(jnp.max(jnp.abs(g - g_r))) <= bound, (float(jnp.max(jnp.abs(g - g_r))), bound)


def test_tpu_layout_and_gpu_plan_in_interpret_mode():
  B, T, H, K = 2, 45, 2, 16
  q, k, v, w = _qkv(B, T, H, K, seed=5, scale=2.0)
  key_mask = jnp.arange(T)[None, :] < jnp.array([45, 30])[:, None]
  km = key_mask.astype(jnp.int32)[:, None, :]
  sink = jnp.broadcast_to(jnp.array([0.5, -0.5])[None, :, None, None], (B, H, T, 1))
  for plan in (attention_lib.make_plan(T, T, K, True, platform="tpu", block_q=16, block_k=32),
               attention_lib.make_plan(T, T, K, True, platform="gpu")):
    st = attention_lib._Static(plan, T, T, K, True, 1 / np.sqrt(K), 1.0)
    f = lambda q, k, v, b: jnp.sum(w * attention_lib._attention(q, k, v, km, None, b, st))
    f_ref = lambda q, k, v, b: jnp.sum(w * xla_sink_attention(q, k, v, b, True, key_mask))
    got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(q, k, v, sink)
    want = jax.jit(jax.value_and_grad(f_ref, argnums=(0, 1, 2, 3)))(q, k, v, sink)
    chex.assert_trees_all_close(got, want, atol=6e-5)


def test_sink_errors_name_the_problem():
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="not several"):
    kernels.two_pass_attention(q, q, q, gamma=-0.1, sink=0.0)
  with pytest.raises(ValueError, match=r"per head it is \(H, 1, 1\)"):
    kernels.two_pass_attention(q, q, q, sink=jnp.zeros((2,)))
