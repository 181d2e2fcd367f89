"""softmax_with_sink against its formula (numpy, float64), its gradient against the written-out
one (PAPERS.md section 8), and the learned per-head sink in the attention module."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import micro_config

from qtx.nn import normalizers as N
from qtx.nn.attention import AttentionConfig, MultiHeadAttention


def ref(x, sink, where=None):
  """exp(x_j) / (exp(sink) + sum_k exp(x_k)) over the last axis, float64, shifted by the max."""
  x = np.asarray(x, np.float64)
  w = np.ones(x.shape, bool) if where is None else np.broadcast_to(where, x.shape)
  b = np.broadcast_to(np.asarray(sink, np.float64), x.shape[:-1] + (1,))
  xm = np.where(w, x, -np.inf)
  m = np.maximum(xm.max(-1, keepdims=True), b)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.where(w, np.exp(xm - m), 0.0)
  s = e.sum(-1, keepdims=True) + np.exp(b - m)
  return np.where(s > 0, e / np.where(s > 0, s, 1.0), 0.0)


B, H, T = 2, 3, 5
rng = np.random.default_rng(0)
X = rng.normal(size=(B, H, T, T)).astype(np.float32) * 3
CAUSAL = np.tril(np.ones((T, T), bool))[None, None]
PAD = np.ones((B, 1, 1, T), bool)
PAD[1, ..., 3:] = False


@pytest.mark.parametrize("sink", [0.0, -1.5, np.array([0.5, -2.0, 1.0])[:, None, None],
                                  rng.normal(size=(B, H, T, 1))], ids=["zero", "scalar",
                                                                       "per_head", "per_row"])
@pytest.mark.parametrize("where", [None, CAUSAL, PAD, CAUSAL & PAD],
                         ids=["none", "causal", "padding", "causal_padding"])
def test_equals_the_formula(sink, where):
  y = np.asarray(N.softmax_with_sink(jnp.asarray(X), sink, where=where))
  np.testing.assert_allclose(y, ref(X, sink, where), rtol=2e-6, atol=1e-7)
  if where is not None:
    assert np.all(y[~np.broadcast_to(where, y.shape)] == 0.0)
  assert np.all(y.sum(-1) < 1.0)  # a finite sink always keeps some mass


def test_minus_inf_sink_is_softmax_and_empty_rows_are_zero():
  y = N.softmax_with_sink(jnp.asarray(X), -jnp.inf, where=CAUSAL)
  np.testing.assert_allclose(y, N.softmax(jnp.asarray(X), where=CAUSAL), rtol=1e-6, atol=1e-7)
  none = np.zeros((1, 1, 2, T), bool)
  for sink in (-jnp.inf, 0.0, 3.0):
    y = np.asarray(N.softmax_with_sink(jnp.ones((1, 1, 2, T)), sink, where=none))
    assert np.all(y == 0.0) and not np.any(np.isnan(y))
    g = jax.grad(lambda x: jnp.sum(N.softmax_with_sink(x, sink, where=none)))(jnp.ones((1, 1, 2, T)))
    assert not np.any(np.isnan(np.asarray(g)))


@pytest.mark.parametrize("scale", [1e2, 1e3, 1e4])
def test_exact_for_large_scores(scale):
  x = X * scale
  for sink in (0.0, scale, -scale):
    y = np.asarray(N.softmax_with_sink(jnp.asarray(x), sink, where=CAUSAL))
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, ref(x, sink, CAUSAL), rtol=2e-6, atol=1e-7)


def test_gradient_equals_the_written_out_one():
  """dS_ij = p_ij (dP_ij - D_i) and db = -sum_i p_sink,i D_i with D_i = sum_j p_ij dP_ij."""
  sink = jnp.asarray([0.5, -2.0, 1.0])[:, None, None]
  g = jnp.asarray(rng.normal(size=X.shape), jnp.float32)
  f = lambda x, b: jnp.sum(N.softmax_with_sink(x, b, where=CAUSAL) * g)
  dx, db = jax.grad(f, argnums=(0, 1))(jnp.asarray(X), sink)
  p = ref(X, sink, CAUSAL)
  D = np.sum(p * np.asarray(g), -1, keepdims=True)
  p_sink = 1.0 - p.sum(-1, keepdims=True)
  np.testing.assert_allclose(dx, p * (np.asarray(g) - D), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(db, -np.sum(p_sink * D, axis=(0, 2), keepdims=True)[0],
                             rtol=1e-5, atol=1e-6)


def test_bad_sink_shapes_and_values_are_errors():
  with pytest.raises(ValueError, match="does not broadcast"):
    N.softmax_with_sink(jnp.asarray(X), jnp.zeros((H,)))  # must be (H, 1, 1) for B x H x T x S
  with pytest.raises(ValueError, match="sink_init: a learned sink needs a finite"):
    AttentionConfig(normalizer="softmax_sink", sink_init=float("-inf"))
  AttentionConfig(normalizer="softmax_sink", impl="pallas")  # the two-pass kernel has a sink


def test_attention_learns_one_sink_per_head_and_a_fixed_one_is_no_parameter():
  x = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
  learned = MultiHeadAttention(2, AttentionConfig(normalizer="softmax_sink", sink_init=0.25))
  params = learned.init(jax.random.key(0), x)["params"]
  np.testing.assert_array_equal(np.asarray(params["sink"].unbox()
                                           if hasattr(params["sink"], "unbox") else params["sink"]),
                                [0.25, 0.25])
  fixed = MultiHeadAttention(2, AttentionConfig(normalizer="softmax_sink", sink_init=0.25,
                                                sink_learned=False))
  fparams = fixed.init(jax.random.key(0), x)["params"]
  assert "sink" not in fparams
  # same weights: the learned sink at its initial value computes what the fixed one does
  p = {k: v for k, v in params.items() if k != "sink"}
  np.testing.assert_allclose(learned.apply({"params": params}, x),
                             fixed.apply({"params": p}, x), rtol=1e-6, atol=1e-6)
  # and the sink gets a gradient
  g = jax.grad(lambda q: jnp.sum(learned.apply({"params": q}, x) ** 2))(params)
  assert np.all(np.abs(np.asarray(jax.tree.leaves(g["sink"])[0])) > 0)


def test_softmax_sink_trains_and_its_loss_falls(tmp_path):
  from qtx import modes
  c = micro_config(**{"train.total_steps": 16, "train.log_every": 2, "train.lr": 3e-3})
  for t in (c.model.image, c.model.text):
    t.attention.normalizer = "softmax_sink"
  out = modes.run(c, str(tmp_path))
  from qtx import metrics
  losses = [r["train/loss"] for r in metrics.read(str(tmp_path)) if "train/loss" in r]
  assert losses[-1] < losses[0] - 0.2, losses
  assert np.isfinite(out["train/loss"])
  # the fake-quantized model calibrates and evaluates (the sink logits stay float parameters)
  c.mode, c.init_from, c.quant.calib_batches = "ptq", str(tmp_path), 2
  q = modes.run(c, str(tmp_path / "ptq"))
  assert 0.0 <= q["ptq/w8a8_zeroshot_top1"] <= 1.0 and np.isfinite(q["outliers/max_inf_norm"])
  assert q["ptq/fp_zeroshot_top1"] == out["eval/zeroshot_top1"]
