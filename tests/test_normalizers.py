"""Attention normalizers: exact properties of softmax, clipped softmax and softplus attention."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx.nn import normalizers as N


def _np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


class SoftmaxTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_rows_sum_to_one_and_match_numpy(self):
    x = jax.random.normal(jax.random.key(0), (3, 5, 17)) * 4
    y = self.variant(N.softmax)(x)
    np.testing.assert_allclose(np.sum(y, -1), 1.0, atol=1e-6)
    np.testing.assert_allclose(y, _np_softmax(np.asarray(x)), rtol=1e-5, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mask_exact_zeros_and_fully_masked_row(self):
    x = jax.random.normal(jax.random.key(1), (2, 4, 6))
    where = jnp.array([[True, False, True, True, False, True]] * 3 + [[False] * 6])
    y = self.variant(lambda x: N.softmax(x, where=where))(x)
    assert np.all(np.asarray(y)[:, ~np.asarray(where)] == 0.0)
    np.testing.assert_allclose(np.sum(y[:, :3], -1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(y[:, 3], 0.0)
    g = jax.grad(lambda x: jnp.sum(N.softmax(x, where=where) ** 2))(x)
    assert np.all(np.isfinite(g))

  def test_gradient_equals_the_jacobian_of_numpy_softmax(self):
    """dx = J^T dy with J = diag(y) - y y^T per row (numpy, float64), masked entries and a
    fully masked row getting exactly 0, for a causal mask, a key mask of another rank and
    no mask, on an axis that is not the last."""
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 3, 5, 5)) * 3)
    dy = np.asarray(jax.random.normal(jax.random.key(4), x.shape))
    causal = np.tril(np.ones((5, 5), bool))[None, None]
    keys = np.ones((2, 1, 1, 5), bool)
    keys[0, ..., 3:] = False
    keys[1] = False  # every row of batch 1 fully masked
    for where in (None, causal, keys):
      w = np.ones(x.shape, bool) if where is None else np.broadcast_to(where, x.shape)
      e = np.where(w, np.exp(x - np.where(w, x, -np.inf).max(-1, keepdims=True, initial=-1e30)), 0)
      tot = e.sum(-1, keepdims=True)
      y = e / np.where(tot > 0, tot, 1)
      want = y * (dy - (dy * y).sum(-1, keepdims=True))  # diag(y) dy - y (y . dy)
      got = jax.grad(lambda x: jnp.sum(N.softmax(x, where=where) * dy))(jnp.asarray(x))
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
      assert np.all(np.asarray(got)[~w] == 0.0)
      # the same along axis -2 (the transposed problem)
      got_t = jax.grad(lambda x: jnp.sum(N.softmax(x, axis=-2, where=None if where is None else
                                                   np.swapaxes(w, -1, -2)) *
                                         np.swapaxes(dy, -1, -2)))(jnp.asarray(np.swapaxes(x, -1, -2)))
      np.testing.assert_allclose(np.swapaxes(np.asarray(got_t), -1, -2), want, rtol=1e-5, atol=1e-6)
    gb = jax.grad(lambda x: jnp.sum(N.softmax(x).astype(jnp.float32) * dy))(
        jnp.asarray(x, jnp.bfloat16))
    assert gb.dtype == jnp.bfloat16

  def test_large_magnitudes(self):
    x = jnp.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]])
    y = N.softmax(x)
    np.testing.assert_allclose(y, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-6)

  def test_bf16_in_bf16_out(self):
    x = jax.random.normal(jax.random.key(2), (4, 9)).astype(jnp.bfloat16)
    y = N.softmax(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               _np_softmax(np.asarray(x, np.float32)), atol=4e-3)


class ClippedSoftmaxTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_formula(self):
    x = jax.random.normal(jax.random.key(3), (4, 33)) * 3
    gamma, zeta = -0.03, 1.1
    y = self.variant(lambda x: N.clipped_softmax(x, gamma, zeta))(x)
    ref = np.clip((zeta - gamma) * _np_softmax(np.asarray(x)) + gamma, 0, 1)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-7)

  def test_exact_zeros_below_threshold(self):
    x = jax.random.normal(jax.random.key(4), (8, 64)) * 2
    gamma = -0.02
    s = np.asarray(N.softmax(x))
    y = np.asarray(N.clipped_softmax(x, gamma))
    below = s < -gamma / (1 - gamma)
    assert below.any() and (~below).any()
    assert np.all(y[below] == 0.0)
    assert np.all(y[~below] > 0.0)

  def test_ones_above_upper_threshold(self):
    x = jnp.array([[10.0, 0.0, 0.0]])
    y = N.clipped_softmax(x, gamma=-0.1, zeta=1.2)
    assert float(y[0, 0]) == 1.0

  def test_gamma_zero_zeta_one_is_softmax(self):
    x = jax.random.normal(jax.random.key(5), (5, 19))
    np.testing.assert_array_equal(N.clipped_softmax(x, 0.0, 1.0), N.softmax(x))

  def test_masked_entries_stay_zero(self):
    x = jax.random.normal(jax.random.key(6), (3, 10))
    where = jnp.arange(10)[None, :] < jnp.array([[10], [4], [0]])
    y = np.asarray(N.clipped_softmax(x, -0.01, 1.05, where=where))
    assert np.all(y[~np.asarray(where)] == 0.0)
    np.testing.assert_array_equal(y[2], 0.0)

  def test_no_gradient_in_clipped_region_and_finite(self):
    x = jax.random.normal(jax.random.key(7), (2, 50)) * 3
    gamma = -0.05
    s = np.asarray(N.softmax(x))
    g = jax.grad(lambda x: jnp.sum(N.clipped_softmax(x, gamma) * jnp.arange(50.0)))(x)
    assert np.all(np.isfinite(g))
    # d y_k / d x for a clipped y_k is 0: with only clipped outputs weighted, gradient is 0.
    clipped = (1 - gamma) * s + gamma <= 0
    w = jnp.asarray(clipped, jnp.float32)
    g2 = jax.grad(lambda x: jnp.sum(N.clipped_softmax(x, gamma) * w))(x)
    np.testing.assert_array_equal(g2, 0.0)

  def test_alpha_uses_keys_each_row_sees(self):
    norm = N.get("clipped_softmax", alpha=2.0)
    x = jnp.zeros((2, 8))
    where = jnp.array([[True] * 8, [True] * 4 + [False] * 4])
    n = jnp.sum(where, -1, keepdims=True)
    y = norm(x, where=where, n_keys=n)
    # uniform row: p = 1/N, gamma = -2/N -> (1 + 2/N)/N - 2/N = (1 - N)/N^2 + ... < 0 -> all 0
    np.testing.assert_array_equal(y, 0.0)
    y1 = N.get("clipped_softmax", alpha=0.5)(x, where=where, n_keys=n)
    np.testing.assert_allclose(y1[0], (1 + 0.5 / 8) / 8 - 0.5 / 8, rtol=1e-6)
    np.testing.assert_allclose(y1[1, :4], (1 + 0.5 / 4) / 4 - 0.5 / 4, rtol=1e-6)
    np.testing.assert_array_equal(y1[1, 4:], 0.0)

  def test_invalid_parameters(self):
    with pytest.raises(ValueError, match="gamma"):
      N.clipped_softmax(jnp.zeros(3), 0.1)
    with pytest.raises(ValueError, match="zeta"):
      N.get("clipped_softmax", gamma=-0.1, zeta=0.5)
    with pytest.raises(ValueError, match="not both"):
      N.get("clipped_softmax", gamma=-0.1, alpha=1.0)


class SoftplusTest(chex.TestCase):

  def _ref(self, x, where, p, eps=1e-6):
    x = np.asarray(x, np.float64)
    w = np.broadcast_to(where, x.shape)
    s = np.log1p(np.exp(x)) * w
    a = s / (s.sum(-1, keepdims=True) + eps)
    n = w.sum(-1, keepdims=True)
    o = np.where(n <= 1, 0.0, 1.0)
    b = np.maximum(n * a - o, 0) ** p * w
    tot = b.sum(-1, keepdims=True)
    return np.where(tot > 0, b / np.where(tot > 0, tot, 1), 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_reference_with_causal_mask(self):
    T = 7
    x = jax.random.normal(jax.random.key(8), (2, T, T)) * 2
    where = np.tril(np.ones((T, T), bool))
    for p in (1.0, 3.0, 15.0):
      y = self.variant(lambda x: N.softplus_reweight(x, where=where, p=p))(x)
      np.testing.assert_allclose(y, self._ref(x, where, p), rtol=2e-4, atol=1e-6)
      np.testing.assert_allclose(np.sum(y, -1), 1.0, atol=1e-5)  # no row is exactly uniform
      assert np.all(np.asarray(y)[:, ~where] == 0.0)
    np.testing.assert_allclose(y[:, 0, 0], 1.0)  # first causal row: O = 0, kept

  def test_p1_shortcut_matches_log_domain_values_and_grads(self):
    # p = 1 skips the log/exp; a p just above 1 takes the log-domain path
    x = jax.random.normal(jax.random.key(10), (3, 9, 9)) * 3
    where = np.tril(np.ones((9, 9), bool))
    x = x.at[0, 4].set(0.0)  # an exactly uniform row: all zeros in both paths
    f = lambda p: lambda x: N.softplus_reweight(x, where=where, p=p)
    np.testing.assert_allclose(f(1.0)(x), f(1.0 + 1e-7)(x), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(f(1.0)(x))[0, 4], 0.0)
    loss = lambda p: lambda x: jnp.sum(f(p)(x) * jnp.arange(9.0))
    np.testing.assert_allclose(jax.grad(loss(1.0))(x), jax.grad(loss(1.0 + 1e-7))(x),
                               rtol=1e-4, atol=1e-6)

  def test_large_p_is_finite_and_sharp(self):
    x = jax.random.normal(jax.random.key(9), (4, 64)) * 5
    y = N.softplus_reweight(x, p=60.0)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(np.sum(y, -1), 1.0, atol=1e-5)
    g = jax.grad(lambda x: jnp.sum(N.softplus_reweight(x, p=60.0) * jnp.arange(64.0)))(x)
    assert np.all(np.isfinite(g))

  def test_registry_scale_and_qk_flags(self):
    n = N.get("softplus", p=3.0)
    assert n.normalize_qk
    np.testing.assert_allclose(n.score_scale(16, 100.0), np.log(16) * np.log(100), rtol=1e-6)
    assert not N.get("softmax").normalize_qk
    np.testing.assert_allclose(N.get("softmax").score_scale(16, 100), 0.25)


class WrittenOutGradientTest(chex.TestCase):
  """softplus_reweight carries a hand-written VJP; it must equal JAX autodiff of the same forward
  (`plain_softplus_reweight`; the forward values are checked against numpy in SoftplusTest), on
  masked, fully masked, single-key and exactly uniform rows, along any axis."""

  def _inputs(self, seed, T=9):
    x = jax.random.normal(jax.random.key(seed), (3, T, T)) * 3
    where = np.tril(np.ones((T, T), bool))
    where[4] = False  # a fully masked row
    x = x.at[1, 6, :7].set(0.5)  # an exactly uniform row (softplus: all zeros)
    cot = jax.random.normal(jax.random.key(seed + 1), x.shape)
    return x, jnp.asarray(where), cot

  @chex.variants(with_jit=True, without_jit=True)
  def test_softplus_vjp_matches_autodiff(self):
    x, where, cot = self._inputs(30)
    for p in (1.0, 3.0, 15.0):
      _, vjp = jax.vjp(self.variant(lambda x: N.softplus_reweight(x, where=where, p=p)), x)
      _, vjp_ref = jax.vjp(lambda x: N.plain_softplus_reweight(x, where, p), x)
      g, g_ref = vjp(cot)[0], vjp_ref(cot)[0]
      np.testing.assert_allclose(g, g_ref, rtol=2e-4, atol=1e-5 * np.abs(g_ref).max())
      assert np.all(np.asarray(g)[:, ~np.asarray(where)] == 0.0)
      np.testing.assert_array_equal(np.asarray(g)[1, 6], 0.0)  # uniform row: output 0, no grad

  def test_other_axis_and_bf16(self):
    x, where, cot = self._inputs(40)
    xt, wt, ct = (jnp.swapaxes(v, -1, -2) for v in (x, where, cot))
    g = jax.grad(lambda x: jnp.sum(N.softplus_reweight(x, axis=-2, where=wt, p=1.0) * ct))(xt)
    g_last = jax.grad(lambda x: jnp.sum(N.softplus_reweight(x, where=where, p=1.0) * cot))(x)
    np.testing.assert_allclose(jnp.swapaxes(g, -1, -2), g_last, rtol=1e-6, atol=1e-7)
    # a non-square score tensor with a mask that broadcasts along the normalised axis's partner
    xr = jax.random.normal(jax.random.key(41), (2, 7, 5)) * 3
    keep = jnp.asarray(np.arange(7) < 5)[:, None]  # [7, 1]: rows 5, 6 of axis -2 masked
    y = N.softplus_reweight(xr, axis=-2, where=keep, p=1.0)
    y_ref = jnp.swapaxes(N.softplus_reweight(jnp.swapaxes(xr, -1, -2), where=keep.T, p=1.0), -1, -2)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(y)[:, 5:], 0.0)
    xb = x.astype(jnp.bfloat16)
    f = lambda x: N.softplus_reweight(x, where=where)
    g = jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32) * cot))(xb)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_registry_unknown_name():
  with pytest.raises(ValueError, match=r"unknown normalizer 'softmaxx'; choose one of"):
    N.get("softmaxx")
  with pytest.raises(ValueError, match="gate"):
    N.get("gated")
  with pytest.raises(TypeError, match="unexpected parameters"):
    N.get("softmax", gamma=1.0)
  assert set(N.names()) >= {"softmax", "clipped_softmax", "softplus"}


def test_every_module_of_the_package_is_a_registered_normalizer_with_its_config_keys():
  """A new normalizer is one new file: the package imports each module, which registers its
  Spec, whose parameters become keys of every tower's attention block."""
  import os
  import pkgutil
  from qtx import config_lib
  mods = {m.name for m in pkgutil.iter_modules(N.__path__)} - {"base"}
  assert mods == {"softmax", "clipped_softmax", "softplus", "softmax_sink"}
  assert mods <= set(N.names())  # other tests may register plug-ins of their own too
  block = config_lib.attention_config()
  for name in N.names():
    for key, default in N.spec(name).params.items():
      assert key in block and block[key] == default, (name, key)
  assert os.path.basename(N.softmax.__module__.replace(".", "/")) == "softmax"
