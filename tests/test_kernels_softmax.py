"""Two-pass softmax kernel (interpret mode on CPU) against the three-pass reference.

Tolerances: float32 outputs and gradients within 1e-6 absolute (2e-6 for |x| ~ 1e4) of the
reference; bfloat16 outputs within 1 bf16 ulp of the float32 reference rounded (atol 4e-3) and
gradients within 2e-2 absolute (values are O(0.1)). Exact zeros are compared exactly.
Every kernel configuration is compiled once inside a jitted function that returns the kernel's
and the reference's values and gradients together.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx import kernels
from qtx.kernels import reference
from qtx.kernels import softmax as softmax_lib


def _inputs(shape, seed=0, scale=3.0, p_mask=0.75, dtype=jnp.float32):
  kx, km, kw = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = (scale * jax.random.normal(kx, shape)).astype(dtype)
  where = jax.random.bernoulli(km, p_mask, shape)
  w = jax.random.normal(kw, shape)  # cotangent weights
  return x, where, w


@functools.partial(jax.jit, static_argnames=("axis", "zeta", "with_gamma"))
def _both(x, where, w, gamma, axis=-1, zeta=1.0, with_gamma=True):
  """(y, y_ref, (dx, dgamma), (dx_ref, dgamma_ref)) in one compilation."""
  g = gamma if with_gamma else None

  def loss(fn, x, gamma):
    y = fn(x, axis=axis, where=where, gamma=gamma if with_gamma else None, zeta=zeta)
    return jnp.sum(y.astype(jnp.float32) * w), y

  kern = jax.grad(functools.partial(loss, kernels.two_pass_softmax), argnums=(0, 1),
                  has_aux=True)
  ref = jax.grad(functools.partial(loss, reference.softmax_ref), argnums=(0, 1), has_aux=True)
  (dx, dg), y = kern(x, gamma if g is not None else 0.0)
  (dx_r, dg_r), y_r = ref(x, gamma if g is not None else 0.0)
  return y, y_r, (dx, dg), (dx_r, dg_r)


@pytest.mark.parametrize("T,clipped", [(1, False), (1, True), (7, True), (77, False), (77, True),
                                       (197, False), (197, True)])
def test_matches_reference_with_mask(T, clipped):
  x, where, w = _inputs((3, 5, T), seed=T)
  where = where.at[0, 0].set(False)  # one fully masked row
  gamma = jnp.float32(-1.0 / T) if clipped else jnp.float32(0.0)
  y, y_r, grads, grads_r = _both(x, where, w, gamma, with_gamma=clipped)
  chex.assert_trees_all_close(y, y_r, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(y == 0), np.asarray(y_r == 0))
  assert not np.any(np.asarray(y)[~np.asarray(where)]), "masked entries must be exactly 0"
  np.testing.assert_array_equal(np.asarray(y[0, 0]), 0.0)
  chex.assert_trees_all_close(grads[0], grads_r[0], atol=1e-6)
  # d gamma sums 3 x 5 x T terms: float32 round-off of the sum, relative
  chex.assert_trees_all_close(grads[1], grads_r[1], rtol=1e-5, atol=1e-6)
  if clipped and T >= 7:
    n_clipped = int(jnp.sum((y == 0) & where))
    assert n_clipped > 0, "the test should exercise the clip's zero-gradient region"
  if not clipped:
    expect = jnp.any(where, -1).astype(jnp.float32)  # 1 with any attended entry, else 0
    chex.assert_trees_all_close(jnp.sum(y, -1), expect, atol=1e-6)


def test_matches_jax_nn_softmax_and_rows_sum_to_one():
  x, _, _ = _inputs((4, 6, 300), seed=1)
  y = jax.jit(kernels.two_pass_softmax)(x)
  chex.assert_trees_all_close(y, jax.nn.softmax(x, axis=-1), atol=1e-6)
  chex.assert_trees_all_close(jnp.sum(y, -1), jnp.ones((4, 6)), atol=1e-5)


def test_other_axis_and_broadcast_mask():
  x, _, w = _inputs((2, 9, 3, 4), seed=2)
  where = jax.random.bernoulli(jax.random.PRNGKey(3), 0.6, (2, 9, 1, 1))
  y, y_r, grads, grads_r = _both(x, where, w, jnp.float32(-0.05), axis=1, with_gamma=True)
  chex.assert_trees_all_close(y, y_r, atol=1e-6)
  chex.assert_trees_all_close(grads, grads_r, atol=1e-6)


def test_large_magnitudes_no_overflow():
  x = jnp.array([[1e4, 1e4 - 1.0, -1e4, 0.0, 9990.0],
                 [-1e4, -1e4 + 2.0, -1e4 + 1.0, -1e4, -1e4 - 30.0],
                 [1e4, -1e4, 1e4, -1e4, 1e4],
                 [0.0, 0.0, 0.0, 0.0, 0.0]], jnp.float32)
  w = jnp.arange(20, dtype=jnp.float32).reshape(4, 5) / 10
  y, y_r, grads, grads_r = _both(x, jnp.ones_like(x, bool), w, jnp.float32(0.0),
                                 with_gamma=False)
  chex.assert_tree_all_finite((y, grads))
  chex.assert_trees_all_close(y, y_r, atol=2e-6, rtol=1e-5)
  chex.assert_trees_all_close(grads, grads_r, atol=2e-6, rtol=1e-5)
  y = jax.jit(kernels.two_pass_softmax)(x)
  np.testing.assert_allclose(np.asarray(y[2]), [1 / 3, 0, 1 / 3, 0, 1 / 3], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(y[0, 2]), 0.0)
  lse = jax.jit(kernels.logsumexp)(x)
  chex.assert_trees_all_close(lse, jax.nn.logsumexp(x, axis=-1), rtol=1e-6)


def test_fully_masked_rows_are_zero_with_zero_gradient():
  x, _, w = _inputs((4, 37), seed=4, scale=100.0)
  where = jnp.zeros((4, 37), bool).at[1, 3].set(True)
  y, y_r, (dx, dg), _ = _both(x, where, w, jnp.float32(-0.25), with_gamma=True)
  chex.assert_tree_all_finite((y, dx, dg))
  expect = np.zeros((4, 37), np.float32)
  expect[1, 3] = 1.0
  np.testing.assert_array_equal(np.asarray(y), expect)
  np.testing.assert_array_equal(np.asarray(dx), 0.0)  # a lone entry at 1 is clipped: no gradient


def test_clipped_exact_zeros_and_ones_and_gradients():
  # zeta > 1: probabilities above (1 - gamma) / (zeta - gamma) clip to exactly 1.
  gamma, zeta = -0.1, 1.2
  x = jnp.array([[8.0, 0.0, 0.1, -0.2, 0.3, 0.0, -1.0, 0.2],
                 [1.0, 1.1, 0.9, 1.0, 0.95, 1.05, 1.0, -3.0],
                 [0.0, 2.5, 0.0, 2.4, -9.0, 0.0, 0.0, 0.0]], jnp.float32)
  w = jax.random.normal(jax.random.PRNGKey(5), x.shape)
  y, y_r, grads, grads_r = _both(x, jnp.ones_like(x, bool), w, jnp.float32(gamma), zeta=zeta)
  assert float(y[0, 0]) == 1.0
  assert int(jnp.sum(y == 0)) >= 8
  np.testing.assert_array_equal(np.asarray(y == 0), np.asarray(y_r == 0))
  np.testing.assert_array_equal(np.asarray(y == 1), np.asarray(y_r == 1))
  chex.assert_trees_all_close(y, y_r, atol=1e-6)
  chex.assert_trees_all_close(grads, grads_r, atol=1e-6)
  # By hand: g_eff = g (zeta - gamma) 1[active], dx = s (g_eff - sum g_eff s).
  s = jax.nn.softmax(x, -1)
  a = (zeta - gamma) * s + gamma
  g_eff = jnp.where((a > 0) & (a < 1), w * (zeta - gamma), 0.0)
  dx = s * (g_eff - jnp.sum(g_eff * s, -1, keepdims=True))
  chex.assert_trees_all_close(grads[0], dx, atol=1e-6)


def test_bfloat16():
  x, where, w = _inputs((6, 197), seed=6, dtype=jnp.bfloat16)
  y, y_r, grads, grads_r = _both(x, where, w, jnp.float32(-0.004), with_gamma=True)
  assert y.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
  chex.assert_trees_all_close(y.astype(jnp.float32), y_r.astype(jnp.float32), atol=4e-3)
  np.testing.assert_array_equal(np.asarray(y == 0), np.asarray(y_r == 0))
  chex.assert_trees_all_close(jax.tree.map(lambda a: a.astype(jnp.float32), grads),
                              jax.tree.map(lambda a: a.astype(jnp.float32), grads_r), atol=2e-2)


def test_gamma_traced_under_jit_and_per_row():
  x, where, w = _inputs((4, 50), seed=7)

  @jax.jit
  def f(x, gamma):
    return jnp.sum(kernels.two_pass_softmax(x, where=where, gamma=gamma) * w)

  @jax.jit
  def f_ref(x, gamma):
    return jnp.sum(reference.softmax_ref(x, where=where, gamma=gamma) * w)

  for g in (0.0, -0.01, -0.04):  # a ramp: one compilation, changing values
    got = jax.grad(f, argnums=(0, 1))(x, jnp.float32(g))
    want = jax.grad(f_ref, argnums=(0, 1))(x, jnp.float32(g))
    chex.assert_trees_all_close(got, want, atol=1e-5)
  gamma_rows = -jnp.linspace(0.0, 0.05, 4)[:, None]  # one gamma per row
  got = jax.grad(f, argnums=(0, 1))(x, gamma_rows)
  want = jax.grad(f_ref, argnums=(0, 1))(x, gamma_rows)
  chex.assert_shape(got[1], (4, 1))
  chex.assert_trees_all_close(got, want, atol=1e-5)


def test_chunked_rows_and_whole_row_layout():
  """Several chunks per row and rows not a multiple of the block, and the Mosaic-style layout."""
  x, where, w = _inputs((13, 300), seed=8)
  gamma = jnp.full((13, 1), -0.004, jnp.float32)
  r, ref_vjp = jax.vjp(jax.jit(lambda x: reference.softmax_ref(x, where=where, gamma=gamma)), x)
  dr = ref_vjp(w)[0]
  mask = where.astype(jnp.int8)
  for plan in (softmax_lib.make_plan(13, 300, jnp.float32, True, block_rows=4, block_cols=64),
               softmax_lib.make_plan(13, 300, jnp.float32, True, platform="tpu")):
    static = softmax_lib._Static(plan, 1.0)
    f = jax.jit(lambda x: softmax_lib._softmax_rows(x, mask, gamma, static))
    y, vjp = jax.vjp(f, x)
    chex.assert_trees_all_close(y, r, atol=1e-6)
    chex.assert_trees_all_close(vjp(w)[0], dr, atol=1e-6)
  assert softmax_lib.make_plan(13, 300, jnp.float32, True, block_cols=64).n_chunks == 5


def test_logsumexp_value_and_gradient():
  x, _, w = _inputs((5, 3, 130), seed=9, scale=20.0)
  lse, grad = jax.jit(jax.value_and_grad(lambda x: jnp.sum(kernels.logsumexp(x, axis=1) *
                                                           w[:, 0])))(x)
  lse_r, grad_r = jax.value_and_grad(lambda x: jnp.sum(jax.nn.logsumexp(x, axis=1) * w[:, 0]))(x)
  chex.assert_trees_all_close(lse, lse_r, rtol=1e-5)
  chex.assert_trees_all_close(grad, grad_r, atol=1e-6)
  chex.assert_shape(kernels.logsumexp(x, axis=1), (5, 130))


def test_errors_name_the_bad_value():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="gamma <= 0, got gamma=0.5"):
    kernels.two_pass_softmax(x, gamma=0.5)
  with pytest.raises(ValueError, match="zeta >= 1, got zeta=0.5"):
    kernels.two_pass_softmax(x, gamma=-0.1, zeta=0.5)
  with pytest.raises(TypeError, match="floating.*int32"):
    kernels.two_pass_softmax(jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="power of two, got 3"):
    kernels.two_pass_softmax(x, block_rows=3)
  with pytest.raises(ValueError, match="does not broadcast to the rows"):
    kernels.two_pass_softmax(x, gamma=jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="interpret=True"):
    softmax_lib.resolve_platform(False, "cpu")


def test_gpu_block_plans_in_interpret_mode():
  """The Triton layouts (one whole-row chunk; chunks of 4096 for rows over 16384 entries, with
  rows that are not a multiple of the block) compute the reference softmax and its gradient."""
  for shape in ((6, 197), (3, 20000)):
    x, where, w = _inputs(shape, seed=11)
    gamma = jnp.full((shape[0], 1), -0.3 / shape[1], jnp.float32)
    r, ref_vjp = jax.vjp(jax.jit(lambda x: reference.softmax_ref(x, where=where, gamma=gamma)), x)
    plan = softmax_lib.make_plan(*shape, jnp.float32, True, platform="gpu")
    assert plan.platform == "gpu" and plan.n_chunks == (1 if shape[1] <= 16384 else 5)
    static = softmax_lib._Static(plan, 1.0)
    y, vjp = jax.vjp(jax.jit(lambda x: softmax_lib._softmax_rows(
        x, where.astype(jnp.int8), gamma, static)), x)
    chex.assert_trees_all_close(y, r, atol=1e-6)
    chex.assert_trees_all_close(vjp(w)[0], ref_vjp(w)[0], atol=1e-6)
