"""Eval mode: restore + evaluate reproduces training's final eval; outlier statistics."""
import os
import re

import jax
import numpy as np
import pytest
from conftest import micro_config

from qtx import metrics
from qtx.modes import eval as eval_mode
from qtx.analysis import outliers as outlier_lib
from qtx.modes import ptq as ptq_mode
from qtx.quant import outliers as quant_outliers
from qtx import run as run_lib
from qtx.modes import train as train_mode


def _config(**kw):
  return micro_config(**{"model.image.depth": 2, "model.text.depth": 1, "train.total_steps": 4,
                         "eval.num_samples": 24, "data.synthetic.eval_size": 24, "eval.batch_size": 16,
                         **kw})


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
  """XLA backend optimisations off for this module's many small programs (about half the
  compile time; training and evaluation compile alike, so equality checks still hold)."""
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config, workdir, training's final eval metrics) of a 4-step run."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  c = _config()
  out = train_mode.run(c, workdir)
  return c, workdir, {k: v for k, v in out.items() if k.startswith("eval/")}


def test_eval_reproduces_final_training_metrics(trained, tmp_path, capsys):
  c, workdir, final = trained
  assert set(final) >= {"eval/zeroshot_top1", "eval/i2t_r1", "eval/t2i_r1"}
  c = _config(mode="eval")
  m = eval_mode.run(c, workdir)  # init_from empty: the workdir's own checkpoint
  assert {k: m[k] for k in final} == final
  row = metrics.read(workdir)[-1]
  assert row["step"] == 4 and {k: row[k] for k in final} == final
  for tower in ("image", "text"):
    assert row[f"outliers/{tower}/max_inf_norm"] > 0
    assert row[f"outliers/{tower}/inf_norm/block_0/ffn_out"] > 0
  assert row["outliers/max_inf_norm"] == max(row["outliers/image/max_inf_norm"],
                                             row["outliers/text/max_inf_norm"])
  # 2 image layers + 1 text layer, two tensors each: the combined mean is over all 6 tensors
  kurts = [v for k, v in row.items() if "/kurtosis/" in k]
  assert len(kurts) == 6 and row["outliers/avg_kurtosis"] == pytest.approx(np.mean(kurts))
  assert "qtx eval: step 4 | zero-shot top-1" in capsys.readouterr().out
  # the same checkpoint through init_from, written to another workdir
  c = _config(mode="eval", init_from=os.path.join(workdir, "checkpoints"))
  other = str(tmp_path / "other")
  m2 = eval_mode.run(c, other)
  assert {k: m2[k] for k in final} == final
  assert metrics.read(other)[-1]["outliers/max_inf_norm"] == row["outliers/max_inf_norm"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  c = _config(mode="eval")
  with pytest.raises(FileNotFoundError, match=r"init_from is empty and '.*checkpoints' holds no "
                                              r"checkpoint"):
    eval_mode.run(c, str(tmp_path))
  missing = str(tmp_path / "nowhere")
  c = _config(mode="eval", init_from=missing)
  with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint '{missing}' does not exist")):
    eval_mode.run(c, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    ptq_mode.run(_config(mode="ptq", init_from=missing), str(tmp_path))


def test_checkpoint_of_another_model_is_a_clear_error(trained):
  _, workdir, _ = trained
  c = _config(mode="eval", **{"model.text.width": 48})
  with pytest.raises(ValueError, match="does not match the model of this config"):
    run_lib.load_params(c, workdir)


def _stack_blocks(params_tower, depth):
  """Non-scan encoder params (block_<i>) -> nn.scan layout (blocks/block, leading layer axis)."""
  enc = dict(params_tower["encoder"])
  blocks = [enc.pop(f"block_{i}") for i in range(depth)]
  enc["blocks"] = {"block": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
  return {**params_tower, "encoder": enc}


def test_outlier_metrics_scan_equals_unrolled(trained):
  """The nn.scan model gives the same outlier names and values as the unrolled one (the values
  themselves are checked against an independent numpy forward in test_clip_reference.py)."""
  c, workdir, _ = trained
  s = run_lib.build(c, train=True)
  params, _ = run_lib.load_params(_config(mode="eval"), workdir, s)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
  tokens = np.zeros((5, 16), np.int32)
  tokens[:, :4] = [49406, 320, 1125, 49407]
  tokens[1, 1:3] = [2368, 539]
  got = outlier_lib.outlier_metrics(s.model, params, images, tokens, batch_size=4)
  assert len([k for k in got if "/inf_norm/" in k]) == 2 * (2 + 1)  # 2 tensors x 3 blocks

  cs = _config(**{"model.scan": True})
  s_scan = run_lib.build(cs, train=True)
  p_scan = dict(params)
  p_scan["visual"] = _stack_blocks(params["visual"], 2)
  p_scan["textual"] = _stack_blocks(params["textual"], 1)
  got_scan = outlier_lib.outlier_metrics(s_scan.model, p_scan, images, tokens, batch_size=4)
  assert sorted(got_scan) == sorted(got)
  for k in got:
    np.testing.assert_allclose(got_scan[k], got[k], rtol=1e-4, err_msg=k)


def test_aggregate_outliers_hand_computed():
  out = quant_outliers.aggregate_towers({
      "image": {"block_1/ffn_out": (2.0, 3.0), "block_0/ffn_out": (5.0, 4.0)},
      "text": {"block_0/block_out": (7.0, 8.0)}})
  assert out == {
      "outliers/image/inf_norm/block_0/ffn_out": 5.0,
      "outliers/image/kurtosis/block_0/ffn_out": 4.0,
      "outliers/image/inf_norm/block_1/ffn_out": 2.0,
      "outliers/image/kurtosis/block_1/ffn_out": 3.0,
      "outliers/image/max_inf_norm": 5.0, "outliers/image/avg_kurtosis": 3.5,
      "outliers/text/inf_norm/block_0/block_out": 7.0,
      "outliers/text/kurtosis/block_0/block_out": 8.0,
      "outliers/text/max_inf_norm": 7.0, "outliers/text/avg_kurtosis": 8.0,
      "outliers/max_inf_norm": 7.0, "outliers/avg_kurtosis": 5.0,
  }
  assert list(out)[:2] == ["outliers/image/inf_norm/block_0/ffn_out",
                           "outliers/image/kurtosis/block_0/ffn_out"]  # layer order
  with pytest.raises(ValueError, match="no outlier tensors for tower 'text'"):
    quant_outliers.aggregate_towers({"text": {}})
