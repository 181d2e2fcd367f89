"""Range estimators on known data: exact values and comparisons against numpy."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx.quant import estimators as est
from qtx.quant import fake_quant


def _sq_err(x, lo, hi, bits, symmetric):
  return float(jnp.sum(jnp.square(x - fake_quant(x, lo, hi, bits, symmetric))))


class EstimatorTest(chex.TestCase):

  def test_minmax_exact(self):
    x = jnp.array([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]])
    lo, hi = est.minmax(x)
    self.assertEqual((float(lo), float(hi)), (-2.0, 4.0))
    lo, hi = est.minmax(x, axis=0, keepdims=True)
    np.testing.assert_array_equal(lo, [[0.5, -2.0, -1.0]])
    np.testing.assert_array_equal(hi, [[1.0, 4.0, 3.0]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_running_minmax_three_batches(self):
    batches = [jnp.array([-1.0, 0.3, 1.0]), jnp.array([-3.0, 2.0]), jnp.array([-2.0, 4.0])]
    step = self.variant(lambda s, x: est.running_minmax(s, x, 0.9))
    # first batch initialises (from a zero-count state, as a Flax variable would start)
    state = est.RangeState(jnp.zeros(()), jnp.zeros(()), jnp.zeros((), jnp.int32))
    expected = [(-1.0, 1.0), (-1.2, 1.1), (-1.28, 1.39)]
    for x, (e_lo, e_hi) in zip(batches, expected):
      state = step(state, x)
      np.testing.assert_allclose([state.x_min, state.x_max], [e_lo, e_hi], rtol=1e-6)
    self.assertEqual(int(state.count), 3)
    # None state is the same as a zero-count state
    s0 = est.running_minmax(None, batches[0])
    np.testing.assert_array_equal([s0.x_min, s0.x_max, s0.count], [-1.0, 1.0, 1])

  def test_running_minmax_momentum_validation(self):
    with pytest.raises(ValueError, match="momentum"):
      est.running_minmax(None, jnp.ones(3), momentum=1.0)

  def test_percentile_matches_numpy(self):
    rng = np.random.default_rng(0)
    x = rng.standard_t(df=3, size=20011).astype(np.float32)
    for q in (99.99, 99.999, 99.0, 90.0):
      lo, hi = est.percentile(x, q)
      np.testing.assert_allclose(lo, np.percentile(x, 100 - q), rtol=1e-6)
      np.testing.assert_allclose(hi, np.percentile(x, q), rtol=1e-6)
    # q = 100 is min-max
    lo, hi = est.percentile(x, 100.0)
    self.assertEqual((float(lo), float(hi)), (float(x.min()), float(x.max())))
    # per-row
    x2 = x[:20000].reshape(40, 500)
    lo, hi = est.percentile(x2, 99.9, axis=1, keepdims=True)
    np.testing.assert_allclose(hi, np.percentile(x2, 99.9, axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(lo, np.percentile(x2, 0.1, axis=1, keepdims=True), rtol=1e-6)
    with pytest.raises(ValueError, match="percentile q="):
      est.percentile(x, 101.0)

  def test_mse_range_heavy_tailed(self):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_t(df=2, size=50000).astype(np.float32))
    mm_lo, mm_hi = est.minmax(x)
    for bits, symmetric in ((8, False), (8, True), (4, True)):
      lo, hi = est.mse_range(x, bits, symmetric)
      # within min-max, strictly shrunk for a heavy tail, same alpha on both ends
      self.assertTrue(mm_lo <= lo <= 0 <= hi <= mm_hi)
      self.assertLess(float(hi), float(mm_hi))
      np.testing.assert_allclose(float(lo) / float(mm_lo), float(hi) / float(mm_hi), rtol=1e-6)
      err_mse = _sq_err(x, lo, hi, bits, symmetric)
      err_mm = _sq_err(x, mm_lo, mm_hi, bits, symmetric)
      self.assertLess(err_mse, (0.6 if bits == 4 else 0.95) * err_mm)

  def test_mse_range_is_best_candidate(self):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.laplace(size=4000).astype(np.float32))
    n = 20
    lo, hi = est.mse_range(x, 4, False, num_candidates=n)
    mm_lo, mm_hi = est.minmax(x)
    errs = [_sq_err(x, a * mm_lo, a * mm_hi, 4, False) for a in 1.0 - np.arange(n) / n]
    self.assertAlmostEqual(_sq_err(x, lo, hi, 4, False), min(errs), places=3)

  def test_mse_range_uniform_keeps_full_range(self):
    # uniform data on the grid's own range: shrinking only clips; min-max is optimal.
    x = jnp.linspace(-1.0, 1.0, 2001)
    lo, hi = est.mse_range(x, 8, symmetric=True)
    self.assertEqual((float(lo), float(hi)), (-1.0, 1.0))

  def test_mse_range_per_channel(self):
    rng = np.random.default_rng(3)
    w = rng.standard_t(df=2, size=(256, 4)).astype(np.float32) * np.array([1, 10, 0.1, 3],
                                                                            np.float32)
    lo, hi = est.mse_range(w, 4, True, num_candidates=50, axis=0, keepdims=True)
    chex.assert_shape((lo, hi), (1, 4))
    for c in range(4):
      c_lo, c_hi = est.mse_range(w[:, c], 4, True, num_candidates=50)
      np.testing.assert_allclose([lo[0, c], hi[0, c]], [c_lo, c_hi], rtol=1e-6)
    lo, hi = est.mse_range(w, 4, True, num_candidates=50, axis=0)
    chex.assert_shape((lo, hi), (4,))

  def test_reduction_axes(self):
    self.assertEqual(est.reduction_axes(3, "per_tensor"), (0, 1, 2))
    self.assertEqual(est.reduction_axes(3, "per_token"), (2,))
    self.assertEqual(est.reduction_axes(2, "per_channel"), (0,))
    self.assertEqual(est.reduction_axes(4, "per_channel", channel_axis=1), (0, 2, 3))
    with pytest.raises(ValueError, match="unknown granularity 'per_row'.*per_tensor"):
      est.reduction_axes(2, "per_row")
    with pytest.raises(ValueError, match="channel_axis=2"):
      est.reduction_axes(2, "per_channel", channel_axis=2)

  def test_estimate_range_shapes_broadcast(self):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 5)).astype(np.float32))
    for estimator in est.ESTIMATORS:
      lo, hi = est.estimate_range(x, estimator, "per_tensor")
      chex.assert_shape((lo, hi), ())
      lo, hi = est.estimate_range(x, estimator, "per_token")
      chex.assert_shape((lo, hi), (2, 3, 1))
      lo, hi = est.estimate_range(x, estimator, "per_channel", channel_axis=-1)
      chex.assert_shape((lo, hi), (1, 1, 5))
      self.assertTrue(bool(jnp.all(lo <= hi)))
    lo, hi = est.estimate_range(x, "minmax", "per_channel")
    np.testing.assert_array_equal(hi[0, 0], np.max(np.asarray(x), axis=(0, 1)))
    with pytest.raises(ValueError, match="unknown estimator 'max'.*running_minmax"):
      est.estimate_range(x, "max")

  def test_estimators_jit(self):
    x = jnp.asarray(np.random.default_rng(5).normal(size=(8, 16)).astype(np.float32))
    for f in (lambda x: est.minmax(x), lambda x: est.percentile(x, 99.0),
              lambda x: est.mse_range(x, 8, False, 10)):
      np.testing.assert_allclose(jax.jit(f)(x), f(x), rtol=1e-6)


def test_masked_percentile_equals_numpy_of_the_counted_entries():
  """The masked path (text tower, causal scores) takes its positions from the nearer end, so it
  stays exact on large tensors: numpy's percentile of x[mask], and an all-True mask changes
  nothing (checked at 1.2M entries, where positions near n are not exact in float32)."""
  rng = np.random.default_rng(0)
  for n in (11, 4000, 1_234_568):
    x = rng.standard_t(2, n).astype(np.float32)
    w = np.ones(n, bool)
    w[::7] = False
    for q in (99.99, 99.0, 75.0):
      lo, hi = est.percentile(jnp.asarray(x), q, where=jnp.asarray(w))
      ref = np.percentile(x[w].astype(np.float64), [100 - q, q])
      np.testing.assert_allclose([lo, hi], ref, rtol=1e-6, atol=1e-5, err_msg=f"{n} {q}")
    lo_all, hi_all = est.percentile(jnp.asarray(x), 99.99, where=jnp.ones(n, bool))
    lo_plain, hi_plain = est.percentile(jnp.asarray(x), 99.99)
    np.testing.assert_allclose([lo_all, hi_all], [lo_plain, hi_plain], rtol=1e-6)
  # rows with nothing counted give (0, 0); per-row masks along an axis
  x = jnp.asarray(rng.normal(size=(3, 50)).astype(np.float32))
  w = jnp.asarray(np.arange(50)[None, :] < np.array([[0], [10], [50]]))
  lo, hi = est.percentile(x, 90.0, axis=1, where=w)
  assert float(lo[0]) == 0.0 and float(hi[0]) == 0.0
  np.testing.assert_allclose(hi[1:], [np.percentile(np.asarray(x[1, :10]), 90),
                                      np.percentile(np.asarray(x[2]), 90)], rtol=1e-5)
