"""The two-pass attention kernel in softplus mode (interpret mode) against the XLA path:
L2-normalised q, k, scores scaled by log(d) log(N_i), qtx.nn.normalizers.plain_softplus_reweight
(the forward that softplus_reweight's written-out VJP is tested against, differentiated by JAX
autodiff), einsum with the values. Outputs and q, k, v gradients for p = 1, 3, 15, causal text
with padding and a fully padded sequence, ViT length, single-key rows, the TPU layout and the
GPU block plan."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx import kernels
from qtx.kernels import attention as attention_lib
from qtx.kernels import reference
from qtx.nn.normalizers import plain_softplus_reweight


def _qkv(B, T, H, K, seed=0):
  kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
  nrm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q, k = (nrm(jax.random.normal(x, (B, T, H, K))) for x in (kq, kk))
  return q, k, jax.random.normal(kv, (B, T, H, K)), jax.random.normal(kw, (B, T, H, K))


def xla_softplus_attention(q, k, v, p, causal, key_mask, eps=1e-6):
  B, T, H, K = q.shape
  where = jnp.broadcast_to(reference.attention_mask(T, T, causal, key_mask), (B, H, T, T)) \
      if (causal or key_mask is not None) else jnp.ones((B, H, T, T), bool)
  n = jnp.sum(where, -1, keepdims=True).astype(jnp.float32)
  s = jnp.einsum("bthk,bshk->bhts", q, k) * math.log(K) * jnp.log(jnp.maximum(n, 2.0))
  return jnp.einsum("bhts,bshk->bthk", plain_softplus_reweight(s, where, p, eps), v)


def _check(q, k, v, w, p, causal=False, key_mask=None, fn=None):
  fn = fn or (lambda q, k, v: kernels.two_pass_attention(
      q, k, v, causal=causal, key_mask_BxS=key_mask, softplus_p=p))
  loss = lambda f: jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v) * w),
                                              argnums=(0, 1, 2)))
  got = loss(fn)(q, k, v)
  want = loss(lambda q, k, v: xla_softplus_attention(q, k, v, p, causal, key_mask))(q, k, v)
  chex.assert_tree_all_finite(got)
  # Gradients reach |dq| ~ 100 (the log(d) log(N) scale), and dR = p y / R (g - D) amplifies
  # float32 round-off by p / R where R is small: compared at 2e-6 of the largest gradient
  # (the kernels take D = dO . O from the forward's output, the XLA path sums y g).
  np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6 * float(jnp.max(jnp.abs(b))))
  out = fn(q, k, v)
  chex.assert_trees_all_close(out, xla_softplus_attention(q, k, v, p, causal, key_mask),
                              atol=2e-5)
  return out, got[1]


@pytest.mark.parametrize("p", [1.0, 15.0])
def test_t77_causal_text_with_padding(p):
  q, k, v, w = _qkv(3, 77, 2, 16, seed=1)
  key_mask = jnp.arange(77)[None, :] < jnp.array([77, 20, 0])[:, None]
  out, (dq, dk, dv) = _check(q, k, v, w, p, causal=True, key_mask=key_mask)
  for a in (out[2], dq[2], dk[2], dv[2]):  # no visible key: zeros, no gradient
    np.testing.assert_array_equal(np.asarray(a), 0.0)
  np.testing.assert_array_equal(np.asarray(dk[1, 20:]), 0.0)
  # the first causal row sees one key: O = 0 keeps it (its weight is 1, its output v_0)
  np.testing.assert_allclose(out[0, 0], v[0, 0], rtol=1e-5, atol=1e-6)


def test_t197_vit_p15():
  q, k, v, w = _qkv(1, 197, 2, 16, seed=2)
  _check(q, k, v, w, 15.0)


def test_tpu_layout_and_gpu_plan_in_interpret_mode():
  B, T, H, K = 2, 45, 2, 16
  q, k, v, w = _qkv(B, T, H, K, seed=3)
  key_mask = jnp.arange(T)[None, :] < jnp.array([45, 30])[:, None]
  km = key_mask.astype(jnp.int32)[:, None, :]
  n = jnp.minimum(jnp.arange(1.0, T + 1)[None, None, :, None],
                  jnp.sum(key_mask, -1).astype(jnp.float32)[:, None, None, None])
  n = jnp.broadcast_to(n, (B, H, T, 1))
  rs = math.log(K) * jnp.log(jnp.maximum(n, 2.0))
  for plan in (attention_lib.make_plan(T, T, K, True, platform="tpu", block_q=16, block_k=32),
               attention_lib.make_plan(T, T, K, True, platform="gpu")):
    st = attention_lib._Static(plan, T, T, K, True, 1.0, 1.0, softplus_p=3.0)
    fn = lambda q, k, v, st=st: attention_lib._softplus_attention(q, k, v, km, rs, n, st)
    _check(q, k, v, w, 3.0, causal=True, key_mask=key_mask, fn=fn)


def test_softplus_errors_name_the_problem():
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="not several"):
    kernels.two_pass_attention(q, q, q, sink=0.0, softplus_p=1.0)
  with pytest.raises(ValueError, match="softplus_p must be > 0"):
    kernels.two_pass_attention(q, q, q, softplus_p=0.0)
  with pytest.raises(ValueError, match="scale of shape"):
    kernels.two_pass_attention(q, q, q, softplus_p=1.0, scale=jnp.ones((3,)))
