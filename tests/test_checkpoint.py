"""Checkpoints survive preemption: SIGKILL + resume is bit-exact; SIGTERM saves and exits."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from test_train import MICRO_FLAGS, ROOT

pytestmark = pytest.mark.slow


def _cmd(workdir, steps, every=2, extra=()):
  return [sys.executable, "-m", "qtx.main", "--config", "configs/clip_tiny.py:gated",
          "--workdir", str(workdir), *MICRO_FLAGS, f"--config.train.total_steps={steps}",
          "--config.train.log_every=1", f"--config.checkpoint.every_steps={every}",
          "--config.checkpoint.keep=10", "--config.eval.every_steps=0",
          "--config.train.warmup_steps=2", *extra]


def _losses(workdir):
  """step -> loss, the last value written for each step (a resumed run rewrites steps)."""
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    r = json.loads(line)
    if "train/loss" in r:
      out[r["step"]] = r["train/loss"]
  return out


def _params(workdir, step):
  ckptr = ocp.StandardCheckpointer()
  state = ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return state["params"]


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flat(v, f"{prefix}/{k}")
  else:
    yield prefix, np.asarray(tree)


def _saved_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(s) for s in os.listdir(d) if s.isdigit())


@pytest.mark.parametrize("data", ["synthetic", "webdataset"])
def test_sigkill_then_resume_is_bit_exact(tmp_path, data):
  total = 10
  extra = ()
  if data == "webdataset":  # tar shards: the iterator position restores to the exact sample
    from test_webdataset import make_shards
    make_shards(str(tmp_path / "shards"), n_shards=3, per_shard=10)
    extra = ("--config.data.name=webdataset",
             f"--config.data.path={tmp_path / 'shards' / '{00000..00002}.tar'}")
  ref = tmp_path / "ref"
  r = subprocess.run(_cmd(ref, total, extra=extra), cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]

  run = tmp_path / "run"
  p = subprocess.Popen(_cmd(run, total, extra=extra), cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and not [s for s in _saved_steps(run) if s >= 4]:
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  killed_at = _saved_steps(run)
  assert killed_at and killed_at[-1] < total, killed_at
  r = subprocess.run(_cmd(run, total, extra=extra), cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]

  ref_losses, run_losses = _losses(ref), _losses(run)
  assert sorted(run_losses) == list(range(1, total + 1))
  assert run_losses == ref_losses  # bit-exact on CPU: same programs, same data order
  for (name, a), (_, b) in zip(_flat(_params(ref, total)), _flat(_params(run, total))):
    np.testing.assert_array_equal(a, b, err_msg=name)


def test_sigterm_saves_at_current_step_and_exits_cleanly(tmp_path):
  p = subprocess.Popen(_cmd(tmp_path, 10_000, every=0), cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    time.sleep(0.1)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 0, err[-2000:]
  line = [l for l in out.splitlines() if "preempted, checkpoint saved at step" in l]
  assert line, out[-2000:]
  step = int(line[0].rsplit(" ", 1)[1])
  assert _saved_steps(tmp_path) == [step]
  assert step >= 3
  assert max(_losses(tmp_path)) <= step


def test_loading_parameters_trained_with_other_model_settings_warns(tmp_path, capsys):
  """alpha is not a parameter: an alpha = 1 checkpoint loads into an alpha = 0.5 model without
  error, so loading names the difference (impl, scan and remat do not change the model)."""
  from qtx import config_lib
  from qtx import run as run_lib
  trained = config_lib.tiny_config("clipped_softmax")
  trained.model.image.attention.alpha = 1.0
  step = tmp_path / "checkpoints" / "1300"
  step.mkdir(parents=True)
  (tmp_path / "config.json").write_text(trained.to_json_best_effort())
  now = config_lib.tiny_config("clipped_softmax")
  now.model.image.attention.impl = "pallas"
  assert run_lib.warn_model_differences(str(step), now) == [
      "model.image.attention.alpha: 1.0 (trained) -> 0.5"]
  assert "was trained with other model settings" in capsys.readouterr().out
  now.model.image.attention.alpha = 1.0
  assert run_lib.warn_model_differences(str(tmp_path), now) == []
  assert run_lib.warn_model_differences(str(tmp_path / "nowhere" / "a" / "b"), now) == []
