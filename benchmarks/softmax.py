"""Two-pass softmax kernel vs XLA's jax.nn.softmax, measured in the same run.

  python -m benchmarks.softmax               # GPU/TPU: ViT/CLIP score shapes and long rows
  python -m benchmarks.softmax --quick       # a few small shapes (on CPU: interpret mode)
  python -m benchmarks.softmax --clipped --mask --backward

Per shape it prints the median time, the achieved bandwidth counting one read of x and one write
of y (GB/s; with --mask also one read of the boolean mask), the fraction of the device's peak HBM
bandwidth when known, and the ratio XLA time / kernel time (> 1: the kernel is faster). The XLA
baseline is jax.nn.softmax (with --clipped: the jnp clipped softmax of qtx.kernels.reference).
With --backward both sides are timed for forward + backward (a VJP) and only times are compared.

On CPU the kernel runs in Pallas interpret mode: the numbers check correctness end to end and say
nothing about speed.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import device_info, time_fn
from qtx import kernels
from qtx.kernels import reference

# (label, rows, row length): attention scores B*H*T rows of length T, and long rows.
GPU_SHAPES = [
    ("ViT-B/16 scores B=128 H=12 T=197", 128 * 12 * 197, 197),
    ("CLIP text scores B=256 H=8 T=77", 256 * 8 * 77, 77),
    ("scores B=16 H=12 T=1024", 16 * 12 * 1024, 1024),
    ("long rows 8192 x 32768", 8192, 32768),
    ("long rows 2048 x 131072", 2048, 131072),
]
QUICK_SHAPES = [
    ("ViT scores T=197 (small)", 2 * 197, 197),
    ("CLIP text scores T=77 (small)", 4 * 77, 77),
    ("T=1024 (small)", 16, 1024),
    ("long row 4 x 8192", 4, 8192),
]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="a few small shapes (CPU: interpret mode)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--clipped", action="store_true", help="clipped softmax, gamma = -1 / N")
  p.add_argument("--mask", action="store_true", help="a random boolean mask (75%% attended)")
  p.add_argument("--backward", action="store_true", help="time forward + backward")
  p.add_argument("--iters", type=int, default=None, help="timed repetitions (median)")
  p.add_argument("--peak-gbs", type=float, default=None, help="peak HBM GB/s for the %% column")
  p.add_argument("--block-rows", type=int, default=None, help="kernel row block (power of 2)")
  p.add_argument("--block-cols", type=int, default=None, help="kernel column chunk (power of 2)")
  p.add_argument("--shapes", default=None,
                 help="comma-separated RxN overrides, e.g. 4096x1024,128x65536")
  return p.parse_args(argv)


def _shapes(args, platform):
  if args.shapes:
    out = []
    for s in args.shapes.split(","):
      r, n = s.lower().split("x")
      out.append((f"{r} x {n}", int(r), int(n)))
    return out
  return QUICK_SHAPES if (args.quick or platform == "cpu") else GPU_SHAPES


def _fns(args, n_cols):
  gamma = -1.0 / n_cols if args.clipped else None

  def kernel(x, where):
    return kernels.two_pass_softmax(x, where=where, gamma=gamma, block_rows=args.block_rows,
                                    block_cols=args.block_cols)

  def xla(x, where):
    if gamma is None:
      return jax.nn.softmax(x, axis=-1, where=where)
    return reference.softmax_ref(x, where=where, gamma=gamma)

  if not args.backward:
    return jax.jit(kernel), jax.jit(xla)

  def with_vjp(f):
    def run(x, where):
      y, vjp = jax.vjp(lambda x: f(x, where), x)
      return y, vjp(y)[0]
    return jax.jit(run)

  return with_vjp(kernel), with_vjp(xla)


def main(argv=None):
  args = parse_args(argv)
  platform, kind, peak = device_info()
  peak = args.peak_gbs or peak
  dtype = jnp.dtype(args.dtype)
  iters = args.iters or (3 if platform == "cpu" else 20)
  print(f"device: {kind} ({platform}); dtype {dtype.name}; clipped={args.clipped} "
        f"mask={args.mask} backward={args.backward}; peak HBM "
        f"{f'{peak:.0f} GB/s' if peak else 'unknown'}")
  if platform == "cpu":
    print("CPU: the kernel runs in Pallas interpret mode -- correctness only, timings are not "
          "meaningful.")
  header = (f"{'shape':40s} {'rows x len':>16s} {'kernel ms':>10s} {'GB/s':>8s} {'%peak':>6s} "
            f"{'xla ms':>9s} {'xla GB/s':>9s} {'xla/kern':>9s} {'max|err|':>9s}")
  print(header)
  print("-" * len(header))
  for label, rows, n in _shapes(args, platform):
    kx, km = jax.random.split(jax.random.PRNGKey(0))
    x = (4.0 * jax.random.normal(kx, (rows, n), jnp.float32)).astype(dtype)
    where = jax.random.bernoulli(km, 0.75, (rows, n)) if args.mask else None
    kernel, xla = _fns(args, n)
    err = jnp.max(jnp.abs(jnp.asarray(jax.tree.leaves(kernel(x, where))[0], jnp.float32)
                          - jnp.asarray(jax.tree.leaves(xla(x, where))[0], jnp.float32)))
    t_k = time_fn(kernel, x, where, iters=iters)
    t_x = time_fn(xla, x, where, iters=iters)
    nbytes = 2 * rows * n * dtype.itemsize + (rows * n if args.mask else 0)
    gbs_k, gbs_x = nbytes / t_k / 1e9, nbytes / t_x / 1e9
    pct = f"{100 * gbs_k / peak:5.1f}" if (peak and not args.backward) else "  -  "
    if args.backward:
      gbs_k_s, gbs_x_s = "-", "-"
    else:
      gbs_k_s, gbs_x_s = f"{gbs_k:.1f}", f"{gbs_x:.1f}"
    print(f"{label:40s} {f'{rows}x{n}':>16s} {1e3 * t_k:10.3f} {gbs_k_s:>8s} {pct:>6s} "
          f"{1e3 * t_x:9.3f} {gbs_x_s:>9s} {t_x / t_k:9.2f} {float(err):9.2e}", flush=True)


if __name__ == "__main__":
  main()
