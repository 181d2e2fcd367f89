"""End to end: a short training run whose loss goes down, metrics.jsonl, checkpoints, CLI."""
import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from conftest import micro_config
from qtx import config_lib, metrics, optim
from qtx import run as run_lib
from qtx.modes import train as train_mode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_FLAGS = [
    "--config.model.embed_dim=16", "--config.model.image.width=32",
    "--config.model.image.depth=1", "--config.model.image.heads=2",
    "--config.model.image.mlp_dim=64", "--config.model.text.width=32",
    "--config.model.text.depth=1", "--config.model.text.heads=2",
    "--config.model.text.mlp_dim=64", "--config.model.image.image_size=16", "--config.model.image.patch_size=4",
    "--config.model.text.context_length=16",
    "--config.train.batch_size=8", "--config.eval.num_samples=16", "--config.eval.batch_size=8",
    "--config.data.synthetic.eval_size=16", "--config.train.log_every=2", "--config.mesh.num_devices=1",
]


def test_training_reduces_loss_and_writes_metrics(tmp_path, capsys):
  c = micro_config(**{"train.total_steps": 40, "train.lr": 3e-3, "train.log_every": 4,
                      "train.warmup_steps": 4, "eval.every_steps": 20,
                      "checkpoint.every_steps": 20})
  out = train_mode.run(c, str(tmp_path))
  rows = metrics.read(str(tmp_path))
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == 10
  assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 0.3, losses
  assert all({"step", "train/loss", "train/lr", "train/samples_per_sec"} <= set(r)
             for r in rows if "train/loss" in r)
  evals = [r for r in rows if "eval/zeroshot_top1" in r]
  assert [r["step"] for r in evals] == [20, 40]
  for k in ("eval/i2t_r1", "eval/t2i_r1", "eval/i2t_r5", "eval/t2i_r5"):
    assert 0.0 <= evals[-1][k] <= 1.0
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "40"]
  assert out["train/loss"] == losses[-1]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
  assert "qtx: step 40 | loss" in capsys.readouterr().out


def test_resume_continues_from_latest_checkpoint(tmp_path):
  c = micro_config(**{"train.total_steps": 4, "checkpoint.every_steps": 2})
  train_mode.run(c, str(tmp_path))
  c.train.total_steps = 6
  train_mode.run(c, str(tmp_path))
  steps = [r["step"] for r in metrics.read(str(tmp_path)) if "train/loss" in r]
  assert steps == [2, 4, 6]


def test_same_seed_gives_the_same_run_and_resume_is_exact(tmp_path):
  """The sweep's tables are re-runnable: two runs of one config and seed log identical losses,
  and a run that lost its last checkpoint resumes from the one before and logs the same losses
  again (data order and optimizer state restored, not restarted)."""
  import shutil
  cfg = {"train.total_steps": 8, "checkpoint.every_steps": 4, "train.log_every": 2}
  rows = lambda d: [(r["step"], r["train/loss"]) for r in metrics.read(str(d)) if "train/loss" in r]
  train_mode.run(micro_config(**cfg), str(tmp_path / "a"))
  train_mode.run(micro_config(**cfg), str(tmp_path / "b"))
  first = rows(tmp_path / "a")
  assert [s for s, _ in first] == [2, 4, 6, 8] and first == rows(tmp_path / "b")
  shutil.rmtree(tmp_path / "a" / "checkpoints" / "8")  # as if killed before the final save
  train_mode.run(micro_config(**cfg), str(tmp_path / "a"))
  again = rows(tmp_path / "a")[len(first):]
  assert [s for s, _ in again] == [6, 8]
  np.testing.assert_allclose([l for _, l in again], [l for _, l in first[2:]], rtol=1e-6)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
  c = micro_config(**{"train.total_steps": 6, "checkpoint.every_steps": 2,
                      "train.lr": 1e30, "train.warmup_steps": 1, "train.grad_clip": 0.0})
  with pytest.raises(train_mode.NonFiniteLossError, match=r"at step \d+"):
    train_mode.run(c, str(tmp_path))
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert saved and saved[-1] <= 4


