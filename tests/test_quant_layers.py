"""Quantized Linen blocks: config, ActQuant calibration/quantization, QDense, QLayerNorm."""
import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx import config_lib
from qtx.quant import estimators as est
from qtx.quant import fake_quant, quant_grid
from qtx.quant.layers import (QUANT_STATS, ActQuant, QDense, QLayerNorm, QuantConfig,
                              fused_dense, quantize_weight)

W8A8 = QuantConfig(enabled=True)


def _rel_err(y, ref, mask=None):
  d, n = jnp.square(y - ref), jnp.square(ref)
  if mask is not None:
    d, n = d * mask, n * mask
  return float(jnp.sqrt(jnp.sum(d) / jnp.sum(n)))


def _calibrate(module, variables, *batches):
  """Runs calibration batches; returns the 'quant_stats' collection."""
  stats = {k: v for k, v in variables.items() if k == QUANT_STATS}
  step = jax.jit(lambda v, x: module.apply(v, x, mutable=[QUANT_STATS])[1])
  for x in batches:
    stats = dict(step({"params": variables.get("params", {}), **stats}, x))
  return stats


def _apply(module, variables, x):
  """Quantized (or float) forward, jitted: one compile instead of op-by-op dispatch."""
  return jax.jit(module.apply)(variables, x)


class QuantConfigTest(chex.TestCase):

  def test_from_config_defaults(self):
    c = QuantConfig.from_config(config_lib.tiny_config().quant)
    self.assertFalse(c.enabled)
    self.assertEqual((c.weight_bits, c.act_bits), (8, 8))
    self.assertEqual(c.keep_float, ("head",))
    self.assertEqual(c.estimator, "running_minmax")
    hash(c)  # usable as a module attribute
    self.assertEqual(QuantConfig.from_config(None), QuantConfig())

  def test_from_config_overrides_and_keep_float_string(self):
    q = config_lib.tiny_config().quant
    q.enabled = True
    q.weight_bits = 4
    q.act_granularity = "per_token"
    q.keep_float = " head , attn_probs,"
    c = QuantConfig.from_config(q)
    self.assertEqual((c.enabled, c.weight_bits, c.act_granularity), (True, 4, "per_token"))
    self.assertEqual(c.keep_float, ("head", "attn_probs"))
    self.assertFalse(c.quantizes("head"))
    self.assertFalse(c.quantizes("attn_probs"))
    self.assertTrue(c.quantizes("attn_scores"))
    self.assertEqual(QuantConfig(keep_float="weights,resid").keep_float, ("weights", "resid"))

  def test_keep_float_refuses_names_nothing_reads(self):
    for name, msg in (("gates", "gates are always computed in float"),
                      ("temperature", "temperature .* is never quantized"),
                      ("attn_prob", "unknown name 'attn_prob'; choose from input, embed")):
      with pytest.raises(ValueError, match=msg):
        QuantConfig(keep_float=f"head,{name}")

  def test_keep_float_weights_keeps_kernels_float(self):
    w = jax.random.normal(jax.random.key(1), (16, 8))
    q = quantize_weight(w, W8A8)
    self.assertFalse(np.array_equal(np.asarray(q), np.asarray(w)))
    f = quantize_weight(w, dataclasses.replace(W8A8, keep_float=("weights",)))
    np.testing.assert_array_equal(f, w)

  def test_validation_errors(self):
    cases = [
        ("estimator", "minmaxx", r"unknown quant.estimator 'minmaxx'; choose one of .*'mse'"),
        ("weight_granularity", "per_token", r"weight_granularity 'per_token'.*per_channel"),
        ("act_granularity", "per_channel", r"act_granularity 'per_channel'.*per_token"),
        ("weight_bits", 1, r"num_bits=1 .*\[2, 16\]"),
        ("act_bits", 32, r"num_bits=32 .*\[2, 16\]"),
        ("percentile", 40.0, r"percentile=40.0"),
        ("momentum", 1.5, r"momentum=1.5"),
    ]
    for key, value, match in cases:
      with pytest.raises(ValueError, match=match):
        QuantConfig.from_config({key: value})

  def test_unknown_key(self):
    with pytest.raises(ValueError, match=r"unknown quant config keys \['bitz'\]"):
      QuantConfig.from_config({"bitz": 8})
    # driver keys are accepted and ignored
    QuantConfig.from_config({"calib_batches": 4, "outliers_every_steps": 10})

  def test_w6a8_w4a8_w8a16(self):
    for w, a in ((6, 8), (4, 8), (8, 16)):
      c = QuantConfig.from_config({"enabled": True, "weight_bits": w, "act_bits": a})
      self.assertEqual((c.weight_bits, c.act_bits), (w, a))


class ActQuantTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.x = jax.random.normal(jax.random.key(0), (4, 8, 16)) * 2.0 + 0.5

  def test_disabled_is_identity_without_variables(self):
    for cfg in (None, QuantConfig(enabled=False), dataclasses.replace(W8A8, keep_float=("resid",))):
      m = ActQuant(cfg, point="resid")
      variables = m.init(jax.random.key(0), self.x)
      self.assertEqual(jax.tree.leaves(variables), [])
      y = m.apply(variables, self.x)
      self.assertIs(y, self.x) if cfg is None else np.testing.assert_array_equal(y, self.x)

  def test_calibration_then_quantization(self):
    m = ActQuant(W8A8, point="attn_scores")
    variables = m.init(jax.random.key(0), self.x)
    self.assertNotIn("params", variables)
    stats = variables[QUANT_STATS]
    self.assertEqual(int(stats["count"]), 0)  # init does not calibrate
    y, upd = m.apply(variables, self.x, mutable=[QUANT_STATS])
    np.testing.assert_array_equal(y, self.x)  # calibration runs in float
    s = upd[QUANT_STATS]
    self.assertEqual(int(s["count"]), 1)
    np.testing.assert_allclose([s["x_min"], s["x_max"]],
                               [jnp.min(self.x), jnp.max(self.x)], rtol=1e-6)
    y = _apply(m, dict(upd), self.x)  # read-only collection -> quantized
    vals = np.unique(np.asarray(y))
    self.assertLessEqual(len(vals), 256)
    self.assertGreater(len(vals), 100)
    grid = quant_grid(s["x_min"], s["x_max"], 8)
    q = np.asarray(y) / grid.scale + grid.zero_point
    np.testing.assert_allclose(q, np.round(q), atol=1e-3)
    self.assertTrue(np.all((np.round(q) >= 0) & (np.round(q) <= 255)))
    np.testing.assert_allclose(y, fake_quant(self.x, s["x_min"], s["x_max"], 8), rtol=1e-6)

  def test_running_minmax_over_batches_matches_estimator(self):
    batches = [self.x * f + b for f, b in ((1.0, 0.0), (3.0, 1.0), (0.5, 10.0))]
    m = ActQuant(W8A8, point="p")
    stats = _calibrate(m, m.init(jax.random.key(0), batches[0]), *batches)[QUANT_STATS]
    ref = None
    for x in batches:
      ref = est.running_minmax(ref, x, 0.9)
    self.assertEqual(int(stats["count"]), 3)
    np.testing.assert_allclose([stats["x_min"], stats["x_max"]],
                               [float(ref.x_min), float(ref.x_max)], rtol=1e-6)

  def test_running_minmax_averages_raw_extremes_not_the_zero_widened_range(self):
    # batch 1 lies in [1, 2] (its range widened to include 0 would be [0, 2]); batch 2 in
    # [-1, 4]. EMA of the raw extremes: min 0.9 * 1 + 0.1 * -1 = 0.8, max 0.9 * 2 + 0.1 * 4 =
    # 2.2, so the grid is [0, 2.2]. Averaging the widened range would give min -0.1.
    b1 = jnp.array([1.0, 1.5, 2.0])
    b2 = jnp.array([-1.0, 0.0, 4.0])
    m = ActQuant(W8A8, point="p")
    stats = _calibrate(m, m.init(jax.random.key(0), b1), b1, b2)
    s = stats[QUANT_STATS]
    np.testing.assert_allclose([s["x_min"], s["x_max"]], [0.8, 2.2], rtol=1e-6)
    y = _apply(m, stats, jnp.array([-0.05, 0.0, 2.2]))
    # grid [0, 2.2]: -0.05 clips to exactly 0 (with min -0.1 it would be representable)
    np.testing.assert_array_equal(np.asarray(y)[:2], [0.0, 0.0])
    np.testing.assert_allclose(float(y[2]), 2.2, rtol=1e-6)

  def test_valid_mask_excludes_entries_from_every_estimator(self):
    # the masked entries (think: padding after end-of-text) hold the extremes; with the mask
    # the range is that of the counted entries only, for every estimator and per token
    x = jnp.concatenate([self.x[:, :6], 100.0 + jnp.zeros_like(self.x[:, 6:])], axis=1)
    valid = (jnp.arange(x.shape[1]) < 6)[None, :, None]
    kept = x[:, :6]
    for name, expected in (
        ("minmax", est.minmax(kept)),
        ("running_minmax", est.minmax(kept)),
        ("percentile", est.percentile(kept, 99.0)),
        ("mse", est.mse_range(kept, 8))):
      cfg = dataclasses.replace(W8A8, estimator=name, percentile=99.0)
      m = ActQuant(cfg, point="p")
      variables = m.init(jax.random.key(0), x)
      _, upd = jax.jit(lambda v, x: m.apply(v, x, valid, mutable=[QUANT_STATS]))(variables, x)
      s = upd[QUANT_STATS]
      np.testing.assert_allclose([s["x_min"], s["x_max"]], np.asarray(expected), rtol=1e-5,
                                 err_msg=name)
      # the dynamic fallback of an uncalibrated quantizer uses the mask too
      y = jax.jit(lambda v, x: m.apply(v, x, valid))(variables, x)
      lo, hi = est.minmax(kept)
      np.testing.assert_allclose(y[:, :6], fake_quant(kept, lo, hi, 8), rtol=1e-6, atol=1e-6)
    cfg = dataclasses.replace(W8A8, act_granularity="per_token")
    m = ActQuant(cfg, point="p")
    where = jnp.arange(x.shape[-1]) < 10  # per-token range over the first 10 channels
    y = m.apply({}, x, where)
    lo, hi = est.minmax(x[..., :10], axis=-1, keepdims=True)
    np.testing.assert_allclose(y, fake_quant(x, lo, hi, 8), rtol=1e-6, atol=1e-6)

  def test_other_estimators_over_batches(self):
    batches = [self.x, self.x * 3.0 + 1.0]
    for name, expected in (
        ("minmax", (float(jnp.min(batches[1])), float(jnp.max(batches[1])))),
        ("percentile", tuple(np.mean([est.percentile(b, 99.0) for b in batches], axis=0))),
        ("mse", tuple(np.mean([est.mse_range(b, 8) for b in batches], axis=0)))):
      m = ActQuant(dataclasses.replace(W8A8, estimator=name, percentile=99.0), point="p")
      stats = _calibrate(m, m.init(jax.random.key(0), self.x), *batches)[QUANT_STATS]
      np.testing.assert_allclose([stats["x_min"], stats["x_max"]], expected, rtol=1e-5,
                                 err_msg=name)

  def test_range_includes_zero(self):
    m = ActQuant(W8A8, point="p")
    x = jnp.abs(self.x) + 3.0  # all positive
    stats = _calibrate(m, m.init(jax.random.key(0), x), x)
    lo, hi = float(stats[QUANT_STATS]["x_min"]), float(stats[QUANT_STATS]["x_max"])
    self.assertGreater(lo, 3.0)  # the stored statistic is raw; the grid adds 0
    y = _apply(m, stats, jnp.array([0.0, 1.0, hi]))
    self.assertEqual(float(y[0]), 0.0)
    np.testing.assert_allclose(float(y[1]), round(1.0 / (hi / 255)) * hi / 255, rtol=1e-6)
    np.testing.assert_allclose(float(y[2]), hi, rtol=1e-6)

  def test_missing_stats_error(self):
    m = ActQuant(W8A8, point="attn_probs")
    with pytest.raises(ValueError, match=r"point 'attn_probs'.*mutable=\['quant_stats'\]"):
      m.apply({}, self.x)

  def test_uncalibrated_falls_back_to_dynamic_range(self):
    m = ActQuant(W8A8, point="p")
    variables = m.init(jax.random.key(0), self.x)
    y = _apply(m, variables, self.x)
    np.testing.assert_allclose(y, fake_quant(self.x, jnp.min(self.x), jnp.max(self.x)),
                               rtol=1e-6)

  def test_per_token_dynamic(self):
    cfg = dataclasses.replace(W8A8, act_granularity="per_token")
    m = ActQuant(cfg, point="p")
    variables = m.init(jax.random.key(0), self.x)
    self.assertEqual(jax.tree.leaves(variables), [])
    y = _apply(m, variables, self.x)
    lo, hi = jnp.min(self.x, -1, keepdims=True), jnp.max(self.x, -1, keepdims=True)
    np.testing.assert_array_equal(y, fake_quant(self.x, lo, hi, 8))

  def test_ste_gradient_through_quantized_point(self):
    m = ActQuant(W8A8, point="p")
    stats = _calibrate(m, m.init(jax.random.key(0), self.x), self.x)
    g = jax.grad(lambda x: jnp.sum(_apply(m, stats, x)))(self.x * 2.0)
    inside = (self.x * 2.0 >= stats[QUANT_STATS]["x_min"] - 1e-3) & (
        self.x * 2.0 <= stats[QUANT_STATS]["x_max"] + 1e-3)
    np.testing.assert_array_equal(np.asarray(g) > 0, np.asarray(inside))

  def test_inside_scan_per_layer_stats(self):
    class Body(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        return ActQuant(W8A8, point="resid", name="q")(x * 2.0), None

    class Stack(nn.Module):
      @nn.compact
      def __call__(self, x):
        scan = nn.scan(Body, variable_axes={QUANT_STATS: 0}, split_rngs={"params": True},
                       length=3)
        return scan(name="layers")(x, None)[0]

    m = Stack()
    stats = _calibrate(m, m.init(jax.random.key(0), self.x), self.x)[QUANT_STATS]
    q = stats["layers"]["q"]
    np.testing.assert_array_equal(q["count"], [1, 1, 1])
    m_abs = float(jnp.max(self.x))
    np.testing.assert_allclose(q["x_max"], [2 * m_abs, 4 * m_abs, 8 * m_abs], rtol=1e-6)


class QuantizeWeightTest(chex.TestCase):

  def test_identity_when_disabled(self):
    w = jnp.arange(6.0).reshape(2, 3)
    self.assertIs(quantize_weight(w, None), w)
    self.assertIs(quantize_weight(w, QuantConfig()), w)

  def test_per_tensor_symmetric_grid(self):
    w = jax.random.normal(jax.random.key(1), (32, 16))
    wq = quantize_weight(w, W8A8)
    s = float(jnp.max(jnp.abs(w))) / 127.0
    q = np.asarray(wq) / s
    np.testing.assert_allclose(q, np.round(q), atol=1e-3)
    self.assertLessEqual(np.abs(np.round(q)).max(), 127)

  def test_per_channel_outlier_column(self):
    w = jax.random.normal(jax.random.key(2), (64, 8)).at[:, 3].multiply(100.0)
    mask = jnp.ones_like(w).at[:, 3].set(0.0)
    e_tensor = _rel_err(quantize_weight(w, W8A8), w, mask)
    e_chan = _rel_err(quantize_weight(w, dataclasses.replace(
        W8A8, weight_granularity="per_channel")), w, mask)
    self.assertGreater(e_tensor, 0.3)
    self.assertLess(e_chan, 0.01)

  def test_mse_weights(self):
    w = jnp.asarray(np.random.default_rng(0).standard_t(3, size=(128, 16)).astype(np.float32))
    cfg4 = dataclasses.replace(W8A8, weight_bits=4)
    e_mm = _rel_err(quantize_weight(w, cfg4), w)
    e_mse = _rel_err(quantize_weight(w, dataclasses.replace(cfg4, estimator="mse")), w)
    self.assertLess(e_mse, e_mm)


class QDenseTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.x = jax.random.normal(jax.random.key(0), (8, 16, 64))

  def test_params_match_nn_dense(self):
    for use_bias in (True, False):
      ref = nn.Dense(32, use_bias=use_bias).init(jax.random.key(1), self.x)
      for cfg in (None, W8A8):
        got = QDense(32, use_bias=use_bias, cfg=cfg).init(jax.random.key(1), self.x)
        chex.assert_trees_all_equal(got["params"], ref["params"])
    # float QDense output equals nn.Dense on the same params
    params = ref["params"]
    np.testing.assert_allclose(QDense(32, use_bias=False).apply({"params": params}, self.x),
                               nn.Dense(32, use_bias=False).apply({"params": params}, self.x),
                               rtol=1e-6, atol=1e-6)

  def test_logical_partitioning_init(self):
    m = QDense(32, cfg=W8A8, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", "mlp")),
               bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))
    variables = m.init(jax.random.key(1), self.x)
    spec = nn.get_partition_spec(variables)
    self.assertEqual(tuple(spec["params"]["kernel"]), ("embed", "mlp"))
    self.assertEqual(tuple(spec["params"]["bias"]), ("mlp",))
    stats = _calibrate(m, variables, self.x)
    y = _apply(m, {"params": variables["params"], **stats}, self.x)
    chex.assert_shape(y, (8, 16, 32))
    chex.assert_tree_all_finite(y)

  def test_w8a8_close_to_float(self):
    m_f, m_q = QDense(64), QDense(64, cfg=W8A8)
    variables = m_q.init(jax.random.key(1), self.x)
    y_f = m_f.apply({"params": variables["params"]}, self.x)
    stats = jax.jit(lambda v, x: _calibrate(m_q, v, x))(variables, self.x)
    y_q = jax.jit(m_q.apply)({"params": variables["params"], **stats}, self.x)
    self.assertLess(_rel_err(y_q, y_f), 0.02)  # measured ~0.010
    self.assertGreater(_rel_err(y_q, y_f), 0.0)
    self.assertLessEqual(len(np.unique(np.asarray(y_q))), 256)
    # lower precision costs more: W4A8 error larger than W8A8
    m_4 = QDense(64, cfg=dataclasses.replace(W8A8, weight_bits=4))
    y_4 = _apply(m_4, {"params": variables["params"], **_calibrate(m_4, variables, self.x)},
                    self.x)
    self.assertGreater(_rel_err(y_4, y_f), 2 * _rel_err(y_q, y_f))

  def test_outlier_token_recovers_per_token(self):
    # token 0 of every sequence is 100x larger (a "no-op"/sink-token outlier).
    x = self.x.at[:, 0, :].multiply(100.0)
    variables = QDense(64, cfg=W8A8).init(jax.random.key(1), x)
    params = {"params": variables["params"]}
    y_f = QDense(64).apply(params, x)
    normal = jnp.ones_like(y_f).at[:, 0, :].set(0.0)
    m = QDense(64, cfg=W8A8)
    y_t = _apply(m, {**params, **_calibrate(m, variables, x)}, x)
    m_tok = QDense(64, cfg=dataclasses.replace(W8A8, act_granularity="per_token"))
    y_k = _apply(m_tok, params, x)
    e_tensor, e_token = _rel_err(y_t, y_f, normal), _rel_err(y_k, y_f, normal)
    self.assertGreater(e_tensor, 0.3)  # measured ~0.64
    self.assertLess(e_token, 0.02)  # measured ~0.007

  def test_outlier_element_recovers_with_percentile(self):
    x = jax.random.normal(jax.random.key(3), (4, 64, 64))
    x = x.at[1, 5, 7].set(300.0)
    normal = jnp.ones_like(x).at[1, 5, 7].set(0.0)
    errs = {}
    for name in ("running_minmax", "percentile"):
      m = ActQuant(dataclasses.replace(W8A8, estimator=name), point="p")
      stats = _calibrate(m, m.init(jax.random.key(0), x), x)
      errs[name] = _rel_err(_apply(m, stats, x), x, normal)
    self.assertGreater(errs["running_minmax"], 0.3)
    self.assertLess(errs["percentile"], 0.02)

  def test_bf16_and_gradient(self):
    m = QDense(16, cfg=W8A8, dtype=jnp.bfloat16)
    variables = m.init(jax.random.key(1), self.x)
    stats = _calibrate(m, variables, self.x)
    y = _apply(m, {"params": variables["params"], **stats}, self.x)
    self.assertEqual(y.dtype, jnp.bfloat16)
    g = jax.grad(lambda p: jnp.sum(_apply(m, {"params": p, **stats}, self.x).astype(
        jnp.float32) ** 2))(variables["params"])
    chex.assert_tree_all_finite(g)
    self.assertGreater(float(jnp.sum(jnp.abs(g["kernel"]))), 0.0)


class QLayerNormTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.x = jax.random.normal(jax.random.key(0), (4, 8, 32)) * 3.0 + 1.0

  def test_float_matches_nn_layernorm(self):
    ref = nn.LayerNorm(epsilon=1e-5)
    variables = ref.init(jax.random.key(0), self.x)
    params = jax.tree.map(lambda p: p + jax.random.uniform(jax.random.key(5), p.shape),
                          variables["params"])
    got = QLayerNorm().init(jax.random.key(0), self.x)
    chex.assert_trees_all_equal_shapes_and_dtypes(got["params"], variables["params"])
    self.assertEqual(set(got["params"]), {"scale", "bias"})
    np.testing.assert_allclose(QLayerNorm().apply({"params": params}, self.x),
                               ref.apply({"params": params}, self.x), rtol=1e-5, atol=1e-5)

  def test_gradients_equal_autodiff_of_nn_layernorm(self):
    """QLayerNorm's backward is written out (quant.layers.standardize); its gradients with
    respect to the input, scale and bias must equal autodiff of flax's nn.LayerNorm, on rows
    with a large offset, a tiny spread, a constant row (where epsilon dominates) and an
    outlier channel, in float32 and from a bfloat16 input."""
    rows = np.random.default_rng(0).standard_normal((6, 5, 48)).astype(np.float32)
    rows[0] = rows[0] * 0.5 + 1000.0
    rows[1] *= 1e-3
    rows[2] = 7.0
    rows[3, :, 5] = 300.0
    w = jnp.asarray(np.random.default_rng(1).standard_normal(rows.shape), jnp.float32)
    params = jax.tree.map(lambda p: p + jax.random.uniform(jax.random.key(5), p.shape),
                          nn.LayerNorm().init(jax.random.key(0), rows)["params"])
    for dtype in (jnp.float32, jnp.bfloat16):
      if dtype == jnp.bfloat16:  # bfloat16's step is 4 near 1000: offset that row by 50
        rows[0] -= 950.0
      x = jnp.asarray(rows, dtype)
      # two-pass variance: flax's default E[x^2] - E[x]^2 loses the 1000-offset row in float32
      ref = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype)

      def loss(m, p, x):  # a non-linear read-out, so the cotangent is not uniform
        return jnp.sum(jnp.sin(m.apply({"params": p}, x).astype(jnp.float32)) * w)

      got = jax.grad(lambda p, x: loss(QLayerNorm(), p, x), argnums=(0, 1))(params, x)
      want = jax.grad(lambda p, x: loss(ref, p, x), argnums=(0, 1))(params, x)
      for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        self.assertEqual(g.dtype, r.dtype)
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        tol = 1e-5 if dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * float(np.abs(r).max()))

  def test_quantized_scale_and_output(self):
    m = QLayerNorm(cfg=W8A8, scale_init=nn.initializers.uniform(2.0))
    variables = m.init(jax.random.key(0), self.x)
    self.assertEqual(set(variables), {"params", QUANT_STATS})
    stats = _calibrate(m, variables, self.x)
    y = _apply(m, {"params": variables["params"], **stats}, self.x)
    self.assertLessEqual(len(np.unique(np.asarray(y))), 256)
    # the output range came from the LayerNorm output with the quantized scale
    scale = variables["params"]["scale"]
    m_noq = QLayerNorm(cfg=W8A8, quantize_output=False)
    y_noq = _apply(m_noq, {"params": variables["params"]}, self.x)
    y_f = QLayerNorm().apply({"params": variables["params"]}, self.x)
    s = float(jnp.max(jnp.abs(scale))) / 127.0
    sq = jnp.round(scale / s) * s
    bias = variables["params"]["bias"]
    np.testing.assert_allclose(y_noq, (y_f - bias) / scale * sq + bias, rtol=1e-4, atol=1e-5)
    self.assertLess(_rel_err(y, y_f), 0.02)


