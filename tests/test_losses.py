"""Contrastive losses against straightforward numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx import losses


def _emb(seed, B=6, E=8):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(2, B, E))
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  return z[0], z[1]


def _np_logsumexp(a, axis):
  m = a.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def np_clip(zi, zt, t):
  l = np.exp(t) * zi @ zt.T
  B = len(l)
  i2t = -np.mean([l[i, i] - _np_logsumexp(l[i], 0) for i in range(B)])
  t2i = -np.mean([l[i, i] - _np_logsumexp(l[:, i], 0) for i in range(B)])
  return (i2t + t2i) / 2


def np_siglip(zi, zt, t, b):
  l = np.exp(t) * zi @ zt.T + b
  B = len(l)
  total = 0.0
  for i in range(B):
    for j in range(B):
      y = 1.0 if i == j else -1.0
      total += np.log(1 / (1 + np.exp(-y * l[i, j])))
  return -total / B


def np_infoloob(zi, zt, t):
  l = np.exp(t) * zi @ zt.T
  B = len(l)
  a = b = 0.0
  for i in range(B):
    others = [j for j in range(B) if j != i]
    a += -(l[i, i] - _np_logsumexp(l[i, others], 0))
    b += -(l[i, i] - _np_logsumexp(l[others, i], 0))
  return (a + b) / (2 * B)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("t", [0.0, np.log(1 / 0.07)])
def test_clip_loss(seed, t):
  zi, zt = _emb(seed)
  got = losses.clip_loss(jnp.asarray(zi), jnp.asarray(zt), jnp.asarray(t))
  np.testing.assert_allclose(got, np_clip(zi, zt, t), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_siglip_loss(seed):
  zi, zt = _emb(seed)
  t, b = np.log(10.0), -10.0
  got = losses.siglip_loss(jnp.asarray(zi), jnp.asarray(zt), jnp.asarray(t), jnp.asarray(b))
  np.testing.assert_allclose(got, np_siglip(zi, zt, t, b), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_infoloob_loss(seed):
  zi, zt = _emb(seed)
  t = 1.5
  got = losses.infoloob_loss(jnp.asarray(zi), jnp.asarray(zt), jnp.asarray(t))
  np.testing.assert_allclose(got, np_infoloob(zi, zt, t), rtol=1e-5)


def test_logit_scale_clamped_at_100():
  zi, zt = _emb(3)
  big = losses.clip_loss(jnp.asarray(zi), jnp.asarray(zt), jnp.asarray(10.0))
  np.testing.assert_allclose(big, np_clip(zi, zt, np.log(100.0)), rtol=1e-5)
  g = jax.grad(lambda t: losses.clip_loss(jnp.asarray(zi), jnp.asarray(zt), t))(10.0)
  assert float(g) == 0.0


def test_perfect_alignment_gives_low_clip_loss():
  zi, _ = _emb(4, B=8, E=16)
  hi = losses.clip_loss(jnp.asarray(zi), jnp.asarray(zi), jnp.asarray(np.log(100.0)))
  zi2, zt2 = _emb(5, B=8, E=16)
  lo = losses.clip_loss(jnp.asarray(zi2), jnp.asarray(zt2), jnp.asarray(np.log(100.0)))
  assert float(hi) < 0.1 < float(lo)


def test_compute_dispatch_and_errors():
  zi, zt = map(jnp.asarray, _emb(6))
  t = jnp.asarray(2.0)
  np.testing.assert_allclose(losses.compute("clip", zi, zt, t), losses.clip_loss(zi, zt, t))
  with pytest.raises(ValueError, match=r"unknown loss 'clipp'; choose one of"):
    losses.compute("clipp", zi, zt, t)
  with pytest.raises(ValueError, match="logit_bias"):
    losses.compute("siglip", zi, zt, t)
  with pytest.raises(ValueError, match="at least 2"):
    losses.infoloob_loss(zi[:1], zt[:1], t)


def test_clip_loss_with_the_pallas_logsumexp_equals_numpy_and_xla():
  """loss.impl='pallas' (row log-sum-exp by the two-pass kernel, interpret mode on CPU): the
  value equals the numpy reference and the gradients equal the XLA loss's."""
  zi, zt = _emb(3, B=12, E=8)
  t = np.log(20.0)
  f = {impl: jax.jit(jax.value_and_grad(
      lambda a, b, s, impl=impl: losses.clip_loss(a, b, s, impl=impl), argnums=(0, 1, 2)))
       for impl in ("xla", "pallas")}
  (v_p, g_p), (v_x, g_x) = (f[k](jnp.float32(zi), jnp.float32(zt), jnp.float32(t))
                            for k in ("pallas", "xla"))
  np.testing.assert_allclose(v_p, np_clip(zi, zt, t), rtol=1e-5)
  for a, b in zip(g_p, g_x):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(g_x[0]).max()) > 1e-3
