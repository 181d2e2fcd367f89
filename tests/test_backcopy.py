"""The Bigram-Backcopy task, the causal LM on qtx's blocks, and the study's probe metrics
(qtx.analysis.backcopy) against their definitions."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx.analysis import backcopy
from qtx.data.bigram_backcopy import BOS, BigramBackcopy


def test_sequences_follow_the_bigram_and_copy_after_triggers():
  task = BigramBackcopy(vocab_size=16, seq_len=24, num_triggers=3, seed=3)
  x = task.batch(5, 400)
  assert x.shape == (400, 24) and x.dtype == np.int32
  assert np.all(x[:, 0] == BOS) and np.all(x[:, 1:] >= 1)
  assert not np.isin(x[:, 1], task.triggers).any()
  trig = task.trigger_mask(x)
  assert not trig[:, 0].any()
  # after every trigger the token before it is copied
  b, t = np.nonzero(trig[:, 1:-1])
  t = t + 1
  np.testing.assert_array_equal(x[b, t + 1], x[b, t - 1])
  # elsewhere transitions follow the bigram: empirical rows approach P (many samples)
  P = task.transition
  big = task.batch(6, 4000)
  tr = task.trigger_mask(big)
  counts = np.zeros_like(P)
  src, dst = big[:, 1:-1][~tr[:, 1:-1]], big[:, 2:][~tr[:, 1:-1]]
  np.add.at(counts, (src - 1, dst - 1), 1)
  rows = counts.sum(1) > 2000
  np.testing.assert_allclose(counts[rows] / counts[rows].sum(1, keepdims=True), P[rows], atol=0.03)
  # the triggers are the most frequent tokens of the chain's stationary distribution
  pi = np.linalg.matrix_power(P, 200)[0]
  np.testing.assert_array_equal(task.triggers, np.sort(1 + np.argsort(-pi)[:3]))
  # batches are a pure function of their index
  np.testing.assert_array_equal(task.batch(5, 400), x)
  assert not np.array_equal(task.batch(7, 400), x)


def test_bad_task_parameters_are_named():
  with pytest.raises(ValueError, match="vocab_size 5 is too small"):
    BigramBackcopy(vocab_size=5, num_triggers=3)
  with pytest.raises(ValueError, match="seq_len"):
    BigramBackcopy(seq_len=2)


def _model_and_params(preset="softmax", seed=0):
  c = backcopy.study_config(preset)
  task, make = backcopy.build(c)
  model = make()
  x = task.batch(0, 8)
  params = nn.meta.unbox(model.init(jax.random.key(seed), x)["params"])
  return c, task, model, params


def test_causal_lm_is_causal():
  _, task, model, params = _model_and_params()
  x = task.batch(0, 4)
  y = x.copy()
  y[:, 20:] = (y[:, 20:] % 60) + 1
  a, b = model.apply({"params": params}, x), model.apply({"params": params}, y)
  np.testing.assert_allclose(a[:, :20], b[:, :20], atol=1e-5)
  assert not np.allclose(a[:, 20:], b[:, 20:], atol=1e-3)


def test_probe_metrics_in_closed_form_with_uniform_attention():
  """Query and key kernels and biases zeroed: row t spreads 1/(t+1) over its keys, so the BOS
  mass of a query at t is 1/(t+1); the learned sink with logit b takes e^b/(e^b + t + 1)."""
  for preset in ("softmax", "softmax_sink"):
    c, task, model, params = _model_and_params(preset)
    zero = lambda path, a: (jnp.zeros_like(a) if any(getattr(k, "key", "") in ("query", "key")
                                                     for k in path) else a)
    params = jax.tree_util.tree_map_with_path(zero, params)
    x = task.batch(1, 64)
    trig = task.trigger_mask(x)
    m = jax.device_get(backcopy.make_probe(model, 2)(params, x, trig))
    T = x.shape[1]
    b = float(np.asarray(params["encoder"]["block_0"]["attn"]["sink"])[0]) if preset != "softmax" \
        else -np.inf
    t = np.arange(T)[None].repeat(64, 0).astype(np.float64)
    bos = 1.0 / (np.exp(b) + t + 1)
    q = t >= 1
    np.testing.assert_allclose(m["L0/bos_mass_dormant"], bos[q & ~trig].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["L0/bos_mass_active"], bos[q & trig].mean(), rtol=1e-5)
    null = (np.exp(b) / (np.exp(b) + t + 1))[q].mean()
    np.testing.assert_allclose(m["L1/null_mass"], null, rtol=1e-5, atol=1e-7)
    # equal scores everywhere: zero range
    assert m["L0/score_range"] == 0.0 and m["L0/score_absmax"] == 0.0
    # norms against the captured tensors recomputed here
    _, st = model.apply({"params": params}, x, mutable=["intermediates"])
    h = np.asarray(st["intermediates"]["encoder"]["block_1"]["block_out"][0])
    np.testing.assert_allclose(m["L1/resid_norm_bos"], np.linalg.norm(h[:, 0], axis=-1).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(m["L1/resid_absmax_other"], np.abs(h[:, 1:]).max(), rtol=1e-6)


def test_quantized_metrics_order_by_bits():
  c, task, model, params = _model_and_params()
  _, make = backcopy.build(c)
  probe = task.batch(backcopy.PROBE_INDEX, 128)
  fl = float(np.mean(np.asarray(backcopy._losses(model.apply({"params": params}, probe),
                                                 jnp.asarray(probe)))))
  q = backcopy.quantized_metrics(make, params, task, fl, calib_batches=2, probe=probe)
  for s in backcopy.QUANT_SETTINGS:
    np.testing.assert_allclose(q[f"{s}/loss_increase"], q[f"{s}/loss"] - fl, rtol=1e-6)
  assert abs(q["w8a8/loss_increase"]) < abs(q["w4a8/loss_increase"])


def test_study_end_to_end_is_resumable(tmp_path):
  out = tmp_path / "t.md"
  args = ["--presets", "softmax,clipped_softmax", "--seeds", "0", "--steps", "16",
          "--eval_every", "8", "--workdir", str(tmp_path / "w"), "--out", str(out)]
  finals = backcopy.main(args)
  assert list(finals) == ["softmax", "clipped_softmax"]
  hist = (tmp_path / "w" / "softmax" / "seed0" / "history.jsonl").read_text().splitlines()
  assert len(hist) == 3  # steps 0, 8, 16
  text = out.read_text()
  assert "| softmax | 1 |" in text and "| clipped_softmax | 1 |" in text
  assert "W8A8 loss increase" in text and (tmp_path / "t.png").exists()
  # the loss fell
  f = finals["softmax"][0]
  import json
  first = json.loads(hist[0])
  assert f["loss"] < first["loss"] - 0.3
  # a second call reuses done.json
  mtime = (tmp_path / "w" / "softmax" / "seed0" / "done.json").stat().st_mtime
  assert backcopy.main(args)["softmax"][0] == f
  assert (tmp_path / "w" / "softmax" / "seed0" / "done.json").stat().st_mtime == mtime
  with pytest.raises(SystemExit, match="unknown"):
    backcopy.main(["--presets", "registers"])