def test_gated_context_is_quantized_after_the_gate():
  """The output projection's input is the gated context on the 8-bit grid: at most 256
  distinct values (quantizing before the float gate left it a float tensor)."""
  from qtx.nn.attention import AttentionConfig, MultiHeadAttention
  x = jax.random.normal(jax.random.key(0), (4, 12, 16))
  for gate in ("linear", "mlp", "all_heads_linear", "elementwise"):
    mha = MultiHeadAttention(4, AttentionConfig(gate=gate), quant=W8A8)
    v = nn.meta.unbox(mha.init(jax.random.key(1), x))
    _, upd = mha.apply(v, x, mutable=[QUANT_STATS])
    seen = []

    def grab(next_fun, args, kwargs, context):
      if context.module.name == "out" and context.method_name == "__call__":
        seen.append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
      mha.apply({"params": v["params"], **upd}, x)
    ctx = np.asarray(seen[0])
    assert len(np.unique(ctx)) <= 256, (gate, len(np.unique(ctx)))
    # and the grid is the calibrated range of the gated context
    s = upd[QUANT_STATS]["context_quant"]
    grid = quant_grid(s["x_min"], s["x_max"], 8)
    q = ctx / np.asarray(grid.scale) + np.asarray(grid.zero_point)
    np.testing.assert_allclose(q, np.round(q), atol=2e-3)


