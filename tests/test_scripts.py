"""Analysis scripts under scripts/: the parts that compute, on small data."""
import importlib.util
import os
import sys

import numpy as np
import pytest

from qtx.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod  # dataclasses look their module up here
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("shape_scale", [1.0, 0.5])
def test_background_patches_match_the_rendered_shape(shape_scale):
  locate = _load("outlier_locate")
  src = synthetic.SyntheticShapes("eval", image_size=32, seed=3, size=40, shape_scale=shape_scale)
  bg = locate.background_patches(src, 40, patch=4)  # 40 x 64
  assert bg.shape == (40, 64) and 0 < bg.mean() < 1
  for i in range(40):
    rng = src.rng(i)
    image = synthetic.render(synthetic.sample_attributes(rng), 32, rng, noise=0,
                             shape_scale=shape_scale)
    # without noise a pixel is grey (R = G = B) exactly when it is background (no grey colours)
    grey = (image[..., 0] == image[..., 1]) & (image[..., 1] == image[..., 2])
    patch_grey = grey.reshape(8, 4, 8, 4).all(axis=(1, 3)).reshape(-1)
    np.testing.assert_array_equal(bg[i], patch_grey)


def test_mutation_check_mutants_apply_to_the_code():
  """Every mutant of scripts/mutation_check.py still edits code that exists (exactly once), and
  names test files that exist, so the documented mutation table can be re-run."""
  mc = _load("mutation_check")
  assert mc.check_snippets() == []
  assert len(mc.MUTANTS) >= 20
