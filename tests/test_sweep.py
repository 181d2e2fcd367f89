"""Sweep mode: its plan, the config of each run, the result table, and a resumable end-to-end run."""
import json
import os

import numpy as np
import pytest
from conftest import micro_config

from qtx import modes
from qtx.modes import sweep


def test_table_mean_and_std_over_seeds():
  runs = {"softmax": [{"eval/zeroshot_top1": 0.40, "outliers/max_inf_norm": 10.0},
                      {"eval/zeroshot_top1": 0.50, "outliers/max_inf_norm": 14.0}],
          "gated": [{"eval/zeroshot_top1": 0.391}]}
  cols = (("eval/zeroshot_top1", "zs", 100.0), ("outliers/max_inf_norm", "inf", 1.0))
  t = sweep.table(runs, cols).splitlines()
  assert t[0] == "| normalizer | seeds | zs | inf |"
  assert t[2] == "| softmax | 2 | 45.0 ± 7.1 | 12 ± 2.8 |"  # std with ddof=1
  assert t[3] == "| gated | 1 | 39.1 | - |"
  # a column no run has is left out on request; one that some runs have stays
  cols += (("attn/image/register_mass", "reg", 1.0),)
  assert sweep.table(runs, cols).splitlines()[0].endswith("| reg |")
  assert sweep.table(runs, cols, drop_absent=True).splitlines()[0] == "| normalizer | seeds | zs | inf |"


def test_plan_is_seed_major_and_checks_its_words():
  c = micro_config(**{"mode": "sweep", "sweep.normalizers": "softmax, gated",
                      "sweep.seeds": "3,1"})
  assert sweep.plan(c) == [("softmax", 3), ("gated", 3), ("softmax", 1), ("gated", 1)]
  c.sweep.normalizers = "softmax,gatted"
  with pytest.raises(ValueError, match="unknown preset 'gatted'"):
    sweep.plan(c)
  c.sweep.normalizers, c.sweep.seeds = "softmax", "0,x"
  with pytest.raises(ValueError, match="sweep.seeds must be comma-separated integers"):
    sweep.plan(c)


def test_run_config_applies_the_preset_and_keeps_other_overrides():
  c = micro_config(**{"train.lr": 0.0123, "model.image.attention.zeta": 1.5})
  r = sweep.run_config(c, "clipped_softmax", 7, "ptq")
  a = r.model.image.attention
  assert (r.seed, r.mode, r.train.lr) == (7, "ptq", 0.0123)
  assert (a.normalizer, a.alpha, a.zeta, a.gate) == ("clipped_softmax", 0.5, 1.5, "none")
  g = sweep.run_config(c, "gated", 0, "train").model.text.attention
  assert (g.normalizer, g.gate) == ("softmax", "linear")
  assert c.seed == 0 and c.model.image.attention.normalizer == "softmax"  # c is not changed


def test_rows_carry_their_own_settings_after_the_preset():
  c = micro_config(**{"model.image.attention.zeta": 1.5})
  assert sweep.parse_row("clipped_softmax@alpha=0.25@train.lr=0.5") == (
      "clipped_softmax", ["model.image.attention.alpha=0.25", "model.text.attention.alpha=0.25",
                          "train.lr=0.5"])
  r = sweep.run_config(c, "clipped_softmax@alpha=0.25@model.text.attention.alpha=2", 3, "train")
  # the preset sets alpha = 0.5; the row's settings come after it, the config's other keys stay
  assert (r.model.image.attention.alpha, r.model.text.attention.alpha) == (0.25, 2)
  assert (r.model.image.attention.normalizer, r.model.image.attention.zeta) == (
      "clipped_softmax", 1.5)
  c.sweep.normalizers, c.sweep.seeds = "softmax,clipped_softmax@alpha=0.5", "0"
  assert sweep.plan(c) == [("softmax", 0), ("clipped_softmax@alpha=0.5", 0)]
  for bad, msg in (("clipped_softmax@alpha", "is not KEY=VALUE"),
                   ("clipped_softmax@alpha=abc", "sweep row 'clipped_softmax@alpha=abc'"),
                   ("softmax@data.path=/a/b", "has a '/'"),
                   ("softmax,softmax", "listed twice"),
                   ("clipped_softmax@alpah=1", "unknown config key 'model.image.attention.alpah'"),
                   ("clipped@alpha=1", "unknown preset 'clipped'")):
    c.sweep.normalizers = bad
    with pytest.raises(ValueError, match=msg):
      sweep.plan(c)


