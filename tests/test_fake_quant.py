"""fake_quant: exact grids, zero point, range widening, symmetric grid, STE, validation."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx.quant import fake_quant, quant_grid
from qtx.quant.fake_quant import integer_bounds, validate_bits


def _reference(x, x_min, x_max, num_bits, symmetric):
  """The paper's formula in float32 numpy, written out independently."""
  x = np.asarray(x, np.float32)
  x_min = np.asarray(x_min, np.float32)
  x_max = np.asarray(x_max, np.float32)
  if symmetric:
    lo, hi = -2 ** (num_bits - 1), 2 ** (num_bits - 1) - 1
    s = np.maximum(np.abs(x_min), np.abs(x_max)) / np.float32(hi)
    z = np.zeros_like(s)
  else:
    lo, hi = 0, 2 ** num_bits - 1
    x_min, x_max = np.minimum(x_min, 0), np.maximum(x_max, 0)
    s = (x_max - x_min) / np.float32(hi)
    z = np.round(-x_min / s)
  return s * (np.clip(np.round(x / s) + z, lo, hi) - z)


class FakeQuantTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_asymmetric_2bit_hand_computed(self):
    # range [-1, 2], 2 bits: s = 3 / 3 = 1, z = round(1 / 1) = 1, grid {-1, 0, 1, 2}.
    x = jnp.array([-2.0, -1.0, -0.4, 0.4, 0.6, 1.6, 2.0, 3.0])
    y = self.variant(lambda x: fake_quant(x, -1.0, 2.0, num_bits=2))(x)
    np.testing.assert_array_equal(y, [-1.0, -1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0])

  def test_round_half_to_even(self):
    # 0.5 / 1 = 0.5 rounds to 0 (half to even, like torch.round), 1.5 rounds to 2.
    y = fake_quant(jnp.array([-1.0, 0.0, 0.5, 1.0, 1.5, 2.0]), -1.0, 2.0, num_bits=2)
    np.testing.assert_array_equal(y, [-1.0, 0.0, 0.0, 1.0, 2.0, 2.0])

  def test_zero_point_rounding(self):
    # range [-0.3, 0.7], 2 bits: s = 1/3, -min/s = 0.9 -> z = 1: grid s * {-1, 0, 1, 2}.
    grid = quant_grid(-0.3, 0.7, num_bits=2)
    np.testing.assert_allclose(grid.scale, 1.0 / 3.0, rtol=1e-7)
    self.assertEqual(float(grid.zero_point), 1.0)
    y = fake_quant(jnp.array([-0.3, -0.2, 0.1, 0.2, 0.7, 0.9]), -0.3, 0.7, num_bits=2)
    s = np.float32(1.0) / np.float32(3.0)
    np.testing.assert_allclose(y, [-s, -s, 0.0, s, 2 * s, 2 * s], rtol=1e-6)

  def test_zero_is_exact(self):
    rng = np.random.default_rng(0)
    for _ in range(50):
      a, b = np.sort(rng.normal(size=2) * 10)
      for bits in (2, 4, 8, 16):
        self.assertEqual(float(fake_quant(jnp.float32(0.0), a, b, bits)), 0.0)

  def test_range_widened_to_include_zero(self):
    # all-positive [0.5, 2] becomes [0, 2]: s = 2/3, z = 0; 0.2 -> 0, not clipped up to 0.5.
    grid = quant_grid(0.5, 2.0, num_bits=2)
    np.testing.assert_allclose(grid.scale, 2.0 / 3.0, rtol=1e-7)
    self.assertEqual(float(grid.zero_point), 0.0)
    y = fake_quant(jnp.array([0.2, 0.5, 1.1, 2.0]), 0.5, 2.0, num_bits=2)
    np.testing.assert_allclose(y, [0.0, 2 / 3, 4 / 3, 2.0], rtol=1e-6)
    # all-negative [-3, -1] becomes [-3, 0]: s = 1, z = 3.
    y = fake_quant(jnp.array([-3.2, -1.4, -0.4, 0.6]), -3.0, -1.0, num_bits=2)
    np.testing.assert_array_equal(y, [-3.0, -1.0, 0.0, 0.0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_symmetric_3bit_hand_computed(self):
    # absmax 3, grid [-4, 3], s = 3 / 3 = 1, z = 0.
    self.assertEqual(integer_bounds(3, True), (-4, 3))
    x = jnp.array([-5.0, -4.0, -3.6, -1.4, 0.4, 2.4, 3.0, 4.0])
    y = self.variant(lambda x: fake_quant(x, -1.0, 3.0, num_bits=3, symmetric=True))(x)
    np.testing.assert_array_equal(y, [-4.0, -4.0, -4.0, -1.0, 0.0, 2.0, 3.0, 3.0])

  def test_symmetric_8bit_grid_is_absmax_over_127(self):
    grid = quant_grid(-0.5, 1.27, num_bits=8, symmetric=True)
    np.testing.assert_allclose(grid.scale, 0.01, rtol=1e-6)
    self.assertEqual((grid.q_lo, grid.q_hi), (-128, 127))
    x = jnp.linspace(-2.0, 2.0, 10001)
    y = fake_quant(x, -0.5, 1.27, symmetric=True)
    q = np.round(np.asarray(y) / 0.01)
    np.testing.assert_allclose(np.asarray(y), q * np.float32(0.01), atol=1e-6)
    self.assertEqual((q.min(), q.max()), (-128.0, 127.0))

  def test_matches_reference_all_bits(self):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 33)).astype(np.float32) * 3
    for bits in range(2, 17):
      for symmetric in (False, True):
        a, b = np.float32(-2.5), np.float32(4.0)
        y = fake_quant(x, a, b, bits, symmetric)
        ref = _reference(x, a, b, bits, symmetric)
        s = float(quant_grid(a, b, bits, symmetric).scale)
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * s + 1e-7)
        q_lo, q_hi = integer_bounds(bits, symmetric)
        self.assertLessEqual(len(np.unique(np.asarray(y))), q_hi - q_lo + 1)

  def test_per_channel_and_per_token_ranges_broadcast(self):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 7)).astype(np.float32) * np.arange(1, 8, dtype=np.float32)
    # per-channel (columns)
    lo, hi = x.min(0, keepdims=True), x.max(0, keepdims=True)
    y = np.asarray(fake_quant(x, lo, hi, 4, symmetric=True))
    for c in range(7):
      np.testing.assert_allclose(y[:, c], fake_quant(x[:, c], lo[0, c], hi[0, c], 4, True),
                                 rtol=1e-6)
    # per-token (rows)
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    y = np.asarray(fake_quant(x, lo, hi, 4))
    for r in range(5):
      np.testing.assert_allclose(y[r], fake_quant(x[r], lo[r, 0], hi[r, 0], 4), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_straight_through_gradient(self):
    # range [-1, 2], 2 bits: representable interval [s*(0-z), s*(3-z)] = [-1, 2].
    x = jnp.array([-3.0, -1.5, -1.0, -0.3, 0.0, 0.7, 1.9, 2.0, 2.1, 5.0])
    g = self.variant(jax.grad(lambda x: jnp.sum(fake_quant(x, -1.0, 2.0, num_bits=2))))(x)
    np.testing.assert_array_equal(g, [0, 0, 1, 1, 1, 1, 1, 1, 0, 0])
    # weighted cotangent passes through unchanged inside
    w = jnp.arange(10.0)
    g = jax.grad(lambda x: jnp.sum(w * fake_quant(x, -1.0, 2.0, num_bits=2)))(x)
    np.testing.assert_array_equal(g, w * np.array([0, 0, 1, 1, 1, 1, 1, 1, 0, 0]))

  def test_symmetric_gradient_and_no_range_gradient(self):
    x = jnp.array([-1.1, -1.0, 0.3, 0.99, 1.0, 1.2])
    f = lambda x, a, b: jnp.sum(fake_quant(x, a, b, 8, symmetric=True))
    gx, ga, gb = jax.grad(f, argnums=(0, 1, 2))(x, -1.0, 1.0)
    # symmetric interval is [-128 s, 127 s] = [-1.0079, 1], s = 1/127: -1.1 and 1.2 clipped.
    np.testing.assert_array_equal(gx, [0, 1, 1, 1, 1, 0])
    self.assertEqual(float(ga), 0.0)
    self.assertEqual(float(gb), 0.0)

  def test_degenerate_range_no_nan(self):
    x = jnp.array([-1.0, 0.0, 2.0])
    for symmetric in (False, True):
      y, g = jax.value_and_grad(lambda x: jnp.sum(fake_quant(x, 0.0, 0.0, 8, symmetric)))(x)
      self.assertTrue(np.isfinite(float(y)))
      np.testing.assert_array_equal(fake_quant(x, 0.0, 0.0, 8, symmetric), [0.0, 0.0, 0.0])
      np.testing.assert_array_equal(g, [0.0, 1.0, 0.0])

  def test_dtype_preserved(self):
    x = jnp.linspace(-1, 1, 33, dtype=jnp.bfloat16)
    y = fake_quant(x, -1.0, 1.0, 4)
    self.assertEqual(y.dtype, jnp.bfloat16)
    np.testing.assert_array_equal(
        y, fake_quant(x.astype(jnp.float32), -1.0, 1.0, 4).astype(jnp.bfloat16))

  def test_bits_validation(self):
    for bad in (1, 17, 0, 8.0, True, "8", None):
      with pytest.raises(ValueError, match=r"num_bits=.*\[2, 16\]"):
        fake_quant(jnp.ones(3), -1.0, 1.0, num_bits=bad)
    self.assertEqual(validate_bits(2), 2)
    self.assertEqual(validate_bits(16), 16)
