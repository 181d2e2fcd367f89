"""Microbatched (GradCache-style) gradients equal full-batch gradients exactly."""
import chex
import jax
import numpy as np
import pytest

from conftest import micro_config
from qtx import flops
from qtx import run as run_lib
from qtx.modes import train as train_mode


@pytest.mark.parametrize("loss,sharded", [("clip", False), ("siglip", False),
                                         ("infoloob", False), ("clip", True), ("siglip", True)])
def test_microbatches_equal_full_batch(loss, sharded):
  """Also for InfoLOOB and for the ring (shard_map) losses on 4 simulated devices."""
  over = {"loss.sharded": True, "mesh.num_devices": 4, "mesh.shape": {"data": 4}} if sharded else {}
  c = micro_config("gated", **{"loss.name": loss, "model.image.depth": 1,
                              "model.text.depth": 1, **over})
  s = run_lib.build(c, train=True)
  mesh = s.mesh if sharded else None
  state = run_lib.init_state(s, 0)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
           "tokens": rng.integers(1, 1000, (16, 16)).astype(np.int32)}
  batch["tokens"][:, 7] = 49407
  full = jax.jit(jax.value_and_grad(
      lambda p: train_mode.loss_fn(s.model, c, p, batch, 0, mesh)[0]))(state.params)
  c.train.microbatches = 4
  (loss_m, _), g_m = jax.jit(
      lambda p: train_mode.microbatched_grads(s.model, c, p, batch, 0, mesh))(state.params)
  np.testing.assert_allclose(loss_m, full[0], rtol=1e-6)
  chex.assert_trees_all_close(g_m, full[1], rtol=1e-4, atol=1e-5)  # float32 sum order


def test_analytic_flops_of_b16():
  from qtx import config_lib
  c = config_lib.b16_config()
  f = flops.clip_forward_flops(c)
  # ViT-B/16 image tower: ~17.6 G multiply-adds at 224 px = ~35 GFLOPs
  img = f - flops.encoder_flops(77, 512, 12, 2048, causal=True) - 2 * 512 * 512
  assert 34.5e9 < img < 35.6e9
  assert flops.peak_tflops(jax.devices()[0]) is None  # CPU: no MFU
