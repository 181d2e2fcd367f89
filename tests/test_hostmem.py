"""qtx.hostmem: with glibc malloc set to reuse freed memory, a compiled CPU step stops
page-faulting its temporary buffer in again on every call."""
import os
import subprocess
import sys

import pytest

from qtx import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process: the setting must come before JAX starts its threads.
SCRIPT = r"""
import resource, sys
from qtx import hostmem
if sys.argv[1] == "1":
  assert hostmem.reuse_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) * 2.0, 0) + jnp.sum(jnp.exp(x), 1)[:1])
x = jnp.ones((2048, 4096), jnp.float32) * 1e-3  # temporaries of 16 MB and more
for _ in range(3):
  f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 5)
"""


def _faults(apply: str) -> float:
  env = {k: v for k, v in os.environ.items() if k != hostmem.ENV}
  out = subprocess.run([sys.executable, "-c", SCRIPT, apply], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300, check=True)
  return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_reused_memory_is_not_page_faulted_again():
  plain, reused = _faults("0"), _faults("1")
  # 64 MB of temporaries is ~16,000 pages each call without it
  assert plain > 4000, plain
  assert reused < plain / 10, (plain, reused)


def test_cpu_only_from_the_platforms_or_the_installed_plugins():
  assert hostmem.cpu_only("cpu") and hostmem.cpu_only(" cpu, ")
  assert not hostmem.cpu_only("cuda,cpu") and not hostmem.cpu_only("tpu")
  # nothing named: an installed accelerator plugin (numpy stands for one) means not CPU-only
  assert not hostmem.cpu_only("", plugins=("no_such_plugin_x", "numpy"))
  assert hostmem.cpu_only("", plugins=("no_such_plugin_x",))


def test_the_switch_turns_it_off(monkeypatch):
  monkeypatch.setenv(hostmem.ENV, "0")
  assert hostmem.maybe_reuse_freed_memory() is False
