"""The notebooks: valid, stored without outputs, and executed end to end on CPU in smoke mode
(QTX_SMOKE=1: a micro model and a few steps) under a time limit."""
import os
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = ("quickstart.ipynb", "colab_tpu.ipynb")
TIME_LIMIT_S = 150  # per notebook, kernel start included; smoke runs take well under a minute


def _read(name):
  return nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_clean_and_parameterised(name):
  nb = _read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, name
  for c in code:
    assert not c.get("outputs") and c.get("execution_count") is None, (
        f"{name}: stored with outputs; clear them before committing")
  assert 'QTX_SMOKE = os.environ.get("QTX_SMOKE") == "1"' in code[0].source
  assert nb.metadata.kernelspec.name == "python3"


def _run(name, tmp_path, monkeypatch):
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  monkeypatch.setenv("QTX_SMOKE", "1")
  monkeypatch.setenv("QTX_WORKDIR", str(tmp_path))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT] + [p for p in sys.path if p]))
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("QTX_DATA", raising=False)
  nb = _read(name)
  client = nbclient.NotebookClient(nb, timeout=TIME_LIMIT_S, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOK_DIR}})
  start = time.perf_counter()
  client.execute()
  elapsed = time.perf_counter() - start
  assert elapsed < TIME_LIMIT_S, f"{name} took {elapsed:.0f} s"
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  return text, images, elapsed


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
  text, images, _ = _run("quickstart.ipynb", tmp_path, monkeypatch)
  assert "eval/zeroshot_top1" in text and "max_inf_norm" in text
  assert len(images) >= 2  # loss curve and the outlier figure
  assert (tmp_path / "outliers.png").is_file()
  assert (tmp_path / "softmax" / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_colab_notebook_runs(tmp_path, monkeypatch):
  text, images, elapsed = _run("colab_tpu.ipynb", tmp_path, monkeypatch)
  assert "backend: cpu" in text and "settings for cpu" in text
  # Smoke runs train on the local Fashion-MNIST copy when there is one (never downloading).
  local = os.path.isdir("/usr/share/datasets/fashion-mnist")
  assert ("data: fashion_mnist /usr/share/datasets/fashion-mnist" if local
          else "data: synthetic") in text
  assert "eval/zeroshot_top1" in text
  assert len(images) >= 2  # training curves and the PTQ outlier figure
  assert "ptq/w8a8_zeroshot_top1" in text and "all requirements met" in text
  print(f"colab notebook smoke run: {elapsed:.0f} s")
