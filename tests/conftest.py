"""Test set-up: 8 simulated CPU devices (for sharding tests), quiet logs, small tiny configs."""
import atexit
import os
import shutil
import tempfile

# The tests run tiny programs a few steps each, so XLA's compile time dominates the suite:
# compile without the backend's optimisation passes (the same HLO, the same semantics), and
# share compiled programs between tests and worker processes (subprocesses inherit both) through
# a compilation cache that lives for this run only, so every run compiles from scratch once.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="qtx-tests-jit-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
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
