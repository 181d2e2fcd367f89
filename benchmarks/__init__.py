"""Reproducible timing scripts; each prints ratios against a baseline measured in the same run.

Run from the repository root: `python -m benchmarks.softmax --quick`.
"""
import statistics
import time

import jax

# Peak HBM bandwidth (GB/s) by device kind, for the "% of peak" column (override with a flag).
PEAK_GBS = {
    "H200": 4800.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100-SXM4-40GB": 1555.0,
    "A100": 1555.0,
    "L4": 300.0,
    "TPU v4": 1200.0,
    "TPU v5 lite": 819.0,
    "TPU v5e": 819.0,
    "TPU v5p": 2765.0,
    "TPU v6 lite": 1640.0,
}


def device_info():
  """(platform, device kind, known peak GB/s or None)."""
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", str(dev))
  peak = next((v for k, v in PEAK_GBS.items() if k in kind), None)
  return dev.platform, kind, peak


def time_fn(fn, *args, iters=20, warmup=2):
  """Median wall time in seconds of fn(*args) (compiled first, outputs blocked on)."""
  jax.block_until_ready(fn(*args))
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)
