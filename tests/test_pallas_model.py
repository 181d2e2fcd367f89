"""impl='pallas' in the attention module: a full tiny-model train step equals impl='xla'."""
import chex
import jax
import numpy as np
import pytest

from conftest import micro_config
from qtx import parallel, train


def _batch(c):
  rng = np.random.default_rng(0)
  s = c.model.image.image_size
  tokens = rng.integers(1, 1000, (c.train.batch_size, c.model.text.context_length))
  tokens[:, 6] = 49407
  return {"image": rng.integers(0, 256, (c.train.batch_size, s, s, 3), dtype=np.uint8),
          "tokens": tokens.astype(np.int32)}


def _one_step(c):
  s = train.setup(c)
  state = train.init_state(s, 0)
  step = train.make_train_step(s)
  state, m = step(state, parallel.global_batch(_batch(c), s.mesh, s.rules))
  return float(m["train/loss"]), jax.device_get(state.params)


@pytest.mark.parametrize("preset,gamma", [("gated", None), ("clipped_softmax", -0.03)])
def test_train_step_pallas_equals_xla(preset, gamma):
  results = {}
  for impl in ("xla", "pallas"):
    c = micro_config(preset, **{"train.batch_size": 4})
    for t in (c.model.image, c.model.text):
      t.depth = 1  # interpret-mode Pallas is slow on CPU
      t.attention.impl = impl
      if gamma is not None:
        t.attention.alpha = None
        t.attention.gamma = gamma
    results[impl] = _one_step(c)
  np.testing.assert_allclose(results["pallas"][0], results["xla"][0], rtol=1e-5)
  # params after one AdamW step (lr-sized updates); differences are float32 rounding
  chex.assert_trees_all_close(results["pallas"][1], results["xla"][1], rtol=1e-4, atol=1e-5)
