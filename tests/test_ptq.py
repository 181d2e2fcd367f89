"""PTQ driver: end-to-end run with ablation, bit widths vs embedding error, figures."""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import micro_config

from qtx import checkpoint as ckpt_lib
from qtx import metrics
from qtx.run import build_model
from qtx.quant.layers import QUANT_STATS, QDense, QLayerNorm, QuantConfig, quantize_weight
from qtx.analysis import ablation
from qtx.modes import eval as eval_mode
from qtx.analysis import outliers as outlier_lib
from qtx.modes import ptq as ptq_mode
from qtx.analysis import quantized
from qtx import run as run_lib
from qtx.analysis import figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(**kw):
  c = micro_config(**{"model.image.depth": 1, "model.text.depth": 1, "quant.calib_batches": 2,
                      "eval.num_samples": 16, "data.synthetic.eval_size": 16, "eval.batch_size": 16, **kw})
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config, workdir, setup, params) of an initialised model saved as a step-0 checkpoint."""
  workdir = str(tmp_path_factory.mktemp("ptq_run"))
  c = _config()
  s = run_lib.build(c, train=True)
  state = run_lib.init_state(s, c.seed)
  mgr = ckpt_lib.Manager(os.path.join(workdir, "checkpoints"), c, async_save=False)
  mgr.save(0, state, force=True)
  mgr.close()
  return c, workdir, s, state.params


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
  """XLA backend optimisations off while this module compiles its many small programs (about
  half the compile time; the same operations run)."""
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def _assert_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC, path
  import matplotlib.image
  img = matplotlib.image.imread(path)
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, img.shape
  assert np.std(img[..., :3]) > 0.01  # not a blank canvas


def test_run_ptq_end_to_end_with_ablation(run, tmp_path, capsys):
  c, ckpt_dir, _, _ = run
  c = _config(init_from=ckpt_dir)
  workdir = str(tmp_path)
  out = ptq_mode.run(c, workdir, ablate=True)
  printed = capsys.readouterr().out

  row = metrics.read(workdir)[-1]
  assert row["step"] == 0
  for k in ("zeroshot_top1", "i2t_r1", "t2i_r1"):
    for label in ("fp", "w8a8"):
      assert 0.0 <= row[f"ptq/{label}_{k}"] <= 1.0
  for k in ("outliers/max_inf_norm", "outliers/avg_kurtosis", "outliers/image/max_inf_norm",
            "outliers/text/avg_kurtosis", "outliers/image/inf_norm/block_0/ffn_out",
            "outliers/text/kurtosis/block_0/block_out", "ptq/calib_seconds",
            "ptq/calib_overhead", "ptq/quant_eval_overhead"):
    assert k in row and np.isfinite(row[k]) and row[k] > 0, k
  assert row["ptq/calib_batches"] == 2
  # the float row is eval mode's evaluation of the same checkpoint, exactly
  ev = eval_mode.run(_config(init_from=ckpt_dir, mode="eval"), str(tmp_path / "eval"))
  for k in ("zeroshot_top1", "i2t_r1", "t2i_r1"):
    assert row[f"ptq/fp_{k}"] == ev[f"eval/{k}"], k
  assert row["outliers/max_inf_norm"] == ev["outliers/max_inf_norm"]
  assert row["outliers/max_inf_norm"] == max(row["outliers/image/max_inf_norm"],
                                             row["outliers/text/max_inf_norm"])
  # ablation: one entry per point class, each with the table metrics, also in the row
  names = list(ablation.POINT_CLASSES)
  assert list(out["ablation"]) == names
  for n in names:
    assert set(out["ablation"][n]) >= {"zeroshot_top1", "i2t_r1", "t2i_r1"}
    assert row[f"ptq/ablate/{n}/i2t_r1"] == out["ablation"][n]["i2t_r1"]
  # the table and the figures
  text = printed
  assert "zero-shot top-1" in text and "\nfp " in text and "\nw8a8 " in text
  assert "w8a8 (attn_probs float)" in text
  figs = sorted(os.listdir(os.path.join(workdir, "figures")))
  assert figs == ["attention_image.png", "attention_text.png", "outliers.png"]
  for f in figs:
    _assert_png(os.path.join(workdir, "figures", f))


def test_named_settings_equal_runs_with_their_fields(run, tmp_path):
  """quant.settings=w8a8_token,w4a8 adds ptq/<name>_* metrics; w8a8_token's equal a PTQ run
  whose quant block sets the same fields (calibrated on the same batches); the float
  attention mass is written alongside the outliers."""
  c, ckpt_dir, _, _ = run
  out = ptq_mode.run(_config(init_from=ckpt_dir, **{"quant.settings": "w8a8_token,w4a8"}),
                     str(tmp_path / "named"))
  token = ptq_mode.run(_config(init_from=ckpt_dir, **{"quant.act_granularity": "per_token"}),
                       str(tmp_path / "token"))
  for k in ("zeroshot_top1", "i2t_r1", "t2i_r1"):
    assert out[f"ptq/w8a8_token_{k}"] == token[f"ptq/w8a8_{k}"], k
    assert 0.0 <= out[f"ptq/w4a8_{k}"] <= 1.0, k
  for k in ("attn/image/null_mass", "attn/image/first_key_mass", "attn/text/top_key_mass",
            "attn/image/background_mass"):
    assert np.isfinite(out[k]), k
  assert abs(out["attn/image/null_mass"]) < 1e-6  # softmax rows sum to 1
  with pytest.raises(ValueError, match="quant.settings: unknown setting"):
    from qtx import config_lib
    config_lib.validate(_config(**{"quant.settings": "w8a8,w3a3"}))
  # the config's own setting in the list: skipped when it is the same, refused when it is not
  c = _config(**{"quant.settings": "w8a8,w8a8_token"})
  q = quantized.quant_config(c)
  assert ptq_mode._named_settings(c, quantized.bits_label(q), q) == ["w8a8_token"]
  c.quant.weight_granularity = "per_channel"
  q = quantized.quant_config(c)
  with pytest.raises(ValueError, match="'w8a8', the label of the config's own setting"):
    ptq_mode._named_settings(c, quantized.bits_label(q), q)


def test_named_settings_are_what_their_names_say():
  """w<W>a<A> in a setting's name is its bit widths; '_token' means dynamic per-token
  activations, '_channel' per-channel weights; W4 weights are per channel (docs)."""
  c = _config()
  for name, fields in quantized.SETTINGS.items():
    q = quantized.quant_config(c, **fields)
    assert quantized.bits_label(q) == name.split("_")[0], name
    assert (q.act_granularity == "per_token") == name.endswith("_token"), name
    want_channel = name.endswith("_channel") or q.weight_bits < 8
    assert (q.weight_granularity == "per_channel") == want_channel, name
  assert set(quantized.SETTINGS) >= {"w8a8", "w8a8_token", "w4a8"}


@pytest.fixture(scope="module")
def calibrated(run):
  """W8A8 model of `run` calibrated on 2 training batches; a third batch is held out."""
  c, _, s, params = run
  model = build_model(c, quant=quantized.quant_config(c))
  batches = ptq_mode.calibration_batches(c, s, 3)
  stats0 = quantized.init_quant_stats(model, c)
  stats, times = quantized.calibrate(model, params, stats0, batches[:2])
  return {"model": model, "batches": batches, "stats0": stats0, "stats": stats, "times": times}


def test_init_quant_stats_and_calibration_counts(run, calibrated):
  c, _, s, _ = run
  leaves = jax.tree_util.tree_leaves_with_path(calibrated["stats0"])
  assert leaves and all(float(v) == 0 for _, v in leaves)
  assert len(calibrated["times"]) == 2
  stats = calibrated["stats"]
  assert jax.tree.structure(stats) == jax.tree.structure(calibrated["stats0"])

  def leaves_named(name):
    return [float(v) for p, v in jax.tree_util.tree_leaves_with_path(stats)
            if jax.tree_util.keystr(p).endswith(f"['{name}']")]

  assert set(leaves_named("count")) == {2.0}
  # raw ranges (the grid adds 0): ordered, and the quantizers saw non-trivial activations
  assert all(lo < hi for lo, hi in zip(leaves_named("x_min"), leaves_named("x_max")))
  assert max(leaves_named("x_max")) > 0.1
  # attention probabilities: the calibrated range lies inside [0, 1]
  for path, v in jax.tree_util.tree_leaves_with_path(stats):
    name = jax.tree_util.keystr(path)
    if "probs_quant" in name and not name.endswith("['count']"):
      assert 0.0 <= float(v) <= 1.0, name
  with pytest.raises(ValueError, match="calib_batches must be >= 1"):
    ptq_mode.calibration_batches(c, s, 0)


def test_w16a16_evaluates_like_float(run, calibrated):
  """A 16-bit grid is float for every purpose here: the same zero-shot and retrieval metrics
  as the float model on the same task (an error in the quantized forward would show)."""
  c, _, s, params = run
  from qtx.data import pipeline
  task = pipeline.eval_task(c)
  q = quantized.quant_config(c, weight_bits=16, act_bits=16)
  model = build_model(c, quant=q)
  stats, _ = quantized.calibrate(model, params, quantized.init_quant_stats(model, c), calibrated["batches"][:2])
  got, _ = quantized.quantized_metrics(model, params, stats, task, 16, prefix="")
  enc_i, enc_t = run_lib.make_encoders(s)
  want, _ = quantized.timed_evaluate(lambda x: enc_i(params, x), lambda x: enc_t(params, x), task, 16,
                               prefix="")
  for k in ("zeroshot_top1", "i2t_r1", "t2i_r1"):
    assert got[k] == want[k], (k, got[k], want[k])


def test_per_token_activations_need_no_calibration(run):
  c, _, s, params = run
  c = _config(**{"quant.act_granularity": "per_token"})
  model = build_model(c, quant=quantized.quant_config(c))
  stats, batches, timing = ptq_mode._calibrate_timed(c, s, model, params, keep_batches=False)
  assert stats == {} and batches is None
  assert timing == {"ptq/calib_batches": 0, "ptq/calib_seconds": 0.0}


def test_bit_widths_order_the_embedding_error(run, calibrated):
  """Mean cosine distance between float and quantized embeddings of both towers on a held-out
  batch, each bit width calibrated on the same batch (one compiled program per width)."""
  c, _, s, params = run
  calib, held = calibrated["batches"][0], calibrated["batches"][2]
  fp = jax.jit(lambda p: s.model.apply({"params": p}, held["image"], held["tokens"])[:2])(params)

  def error(weight_bits, act_bits):
    model = build_model(c, quant=quantized.quant_config(c, weight_bits=weight_bits, act_bits=act_bits))

    def f(p, st):
      _, upd = model.apply({"params": p, "quant_stats": st}, calib["image"], calib["tokens"],
                           mutable=["quant_stats"])
      return model.apply({"params": p, **upd}, held["image"], held["tokens"])[:2]

    q = jax.jit(f)(params, calibrated["stats0"])
    return [float(1.0 - jnp.mean(jnp.sum(a * b, -1))) for a, b in zip(fp, q)]

  err = {wa: error(*wa) for wa in ((8, 8), (6, 8), (4, 8), (8, 16))}
  # Tolerance: W8A8 within 1e-2 of float in cosine distance on both towers (measured ~1e-3).
  assert max(err[8, 8]) < 1e-2, err
  for tower in (0, 1):
    assert err[4, 8][tower] > 3 * err[8, 8][tower], err  # 4-bit weights: clearly worse
    assert err[6, 8][tower] > err[8, 8][tower], err
    assert err[8, 16][tower] <= err[8, 8][tower], err  # 16-bit activations: no worse


def test_quant_config_labels_and_errors():
  c = _config(**{"quant.weight_bits": 4, "quant.act_bits": 16})
  c.quant.ablate = True  # a driver key: QuantConfig never sees it
  q = quantized.quant_config(c)
  assert q.enabled and (q.weight_bits, q.act_bits) == (4, 16)
  assert quantized.bits_label(q) == "w4a16"
  assert quantized.bits_label(quantized.quant_config(_config())) == "w8a8"
  assert quantized.bits_label(quantized.quant_config(c, weight_bits=6, act_bits=8)) == "w6a8"
  with pytest.raises(ValueError, match=r"unknown quantization point class 'softmax'; choose"):
    ablation.check_point_class("softmax")
  with pytest.raises(ValueError, match=r"unknown activation point class 'weights'"):
    ablation.keep_mask(["weights"])
  np.testing.assert_array_equal(ablation.keep_mask(["embed", "ln_out"]),
                                [c in ("embed", "ln_out") for c in ablation.ACT_CLASSES])
  w = ablation.float_weights_config(q)
  assert w.weight_bits == q.weight_bits and w.act_bits == q.act_bits
  assert w.keep_float == q.keep_float + ("weights",)
  assert ablation.POINT_CLASSES[-1] == "weights" and len(set(ablation.POINT_CLASSES)) == 10


def test_keep_mask_selects_one_output_class_exactly():
  cfg = QuantConfig(enabled=True, act_granularity="per_token", act_bits=4)
  layer = QDense(8, cfg=cfg)
  x = jax.random.normal(jax.random.key(0), (3, 5))
  params = layer.init(jax.random.key(1), x)
  k, b = params["params"]["kernel"], params["params"]["bias"]
  want = x @ quantize_weight(k, cfg) + b  # quantized weight, float output
  with nn.intercept_methods(ablation.keep_float_interceptor(ablation.keep_mask(["linear_out"]))):
    got = layer.apply(params, x)
  np.testing.assert_array_equal(got, want)
  quantized = layer.apply(params, x)
  assert float(jnp.max(jnp.abs(quantized - want))) > 1e-3
  with nn.intercept_methods(ablation.keep_float_interceptor(ablation.keep_mask(["ln_out", "resid"]))):
    np.testing.assert_array_equal(layer.apply(params, x), quantized)  # other classes: untouched


def test_masked_model_equals_keep_float_model(run, calibrated):
  """The runtime mask used by the ablation gives the same embeddings as listing the point in
  QuantConfig.keep_float, and an all-False mask gives the plain quantized model."""
  c, _, _, params = run
  model, stats = calibrated["model"], calibrated["stats"]
  images = np.asarray(calibrated["batches"][2]["image"])
  enc_masked, _ = ablation.make_masked_encoders(model)
  enc_plain, _ = quantized.make_quant_encoders(model)
  kept = build_model(c, quant=dataclasses.replace(
      model.quant, keep_float=model.quant.keep_float + ("attn_probs",)))
  enc_kept, _ = quantized.make_quant_encoders(kept)
  none, probs = ablation.keep_mask([]), ablation.keep_mask(["attn_probs"])
  z_none = enc_masked(params, stats, none, images)
  z_probs = enc_masked(params, stats, probs, images)
  np.testing.assert_allclose(z_none, enc_plain(params, stats, images), atol=1e-6)
  np.testing.assert_allclose(z_probs, enc_kept(params, stats, images), atol=1e-6)
  assert float(jnp.max(jnp.abs(z_probs - z_none))) > 1e-4


def test_format_table():
  t = ptq_mode.format_table({"fp": {"zeroshot_top1": 0.5, "i2t_r1": 0.25, "t2i_r1": 0.125},
                        "w8a8": {"zeroshot_top1": 0.4}}, title="T")
  lines = t.splitlines()
  assert lines[0] == "T" and lines[1].split()[0] == "model"
  assert lines[2].split() == ["fp", "50.0%", "25.0%", "12.5%"]
  assert lines[3].split() == ["w8a8", "40.0%", "-", "-"]


# ----------------------------------------------------------------------------- figures

def test_select_heads_finds_the_sink_head():
  B, H, T = 2, 3, 5
  uniform = np.full((B, H, T, T), 1.0 / T, np.float32)
  uniform[:, 2] = 0.0
  uniform[:, 2, :, 3] = 1.0  # head 2 puts all its mass on key 3 (a no-op head)
  small = np.ones((B, T, 4), np.float32)
  layers = {"block_0": {"attn_probs": uniform, "block_out": small},
            "block_1": {"attn_probs": np.full((B, H, T, T), 1.0 / T, np.float32),
                        "block_out": 10 * small}}
  mass, key = figures.sink_scores(uniform)
  np.testing.assert_allclose(mass, [0.2, 0.2, 1.0], rtol=1e-6)
  assert key[2] == 3
  heads = figures.select_heads(layers, {"block_0": 50.0, "block_1": 3.0}, num_layers=1,
                               heads_per_layer=1)
  assert heads == [figures.HeadChoice("block_0", 2, 50.0, 1.0, 3)]
  # without given inf-norms the captured block outputs rank the layers
  heads = figures.select_heads(layers, None, num_layers=1, heads_per_layer=2)
  assert [h.layer for h in heads] == ["block_1", "block_1"]
  assert heads[0].layer_inf_norm == 10.0


def test_per_layer_from_metrics_names():
  m = {"outliers/image/inf_norm/block_0/ffn_out": 2.0,
       "outliers/image/kurtosis/block_0/ffn_out": 3.0,
       "outliers/text/inf_norm/encoder/blocks_1/block/block_out": 4.0,  # scan, with prefix
       "outliers/inf_norm/encoder/block_2/ffn_out": 5.0,  # single model
       "outliers/max_inf_norm": 9.0, "eval/i2t_r1": 0.5}
  got = figures.per_layer_from_metrics(m)
  assert got == {
      "image": {"inf_norm": {"block_0/ffn_out": 2.0}, "kurtosis": {"block_0/ffn_out": 3.0}},
      "text": {"inf_norm": {"block_1/block_out": 4.0}, "kurtosis": {}},
      "": {"inf_norm": {"block_2/ffn_out": 5.0}, "kurtosis": {}},
  }


def _fake_run(root, name, normalizer, gate, scale):
  d = os.path.join(root, name)
  os.makedirs(d)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump({"model": {"image": {"attention": {"normalizer": normalizer, "gate": gate}}}}, f)
  row = {"step": 10, "outliers/max_inf_norm": 3.0 * scale}
  for tower in ("image", "text"):
    for i in range(2):
      for t in ("block_out", "ffn_out"):
        row[f"outliers/{tower}/inf_norm/block_{i}/{t}"] = scale * (1 + i)
        row[f"outliers/{tower}/kurtosis/block_{i}/{t}"] = 3.0 + scale * i
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 10, "train/loss": 1.0}) + "\n")
    f.write(json.dumps(row) + "\n")
    f.write(json.dumps({"step": 11, "eval/i2t_r1": 0.5}) + "\n")
  return d


def test_compare_outliers_side_by_side(tmp_path):
  dirs = [_fake_run(tmp_path, "a", "softmax", "none", 10.0),
          _fake_run(tmp_path, "b", "softmax", "linear", 2.0),
          _fake_run(tmp_path, "c", "clipped_softmax", "none", 1.0),
          _fake_run(tmp_path, "d", "clipped_softmax", "none", 1.5)]
  assert [figures.run_label(d) for d in dirs] == ["softmax", "gated", "clipped_softmax",
                                                  "clipped_softmax"]
  row = figures.last_outlier_row(dirs[0])
  assert row["outliers/max_inf_norm"] == 30.0
  path = figures.compare_outliers(dirs, str(tmp_path / "cmp.png"), title="normalizers")
  _assert_png(path)
  _assert_png(figures.main([str(tmp_path / "cli.png"), *dirs[:2], "--names", "vanilla,gated"]))
  with pytest.raises(ValueError, match="2 names for 4 workdirs"):
    figures.compare_outliers(dirs, str(tmp_path / "x.png"), names=["a", "b"])
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 2.0}) + "\n")
  with pytest.raises(ValueError, match="no row with per-layer outlier statistics"):
    figures.compare_outliers([str(empty)], str(tmp_path / "y.png"))


def test_text_padding_changes_no_calibration_range_or_outlier_statistic():
  """Whatever follows the end-of-text token cannot reach the text embedding, so it must not
  move a calibrated range or the text tower's outlier statistics."""
  from qtx.nn.clip import CLIP
  c = _config()
  model = build_model(c, quant=quantized.quant_config(c))
  fmodel = build_model(c)
  rng = np.random.default_rng(0)
  T = c.model.text.context_length
  tokens = np.zeros((6, T), np.int32)
  for b in range(6):
    n = 2 + b
    tokens[b, 0], tokens[b, n] = 49406, 49407
    tokens[b, 1:n] = rng.integers(1, 40000, n - 1)
  noisy = tokens.copy()
  for b in range(6):  # replace the zero padding by other (lower) ids
    n = int(np.argmax(tokens[b]))
    noisy[b, n + 1:] = rng.integers(1, 40000, T - n - 1)
  images = np.zeros((6, 16, 16, 3), np.uint8)
  v = nn.meta.unbox(model.init(jax.random.key(0), images, tokens))
  calib = jax.jit(lambda v, t: model.apply(v, t, method=CLIP.encode_text,
                                           mutable=["quant_stats"])[1]["quant_stats"])
  s0, s1 = calib(v, tokens), calib(v, noisy)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s0), jax.tree.leaves(s1)):
    if "textual" in jax.tree_util.keystr(path):
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  m0 = outlier_lib.outlier_metrics(fmodel, v["params"], images, tokens, batch_size=6)
  m1 = outlier_lib.outlier_metrics(fmodel, v["params"], images, noisy, batch_size=6)
  for k in m0:
    if "/text/" in k:
      np.testing.assert_allclose(m0[k], m1[k], rtol=1e-6, err_msg=k)


