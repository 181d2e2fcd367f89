"""The command line for people: one-line errors (tracebacks behind --verbose), --print_config."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "clip_tiny.py")


def _main(*args):
  return subprocess.run([sys.executable, "-m", "qtx.main", *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_config_and_input_errors_are_one_short_message(tmp_path):
  r = _main("--config", TINY, "--workdir", str(tmp_path / "a"),
            "--config.model.image.attention.normalizer=softmaxx")
  assert r.returncode == 2
  assert "qtx: error: model.image.attention.normalizer: unknown normalizer 'softmaxx'" in r.stderr
  assert "Traceback" not in r.stderr and "--verbose" in r.stderr
  r = _main("--config", TINY, "--workdir", str(tmp_path / "b"), "--config.mode=eval")
  assert r.returncode == 2 and "no checkpoint to load" in r.stderr
  assert "Traceback" not in r.stderr
  r = _main("--config", TINY, "--workdir", str(tmp_path / "c"), "--config.mode=eval",
            "--verbose")
  assert r.returncode != 0 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr


def test_print_config_shows_preset_and_overrides_without_a_workdir():
  r = _main("--config", TINY + ":gated", "--print_config", "--config.train.lr=0.01")
  assert r.returncode == 0, r.stderr
  assert "gate: linear" in r.stdout and "lr: 0.01" in r.stdout
  r = _main("--config", TINY)
  assert r.returncode != 0 and "--workdir is required" in r.stderr


def test_resumed_run_with_a_changed_config_says_so(tmp_path, capsys):
  from conftest import micro_config
  from qtx import main as qmain
  from qtx.modes import train as train_mode
  c = micro_config(**{"train.total_steps": 2, "checkpoint.every_steps": 2})
  assert train_mode.resume_changes(c, str(tmp_path)) == []  # nothing to resume yet
  qmain.run(c, str(tmp_path))
  assert train_mode.resume_changes(c, str(tmp_path)) == []  # same config: silent
  c.train.total_steps = 4
  c.train.lr = 1e-3
  lines = train_mode.resume_changes(c, str(tmp_path))
  assert "differs from the one it was trained with (2 key(s))" in lines[0]
  assert lines[1:] == ["  train.lr: 0.003 -> 0.001", "  train.total_steps: 2 -> 4"]
  capsys.readouterr()
  qmain.run(c, str(tmp_path))
  assert "qtx: warning: resuming" in capsys.readouterr().err
  # a run saved before a key existed is compared with that key's legacy value, not refused
  import json
  saved = tmp_path / "config.json"
  old = json.loads(saved.read_text())
  del old["data"]["augment"], old["data"]["augment_scale"]
  for tower in ("image", "text"):  # saved before the softmax_sink normalizer existed
    del old["model"][tower]["attention"]["sink_init"], old["model"][tower]["attention"][
        "sink_learned"]
  saved.write_text(json.dumps(old))
  assert [l for l in train_mode.resume_changes(c, str(tmp_path))
          if "augment" in l or "sink" in l] == []
  # keys that decide which sample comes next (or the model) cannot change on resume
  for key, value in (("data.num_workers", 2), ("seed", 1), ("model.text.width", 48)):
    d = micro_config(**{"train.total_steps": 4, "train.lr": 1e-3, "checkpoint.every_steps": 2,
                        key: value})
    with pytest.raises(ValueError, match=rf"{key} .* changed since the run was started"):
      train_mode.resume_changes(d, str(tmp_path))


def test_fill_legacy_migrates_what_old_runs_saved():
  from qtx import config_lib
  old = {"quant": {"keep_float": "head,gates, temperature"},
         "data": {"omit_prob": 0.25, "eval_size": 8, "image_size": 16},
         "model": {"image": {"attention": {"normalizer": "softmax"}}}}
  new = config_lib.fill_legacy(old)
  assert new["quant"]["keep_float"] == "head"  # names that never did anything are dropped
  assert new["data"]["synthetic"] == {"omit_prob": 0.25, "eval_size": 8, "shape_scale": 1.0}
  assert "image_size" not in new["data"] and "omit_prob" not in new["data"]
  assert new["model"]["image"]["attention"]["sink_init"] == 0.0  # a normalizer added later
  kept = config_lib.fill_legacy({"quant": {"keep_float": "head, weights"}})
  assert kept["quant"]["keep_float"] == "head, weights"  # nothing legacy: left as written


def test_config_differences_name_changed_and_one_sided_keys():
  from qtx import config_lib
  c = config_lib.tiny_config()
  saved = json.loads(c.to_json_best_effort())
  assert config_lib.differences(json.loads(json.dumps(saved)), c) == {}
  saved["train"]["lr"] = 0.5
  del saved["sweep"]["only_finished"]  # a key the saved run predates (no legacy default)
  saved["model"]["extra"] = 1  # a key this config lacks
  d = config_lib.differences(json.loads(json.dumps(saved)), c)
  assert d == {"train.lr": (0.5, c.train.lr),
               "sweep.only_finished": (config_lib.ABSENT, False),
               "model.extra": (1, config_lib.ABSENT)}
  assert config_lib.differences(saved, c, both=True) == {"train.lr": (0.5, c.train.lr)}


@pytest.mark.parametrize("args,expect", [
    (("--config.train.totl_steps=3",),
     "unknown config key 'totl_steps' in the command line; Did you mean \"total_steps\""),
    (("--config.trian.lr=3",), "unknown config key 'trian' in the command line; Did you mean \"train\""),
    (("--config.train.lr=abc",), "could not convert string to float: 'abc'"),
])
def test_misspelt_keys_sections_and_values_are_one_line(tmp_path, args, expect):
  r = _main("--config", TINY, "--workdir", str(tmp_path), *args)
  assert r.returncode == 2, r.stderr[-1000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 2 and lines[0].startswith("qtx: error: ") and expect in lines[0]
  assert "--verbose" in lines[1]
  r = _main("--config", TINY, "--workdir", str(tmp_path), *args, "--verbose")
  assert r.returncode != 0 and "Traceback" in r.stderr


def test_misspelt_config_word_and_missing_config_file_are_one_line(tmp_path):
  r = _main("--config", TINY + ":sigmoid", "--workdir", str(tmp_path))
  assert r.returncode == 2 and "Traceback" not in r.stderr and "FATAL" not in r.stderr
  assert "unknown config argument word(s) ['sigmoid']" in r.stderr.splitlines()[0]
  r = _main("--config", os.path.join(ROOT, "configs", "nope.py"), "--workdir", str(tmp_path))
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "configs/nope.py" in r.stderr.splitlines()[0]
