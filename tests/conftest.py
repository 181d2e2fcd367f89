"""Test set-up: 8 simulated CPU devices (for sharding tests), quiet logs, small tiny configs."""
import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


def micro_config(preset="softmax", **overrides):
  """A very small model (fast tests): 16x16 images, patch 4, width 32, 2 layers."""
  from qtx import config_lib
  c = config_lib.tiny_config(preset)
  c.model.embed_dim = 16
  for t in (c.model.image, c.model.text):
    t.width, t.depth, t.heads, t.mlp_dim = 32, 2, 2, 64
  c.model.image.image_size = 16
  c.model.image.patch_size = 4
  c.model.text.context_length = 16
  c.train.batch_size = 16
  c.train.total_steps = 6
  c.train.warmup_steps = 2
  c.train.log_every = 2
  c.eval.every_steps = 0
  c.eval.num_samples = 64
  c.eval.batch_size = 32
  c.data.synthetic.eval_size = 64
  c.mesh.shape = {"data": 1, "fsdp": 1, "tensor": 1}
  c.mesh.num_devices = 1
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


@pytest.fixture
def micro():
  return micro_config