def test_sweep_trains_quantizes_tabulates_and_reuses_finished_runs(tmp_path):
  out = tmp_path / "table.md"
  c = micro_config(**{"mode": "sweep", "sweep.normalizers": "softmax,registers",
                      "sweep.seeds": "0", "sweep.out": str(out), "train.total_steps": 4,
                      "quant.calib_batches": 1, "quant.outliers_every_steps": 0})
  res = modes.run(c, str(tmp_path / "sw"))
  run_dir = tmp_path / "sw" / "softmax" / "seed0"
  done = json.load(open(run_dir / "done.json"))
  assert res["softmax"] == [done]
  for k in ("ptq/w8a8_zeroshot_top1", "eval/zeroshot_top1", "attn/image/null_mass"):
    assert k in done, k
  assert "attn/image/register_mass" in res["registers"][0]
  # the registers row trained with model.image.registers = 4
  saved = json.load(open(tmp_path / "sw" / "registers" / "seed0" / "config.json"))
  assert saved["model"]["image"]["registers"] == 4
  text = out.read_text()
  assert "| softmax | 1 |" in text and "| registers | 1 |" in text
  assert "W8A8 zero-shot top-1 (%)" in text and "image mass on registers" in text
  mech = text.split("### Mechanism")[1].split("### Cost")[0]
  softmax_row = next(line for line in mech.splitlines() if line.startswith("| softmax |"))
  assert softmax_row.endswith("| 1 |")  # its own step time relative to itself
  assert (tmp_path / "table.png").exists()
  # a second call reads done.json: no new metrics rows are written
  n_rows = len(open(run_dir / "metrics.jsonl").read().splitlines())
  assert modes.run(c, str(tmp_path / "sw"))["softmax"] == [done]
  assert len(open(run_dir / "metrics.jsonl").read().splitlines()) == n_rows
  assert os.path.exists(run_dir / "ptq" / "metrics.jsonl")
  # a finished run made with other settings is not tabulated under this row
  c2 = c.copy_and_resolve_references()
  c2.train.lr = 0.5
  with pytest.raises(ValueError, match=r"holds a finished run of row 'softmax' seed 0 made with "
                     r"other settings \(train.lr: 0.003 -> 0.5\)"):
    modes.run(c2, str(tmp_path / "sw"))
  # only_finished: a table of what is done; the unfinished seed 5 is not trained
  c.sweep.seeds, c.sweep.only_finished = "0,5", True
  assert modes.run(c, str(tmp_path / "sw"))["softmax"] == [done]
  assert not (tmp_path / "sw" / "softmax" / "seed5").exists()


def test_step_time_is_relative_to_the_softmax_row():
  key = "train/samples_per_sec_steady"
  res = {"softmax": [{key: 100.0}, {key: 300.0}], "muon": [{key: 100.0}], "gated": [{}]}
  out = sweep.with_step_time(res)
  assert [r[sweep.STEP_TIME] for r in out["softmax"]] == [2.0, 200.0 / 300.0]
  assert out["muon"][0][sweep.STEP_TIME] == 2.0 and sweep.STEP_TIME not in out["gated"][0]
  assert sweep.STEP_TIME not in res["softmax"][0]  # the results themselves are not changed
  # no baseline yet: nothing added
  assert sweep.STEP_TIME not in sweep.with_step_time({"gated": [{key: 1.0}]})["gated"][0]


def test_quality_columns_follow_quant_settings():
  c = micro_config(**{"quant.settings": "w8a8_token,w4a8"})
  keys = [k for k, *_ in sweep.quality_columns(c)]
  assert keys == ["eval/zeroshot_top1", "ptq/w8a8_zeroshot_top1", "ptq/w8a8_token_zeroshot_top1",
                  "ptq/w4a8_zeroshot_top1", "ptq/w8a8_zeroshot_loss",
                  "ptq/w8a8_token_zeroshot_loss", "ptq/w4a8_zeroshot_loss", "eval/i2t_r1",
                  "ptq/w8a8_i2t_r1", "ptq/w8a8_token_i2t_r1", "ptq/w4a8_i2t_r1"]


def test_quantization_loss_is_paired_per_run():
  runs = {"a": [{"eval/zeroshot_top1": 0.82, "ptq/w8a8_zeroshot_top1": 0.70,
                 "ptq/fp_zeroshot_top1": 0.80},  # PTQ's own float eval is the reference
                {"eval/zeroshot_top1": 0.60, "ptq/w8a8_zeroshot_top1": 0.58}]}
  out = sweep.with_losses(runs)["a"]
  np.testing.assert_allclose([r["ptq/w8a8_zeroshot_loss"] for r in out], [0.10, 0.02])
  assert "ptq/fp_zeroshot_loss" not in out[0] and "ptq/w8a8_zeroshot_loss" not in runs["a"][0]
  row = sweep.table({"a": out}, (("ptq/w8a8_zeroshot_loss", "loss", 100.0),)).splitlines()[2]
  assert row == "| a | 2 | 6.0 ± 5.7 |"  # mean and std of the per-run losses


def test_override_parses_literals_and_names_unknown_keys():
  from qtx import config_lib
  c = micro_config()
  config_lib.override(c, "train.lr=0.01")
  config_lib.override(c, "mesh.num_devices=1")
  config_lib.override(c, "data.name=folder")
  assert c.train.lr == 0.01 and c.mesh.num_devices == 1 and c.data.name == "folder"
  with pytest.raises(ValueError, match="unknown config key 'train.lrr'"):
    config_lib.override(c, "train.lrr=1")
  with pytest.raises(ValueError, match="is not KEY=VALUE"):
    config_lib.override(c, "train.lr")