QUANT_POINTS_PER_BLOCK = {
    "attn/context_quant", "attn/key/out_quant", "attn/out/out_quant", "attn/probs_quant",
    "attn/query/out_quant", "attn/scores_quant", "attn/value/out_quant", "ln_1/out_quant",
    "ln_2/out_quant", "mlp/act_quant", "mlp/fc1/out_quant", "mlp/fc2/out_quant",
    "resid_1_quant", "resid_2_quant"}


@pytest.mark.parametrize("preset", ["softmax", "gated"])
def test_quantization_points_are_the_papers(preset):
  """W8A8 quantizes exactly the paper's points (PAPERS.md section 1): every linear output, the
  softmax input and output, P.V, both residual sums, every LayerNorm output and the
  embeddings; gates and the heads stay float. And every linear layer and LayerNorm then reads
  an 8-bit tensor (at most 256 distinct values), which a quantizer in the wrong place breaks."""
  c = micro_config(preset, **{"model.image.depth": 1, "model.text.depth": 1})
  model = build_model(c, quant=quantized.quant_config(c))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  tokens = np.zeros((4, 16), np.int32)
  tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 49406, rng.integers(1, 40000, (4, 5)), 49407
  v = nn.meta.unbox(model.init(jax.random.key(0), images, tokens))
  stats0 = {k: x for k, x in v.items() if k != "params"}
  paths = {jax.tree_util.keystr(p, simple=True, separator="/").rsplit("/", 1)[0]
           for p, _ in jax.tree_util.tree_leaves_with_path(stats0)}
  block = {"/".join(p.split("/")[4:]) for p in paths if "/block_0/" in p}
  assert block == QUANT_POINTS_PER_BLOCK
  outside = {p.split("/", 1)[1] for p in paths if "/encoder/" not in p}
  assert outside == {"visual/input_quant", "visual/patch_embed/out_quant", "visual/embed_quant",
                     "visual/ln_pre/out_quant", "visual/ln_post/out_quant",
                     "textual/embed_quant", "textual/ln_final/out_quant"}
  _, upd = model.apply(v, images, tokens, mutable=[QUANT_STATS])
  inputs = []

  def grab(next_fun, args, kwargs, context):
    # a fused matmul (quant.layers.fused_dense) shows each layer its input at stage 'weights'
    if context.method_name == "__call__" and isinstance(context.module, (
        QDense, QLayerNorm, nn.Dense)) and kwargs.get("stage") != "output":
      inputs.append((context.module.path, np.asarray(args[0])))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(grab):
    model.apply({"params": v["params"], **upd}, images, tokens)
  # per tower: q, k, v, out, fc1, fc2, ln_1, ln_2 and the projection head; plus patch_embed,
  # ln_pre, ln_post (image) and ln_final (text)
  assert len(inputs) == 2 * (4 + 2 + 2 + 1) + 4
  for path, x in inputs:
    assert len(np.unique(x)) <= 256, ("/".join(path), len(np.unique(x)))