class _ThreeDense(nn.Module):
  """Three QDense layers of one input, applied one by one or through fused_dense."""
  cfg: QuantConfig | None = None
  fused: bool = False

  @nn.compact
  def __call__(self, x):
    layers = [QDense(6, cfg=self.cfg, name=n) for n in ("a", "b", "c")]
    if self.fused:
      return fused_dense(layers, x)
    return [layer(x) for layer in layers]


@pytest.mark.parametrize("cfg", [None, W8A8, dataclasses.replace(W8A8, act_granularity="per_token")],
                         ids=["float", "w8a8_per_tensor", "w8a8_per_token"])
def test_fused_dense_equals_its_layers_one_by_one(cfg):
  """One stacked matmul, each layer's own quantized kernel and output quantizer: the same
  parameters (names included), outputs and gradients as calling the layers one by one."""
  x = jax.random.normal(jax.random.key(0), (3, 5, 8)) * 2.0
  sep, fused = _ThreeDense(cfg), _ThreeDense(cfg, fused=True)
  v = sep.init(jax.random.key(1), x)
  v_fused = fused.init(jax.random.key(1), x)
  chex.assert_trees_all_equal(v, v_fused)  # same tree, same initial values
  v = {**v, "params": jax.tree.map(lambda a: a + 0.3, v["params"])}  # non-zero biases
  if cfg is not None and cfg.act_granularity == "per_tensor":
    stats = _calibrate(sep, v, x, x * 0.5)
    chex.assert_trees_all_close(_calibrate(fused, v, x, x * 0.5), stats)
    v = {**v, **stats}

  def loss(params, x, module):
    ys = module.apply({**v, "params": params}, x)
    return sum(jnp.sum(y * (i + 1.0) * jnp.cos(y)) for i, y in enumerate(ys)), ys

  (l_sep, y_sep), g_sep = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      v["params"], x, sep)
  (l_fused, y_fused), g_fused = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      v["params"], x, fused)
  chex.assert_trees_all_close(y_fused, y_sep, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_sep)):  # sums reordered
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * float(jnp.max(jnp.abs(b))))
  assert [y.shape for y in y_fused] == [(3, 5, 6)] * 3
  if cfg is not None:  # the quantizers are active: the outputs differ from the float layers'
    y_float = _ThreeDense(None).apply({"params": v["params"]}, x)
    assert all(float(jnp.max(jnp.abs(a - b))) > 1e-3 for a, b in zip(y_fused, y_float))


def test_fused_dense_refuses_layers_of_different_width():
  class Mixed(nn.Module):
    @nn.compact
    def __call__(self, x):
      return fused_dense([QDense(4, name="a"), QDense(5, name="b")], x)

  with pytest.raises(ValueError, match="equal width"):
    Mixed().init(jax.random.key(0), jnp.ones((2, 3)))
