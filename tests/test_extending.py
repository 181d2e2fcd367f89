"""docs/extending.md, followed literally: its files are written as given and its commands run
(with fewer steps), so the worked examples cannot drift from the code."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "extending.md")


def _blocks():
  text = open(DOC).read()
  files, commands = {}, []
  for lang, body in re.findall(r"```(\w+)\n(.*?)```", text, re.S):
    if lang == "python":
      first, _, rest = body.partition("\n")
      m = re.match(r"# file: (\S+)( \(continued\))?", first)
      assert m, f"python block without '# file:' line: {first!r}"
      files[m.group(1)] = files.get(m.group(1), "") + rest + "\n"
    elif lang == "bash":
      commands += [c.strip() for c in body.replace("\\\n", " ").splitlines() if c.strip()]
  return files, commands


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  d = tmp_path_factory.mktemp("extending")
  files, _ = _blocks()
  assert set(files) == {"my_plugins.py", "my_config.py", "make_data.py"}
  for name, body in files.items():
    (d / name).write_text(body)
  return d


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def test_the_normalizer_meets_the_contract(workdir):
  sys.path.insert(0, str(workdir))
  try:
    import my_plugins  # noqa: F401
    from qtx.nn import normalizers
    from qtx.nn.attention import AttentionConfig
    x = np.asarray([[1.0, -2.0, 3.0, 0.5], [-1.0, -1.0, -1.0, -1.0]], np.float32)
    where = np.asarray([[True, True, True, False], [True, True, False, False]])
    y = np.asarray(normalizers.get("sq_relu")(x, where=where))
    r = np.where(where, np.maximum(x, 0) ** 2, 0.0)
    np.testing.assert_allclose(y, r / (r.sum(-1, keepdims=True) + 1e-6), rtol=1e-6)
    assert y[0, 3] == 0.0 and np.all(y[1] == 0.0)
    with pytest.raises(ValueError, match="sq_relu_eps: must be > 0"):
      AttentionConfig(normalizer="sq_relu", sq_relu_eps=0.0)
    import my_config
    from qtx import config_lib
    c = my_config.get_config()
    c.model.text.attention.sq_relu_eps = 0.0
    with pytest.raises(ValueError, match=r"^model\.text\.attention\.sq_relu_eps: must be > 0, got 0\.0$"):
      config_lib.validate(c)
    with pytest.raises(ValueError, match="impl='pallas' supports"):
      AttentionConfig(normalizer="sq_relu", impl="pallas")
  finally:
    sys.path.remove(str(workdir))


def test_the_commands_train_evaluate_and_quantize_with_all_three(workdir):
  _, commands = _blocks()
  assert commands[0] == "python make_data.py"
  for cmd in commands:
    cmd = cmd.replace("total_steps=20", "total_steps=4")
    r = subprocess.run(cmd, shell=True, cwd=workdir, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (cmd, r.stderr[-3000:])
  rows = [json.loads(l) for l in open(workdir / "run" / "metrics.jsonl")]
  assert any("eval/i2t_r1" in row for row in rows)
  assert any("ptq/w8a8_i2t_r1" in row for row in rows)
  assert [row["train/loss"] for row in rows if "train/loss" in row]
  cfg = json.load(open(workdir / "run" / "config.json"))
  assert cfg["model"]["image"]["attention"]["normalizer"] == "sq_relu"
  assert cfg["model"]["text"]["attention"]["sq_relu_eps"] == 1e-6
  assert (cfg["data"]["name"], cfg["loss"]["name"]) == ("npz", "clip_i2t")


def test_a_misspelt_normalizer_is_one_line_naming_the_choices(workdir):
  r = subprocess.run([sys.executable, "-m", "qtx.main", "--config", "my_config.py",
                      "--workdir", "bad", "--config.model.image.attention.normalizer=sq_relux"],
                     cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  assert ("qtx: error: model.image.attention.normalizer: unknown normalizer 'sq_relux'; "
          "choose one of"
          in r.stderr), r.stderr[-2000:]
  assert "'sq_relu'" in r.stderr and "Traceback" not in r.stderr
