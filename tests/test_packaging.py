"""Packaging: version, licence, and that importing qtx registers no command-line flags."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_and_licence_match_pyproject():
  import qtx
  assert qtx.__version__.count(".") == 2
  text = open(os.path.join(ROOT, "pyproject.toml")).read()
  assert 'license = { text = "Apache-2.0" }' in text
  assert 'version = { attr = "qtx.__version__" }' in text
  lic = open(os.path.join(ROOT, "LICENSE")).read()
  assert "Apache License" in lic and "Version 2.0, January 2004" in lic


def test_importing_the_library_defines_no_absl_flags():
  """Notebooks and user scripts import qtx modules; only `python -m qtx.main` owns flags."""
  code = ("from absl import flags\n"
          "import qtx, qtx.run, qtx.modes, qtx.modes.train, qtx.modes.eval, qtx.modes.ptq, qtx.modes.sweep\n"
          "import qtx.analysis.figures, qtx.analysis.ablation, qtx.weights\n"
          "import qtx.data.pipeline, qtx.config_lib\n"
          "mods = flags.FLAGS.flags_by_module_dict()\n"
          "print(sorted(m for m in mods if 'qtx' in m))\n"
          "import qtx.main\n"
          "print(sorted(f.name for m, fs in flags.FLAGS.flags_by_module_dict().items()\n"
          "             if 'qtx' in m for f in fs))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  lib, cli = out.stdout.strip().splitlines()
  assert lib == "[]", lib
  assert cli == "['config', 'print_config', 'verbose', 'workdir']", cli  # the CLI module itself