def test_unknown_normalizer_and_bad_values_are_clear_errors():
  c = micro_config()
  c.model.image.attention.normalizer = "softmaxx"
  with pytest.raises(ValueError, match=r"model.image.attention.normalizer: unknown normalizer 'softmaxx'"):
    config_lib.validate(c)
  c = micro_config()
  c.model.text.attention.gate = "sigmoid"
  with pytest.raises(ValueError, match=r"^model.text.attention.gate: unknown attention gate "
                                       r"'sigmoid'; choose one of"):
    config_lib.validate(c)
  c = micro_config("clipped_softmax")
  c.model.image.attention.alpha, c.model.image.attention.gamma = None, 0.25
  with pytest.raises(ValueError, match=r"^model.image.attention.gamma: must be <= 0, got 0.25$"):
    config_lib.validate(c)
  c = micro_config(**{"model.text.attention.softplus_p": -1.0})
  c.model.text.attention.normalizer = "softplus"
  with pytest.raises(ValueError, match=r"^model.text.attention.softplus_p: must be > 0"):
    config_lib.validate(c)
  c = micro_config(**{"loss.name": "triplet"})
  with pytest.raises(ValueError, match=r"unknown loss.name 'triplet'"):
    config_lib.validate(c)
  for bad in (0.0, -0.5, 2.0):
    c = micro_config(**{"data.synthetic.shape_scale": bad})
    with pytest.raises(ValueError, match=r"data.synthetic.shape_scale must be in \(0, 1.5\]"):
      config_lib.validate(c)
  with pytest.raises(ValueError, match=r"unknown config argument word\(s\) \['relu'\]"):
    config_lib.tiny_config("relu")
  c = micro_config(**{"train.end_lr_fraction": 1.5})
  with pytest.raises(ValueError, match=r"train.end_lr_fraction must be in \[0, 1\], got 1.5"):
    config_lib.validate(c)


@pytest.mark.parametrize("end_fraction", [0.0, 0.3, 1.0])
def test_lr_schedule_warmup_cosine_and_floor(end_fraction):
  c = micro_config(**{"train.lr": 2e-3, "train.warmup_steps": 10, "train.total_steps": 110,
                      "train.end_lr_fraction": end_fraction})
  sched = optim.lr_schedule(c)
  np.testing.assert_allclose([float(sched(i)) for i in (0, 5, 10)], [0.0, 1e-3, 2e-3], rtol=1e-6)
  floor = 2e-3 * end_fraction
  # half way through the cosine the rate is the mean of peak and floor; it ends at the floor
  np.testing.assert_allclose(float(sched(60)), (2e-3 + floor) / 2, rtol=1e-5)
  np.testing.assert_allclose([float(sched(110)), float(sched(500))], [floor, floor], atol=1e-9)
  lrs = np.array([float(sched(i)) for i in range(10, 111)])
  assert np.all(np.diff(lrs) <= 1e-12)  # never increases after the warmup


def test_cli_unknown_config_key_is_an_error(tmp_path):
  r = subprocess.run([sys.executable, "-m", "qtx.main", "--config", "configs/clip_tiny.py",
                      "--workdir", str(tmp_path), "--config.train.batchsize=4"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  assert "batchsize" in r.stderr


@pytest.mark.slow
def test_cli_main_job_runs(tmp_path):
  r = subprocess.run([sys.executable, "-m", "qtx.main", "--config",
                      "configs/clip_tiny.py:gated", "--workdir", str(tmp_path),
                      "--config.train.total_steps=4", "--config.eval.every_steps=0",
                      *MICRO_FLAGS], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "qtx: step 4 | loss" in r.stdout
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[-1]["step"] == 4 and "eval/zeroshot_top1" in rows[-1]
  cfg = json.load(open(tmp_path / "config.json"))
  assert cfg["model"]["image"]["attention"]["gate"] == "linear"
  from qtx import checkpoint as ckpt_lib
  config, s, params, step = run_lib.load_run(str(tmp_path))
  assert step == 4 and config.model.image.attention.gate == "linear"
  saved, saved_step = ckpt_lib.restore_params(str(tmp_path / "checkpoints"), s.abstract_params)
  assert saved_step == 4
  chex.assert_trees_all_equal(params, saved)
  with pytest.raises(FileNotFoundError, match="not a qtx workdir"):
    run_lib.load_run(str(tmp_path / "checkpoints"))
  # a run saved before the synthetic source had its own block (data.eval_size), before
  # omit_prob and shape_scale existed, and with data.image_size, loads with the values it had
  cfg["data"]["eval_size"] = cfg["data"].pop("synthetic")["eval_size"]
  cfg["data"]["image_size"] = cfg["model"]["image"]["image_size"]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(cfg, f)
  config, _, old_params, _ = run_lib.load_run(str(tmp_path))
  assert (config.data.synthetic.omit_prob, config.data.synthetic.shape_scale) == (0.0, 1.0)
  assert config.data.synthetic.eval_size == 16 and "image_size" not in config.data
  assert "eval_size" not in config.data
  chex.assert_trees_all_equal(old_params, saved)


def test_cli_help_lists_modes_and_fields():
  r = subprocess.run([sys.executable, "-m", "qtx.main", "--help"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  out = r.stdout + r.stderr  # absl prints the usage and exits with status 1
  assert r.returncode in (0, 1)
  for word in ("train", "eval", "ptq", "sweep", "model.{image,text}.attention", "loss.name",
               "mesh.shape", "quant.*", "--workdir", "--print_config", "runlocal",
               "configs/clip_b16.py:gated,runlocal"):
    assert word in out, word
