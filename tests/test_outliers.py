"""Outlier statistics: kurtosis, inf-norm, per-sequence reductions, summaries, plot."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx.quant import outliers


def _np_kurtosis(v):
  v = np.asarray(v, np.float64).ravel()
  d = v - v.mean()
  return np.mean(d ** 4) / np.mean(d ** 2) ** 2


class KurtosisTest(chex.TestCase):

  def test_hand_computed(self):
    # x = 1..4: mu 2.5, var 1.25, m4 2.5625 -> 1.64
    np.testing.assert_allclose(outliers.kurtosis(jnp.array([1.0, 2.0, 3.0, 4.0])), 1.64,
                               rtol=1e-6)
    # two-point symmetric distribution has the minimum kurtosis 1
    np.testing.assert_allclose(outliers.kurtosis(jnp.array([-1.0, 1.0] * 8)), 1.0, rtol=1e-6)

  def test_gaussian_is_3_uniform_is_1_8(self):
    key_g, key_u = jax.random.split(jax.random.key(0))
    g = jax.random.normal(key_g, (1_000_000,))
    u = jax.random.uniform(key_u, (1_000_000,), minval=-3.0, maxval=5.0)
    self.assertAlmostEqual(float(outliers.kurtosis(g)), 3.0, delta=0.1)
    self.assertAlmostEqual(float(outliers.kurtosis(u)), 1.8, delta=0.02)
    # shift/scale invariant
    np.testing.assert_allclose(outliers.kurtosis(7.0 * g + 3.0), outliers.kurtosis(g),
                               rtol=1e-3)

  def test_outlier_raises_kurtosis(self):
    x = np.random.default_rng(0).normal(size=10_000).astype(np.float32)
    x[17] = 100.0
    k = float(outliers.kurtosis(x))
    np.testing.assert_allclose(k, _np_kurtosis(x), rtol=1e-4)
    self.assertGreater(k, 500.0)

  def test_axis_and_constant(self):
    x = np.random.default_rng(1).normal(size=(3, 4, 50)).astype(np.float32)
    k = outliers.kurtosis(x, axis=(1, 2))
    np.testing.assert_allclose(k, [_np_kurtosis(x[i]) for i in range(3)], rtol=1e-5)
    chex.assert_shape(outliers.kurtosis(x, axis=-1, keepdims=True), (3, 4, 1))
    self.assertEqual(float(outliers.kurtosis(jnp.full((10,), 2.5))), 0.0)


class PerSequenceTest(chex.TestCase):

  def test_inf_norm_exact(self):
    x = np.zeros((3, 4, 5), np.float32)
    x[0, 1, 2] = -7.0
    x[0, 3, 4] = 6.5
    x[1, 0, 0] = 0.25
    x[2, 2, 1] = 3.0
    x[2, 3, 3] = -3.5
    np.testing.assert_array_equal(outliers.inf_norm_per_sequence(x), [7.0, 0.25, 3.5])

  def test_kurtosis_per_sequence_flattens_txd(self):
    x = np.random.default_rng(2).standard_t(4, size=(5, 6, 7)).astype(np.float32)
    np.testing.assert_allclose(outliers.kurtosis_per_sequence(x),
                               [_np_kurtosis(x[b]) for b in range(5)], rtol=1e-5)
    with pytest.raises(ValueError, match="B x T"):
      outliers.inf_norm_per_sequence(jnp.ones(4))


def _manual_summary(tensors):
  inf = {k: np.mean(np.abs(v).reshape(v.shape[0], -1).max(1)) for k, v in tensors.items()}
  kurt = {k: np.mean([_np_kurtosis(s) for s in v]) for k, v in tensors.items()}
  return inf, kurt


class SummaryTest(chex.TestCase):

  def _tensors(self, seed, batch):
    rng = np.random.default_rng(seed)
    t = {
        "block_0/out": rng.normal(size=(batch, 6, 8)).astype(np.float32),
        "block_0/ffn_out": rng.standard_t(3, size=(batch, 6, 8)).astype(np.float32),
        "block_1/out": rng.normal(size=(batch, 6, 8)).astype(np.float32) * 2,
    }
    t["block_1/out"][0, 0, 3] = 40.0
    return t

  @chex.variants(with_jit=True, without_jit=True)
  def test_summarize_equals_manual(self):
    t = self._tensors(0, 4)
    s = self.variant(outliers.summarize)(t)
    inf, kurt = _manual_summary(t)
    for k in t:
      np.testing.assert_allclose(s[f"inf_norm/{k}"], inf[k], rtol=1e-6)
      np.testing.assert_allclose(s[f"kurtosis/{k}"], kurt[k], rtol=1e-5)
    np.testing.assert_allclose(s["max_inf_norm"], max(inf.values()), rtol=1e-6)
    np.testing.assert_allclose(s["avg_kurtosis"], np.mean(list(kurt.values())), rtol=1e-5)
    self.assertEqual(float(s["max_inf_norm"]), float(s["inf_norm/block_1/out"]))

  def test_nested_intermediates_and_sow_tuples(self):
    a = np.ones((2, 3, 4), np.float32)
    b = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    tree = {"image": {"block_0": {"out": (a,), "pair": (a, b)}}}
    flat = outliers.flatten_intermediates(tree)
    self.assertEqual(sorted(flat), ["image/block_0/out", "image/block_0/pair/0",
                                    "image/block_0/pair/1"])
    s = outliers.summarize(tree)
    self.assertEqual(float(s["inf_norm/image/block_0/pair/1"]), (23.0 + 11.0) / 2)
    with pytest.raises(ValueError, match="empty"):
      outliers.summarize({})

  def test_scanned_layers_split_and_include(self):
    rng = np.random.default_rng(4)
    stacked = rng.normal(size=(3, 2, 5, 4)).astype(np.float32)  # L x B x T x D
    stacked[2, 1, 0, 0] = 50.0
    probs = rng.uniform(size=(3, 2, 2, 5, 5)).astype(np.float32)
    tree = {"enc": {"blocks": {"block": {"block_out": (stacked,), "attn": {"p": (probs,)}}}}}
    flat = outliers.flatten_intermediates(tree, scanned=("blocks",),
                                          include=outliers.TENSORS)
    self.assertEqual(sorted(flat), [f"enc/blocks_{i}/block/block_out" for i in range(3)])
    np.testing.assert_array_equal(flat["enc/blocks_2/block/block_out"], stacked[2])
    s = outliers.summarize(tree, scanned=("blocks",), include=outliers.TENSORS)
    np.testing.assert_allclose(s["max_inf_norm"], (50.0 + np.abs(stacked[2, 0]).max()) / 2,
                               rtol=1e-6)
    acc = outliers.OutlierAccumulator(scanned=("blocks",), include=outliers.TENSORS)
    acc.update(tree)
    np.testing.assert_allclose(acc.result()["avg_kurtosis"], s["avg_kurtosis"], rtol=1e-6)
    with pytest.raises(ValueError, match="matched none"):
      outliers.summarize(tree, include=("nothing",))

  def test_accumulator_equals_summary_of_concatenation(self):
    batches = [self._tensors(s, b) for s, b in ((1, 3), (2, 5), (3, 1))]
    acc = outliers.OutlierAccumulator()
    for t in batches:
      acc.update(t)
    everything = {k: np.concatenate([t[k] for t in batches]) for k in batches[0]}
    ref = outliers.summarize(everything)
    got = acc.result()
    self.assertEqual(set(got), set(ref))
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, err_msg=k)
      self.assertIsInstance(got[k], float)
    self.assertEqual(acc.num_sequences["block_0/out"], 9)
    acc.reset()
    acc.update(batches[0])
    np.testing.assert_allclose(acc.result()["max_inf_norm"],
                               outliers.summarize(batches[0])["max_inf_norm"], rtol=1e-6)


class PlotTest(chex.TestCase):

  def test_plot_writes_png(self):
    tmp = self.create_tempdir()
    t = SummaryTest()._tensors(0, 2)
    per_norm = {"softmax": outliers.summarize(t),
                "clipped_softmax": {"inf_norm": {"block_0/out": 2.0, "block_1/out": 3.0},
                                    "kurtosis": {"block_0/out": 3.1, "block_1/out": 4.0}}}
    path = outliers.plot_outliers(per_norm, f"{tmp.full_path}/outliers.png", title="tiny")
    with open(path, "rb") as f:
      data = f.read()
    self.assertEqual(data[:8], b"\x89PNG\r\n\x1a\n")
    self.assertGreater(len(data), 5000)
    self.assertEqual(outliers.per_layer_values(per_norm["softmax"], "inf_norm").keys(),
                     {"block_0/out", "block_0/ffn_out", "block_1/out"})
