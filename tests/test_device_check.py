"""The one-shot accelerator check runs end to end as a CPU dry run (tiny shapes, interpreted
kernels) and writes its report: every section, every kernel checked and passing, the device
named, the dry run said to be no speed measurement."""
from benchmarks import device_check


def test_device_check_dry_run_writes_every_section(tmp_path):
  out = tmp_path / "report.md"
  text = device_check.main(["--dry-run", "--out", str(out)])
  assert out.read_text() == text
  assert "Device: **" in text and "**Dry run**" in text
  for title in ("## 1. Kernels against XLA", "## 2. Two-pass softmax",
                "## 3. Two-pass attention", "## 4. CLIP train step"):
    assert title in text, title
  kernels = [line for line in text.split("## 2.")[0].splitlines() if line.startswith("| two")
             or line.startswith("| log")]
  assert len(kernels) == 7 and all(line.endswith("| pass |") for line in kernels), kernels
  assert "ERROR" not in text and "skipped" not in text
  assert "tiny CLIP (dry run), float32, batch 8 |" in text
  for label in ("softmax", "clipped", "sink", "softplus"):
    assert f"K=16 {label} |" in text, label


def test_device_check_needs_only_the_accelerator_packages(tmp_path):
  """An accelerator machine has jax, flax, optax, orbax, chex and ml_collections, not the data
  packages: the whole check, the train step included, must run with those hidden (each import
  of them fails, as it would where they are not installed)."""
  import subprocess
  import sys
  hidden = ["grain", "tensorflow_datasets", "tensorflow", "regex", "tqdm", "tensorboardX",
            "matplotlib", "PIL", "torch", "open_clip", "webdataset"]
  out = tmp_path / "report.md"
  code = (f"import sys\nfor m in {hidden!r}:\n  sys.modules[m] = None\n"
          "from benchmarks import device_check\n"
          f"device_check.main(['--dry-run', '--out', {str(out)!r}])\n"
          f"assert not [m for m in {hidden!r} if sys.modules.get(m) is not None]\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  text = out.read_text()
  assert "ERROR" not in text and "did not fit/run" not in text, text
  row = next(line for line in text.splitlines() if line.startswith("| tiny CLIP (dry run)"))
  assert float(row.split("|")[2]) > 0, row  # samples/s of the compiled step
