"""Two-pass attention kernel (clipped softmax) vs jax.nn.dot_product_attention, same run.

  python -m benchmarks.attention             # GPU/TPU: ViT-B/16, CLIP text and T=1024 shapes
  python -m benchmarks.attention --quick     # small shapes (on CPU: interpret mode)
  python -m benchmarks.attention --backward  # forward + backward

Per shape it prints the median time and TFLOP/s of
- the two-pass kernel with clipped softmax (gamma, default -0.003) -- the configuration the
  targets are about,
- the two-pass kernel with plain softmax,
- jax.nn.dot_product_attention with plain softmax (the default implementation; also cuDNN on GPU
  in bfloat16 when available),
and the ratio XLA time / clipped-kernel time (>= 0.7 is the target at T = 197 and T = 1024).
FLOPs are the model FLOPs 4 B H T S K (halved for causal), times 3.5 with --backward
(FlashAttention's convention); the kernel's second pass recomputes q.k, which is not counted.
The last column is the largest difference of the plain-softmax kernel from XLA's output.

On CPU the kernel runs in Pallas interpret mode: correctness only, timings are not meaningful.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import device_info, time_fn
from qtx import kernels

# (label, B, T, H, K, causal, padded keys)
GPU_SHAPES = [
    ("ViT-B/16 B=128 T=197 H=12 K=64", 128, 197, 12, 64, False, False),
    ("CLIP text B=256 T=77 H=8 K=64 causal+pad", 256, 77, 8, 64, True, True),
    ("T=1024 B=16 H=12 K=64", 16, 1024, 12, 64, False, False),
    ("T=1024 B=16 H=12 K=64 causal", 16, 1024, 12, 64, True, False),
]
QUICK_SHAPES = [
    ("ViT T=197 (small)", 1, 197, 2, 64, False, False),
    ("CLIP text T=77 causal+pad (small)", 2, 77, 2, 64, True, True),
]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small shapes (CPU: interpret mode)")
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--gamma", type=float, default=-0.003, help="clipped softmax gamma (<= 0)")
  p.add_argument("--backward", action="store_true", help="time forward + backward")
  p.add_argument("--iters", type=int, default=None, help="timed repetitions (median)")
  p.add_argument("--block-q", type=int, default=None)
  p.add_argument("--block-k", type=int, default=None)
  return p.parse_args(argv)


def _timed_fn(f, backward):
  if not backward:
    return jax.jit(f)

  def run(q, k, v, lengths):
    out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, lengths), q, k, v)
    return out, vjp(out)

  return jax.jit(run)


def main(argv=None):
  args = parse_args(argv)
  platform, kind, _ = device_info()
  dtype = jnp.dtype(args.dtype)
  iters = args.iters or (2 if platform == "cpu" else 20)
  shapes = QUICK_SHAPES if (args.quick or platform == "cpu") else GPU_SHAPES
  print(f"device: {kind} ({platform}); dtype {dtype.name}; gamma={args.gamma}; "
        f"backward={args.backward}")
  if platform == "cpu":
    print("CPU: the kernel runs in Pallas interpret mode -- correctness only, timings are not "
          "meaningful.")
  header = (f"{'shape':42s} {'clip ms':>9s} {'TF/s':>6s} {'plain ms':>9s} {'TF/s':>6s} "
            f"{'xla ms':>9s} {'TF/s':>6s} {'xla/clip':>9s} {'cudnn ms':>9s} {'max|err|':>9s}")
  print(header)
  print("-" * len(header))
  blocks = dict(block_q=args.block_q, block_k=args.block_k)
  for label, B, T, H, K, causal, padded in shapes:
    kq, kk, kv, kl = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(key, (B, T, H, K), jnp.float32).astype(dtype)
               for key in (kq, kk, kv))
    lengths = (jax.random.randint(kl, (B,), 5, T + 1) if padded
               else jnp.full((B,), T, jnp.int32))

    def key_mask(lengths):
      return (jnp.arange(T)[None, :] < lengths[:, None]) if padded else None

    def clipped(q, k, v, lengths):
      return kernels.two_pass_attention(q, k, v, causal=causal, key_mask_BxS=key_mask(lengths),
                                        gamma=args.gamma, **blocks)

    def plain(q, k, v, lengths):
      return kernels.two_pass_attention(q, k, v, causal=causal, key_mask_BxS=key_mask(lengths),
                                        **blocks)

    def xla(q, k, v, lengths, implementation=None):
      return jax.nn.dot_product_attention(
          q, k, v, is_causal=causal, implementation=implementation,
          key_value_seq_lengths=lengths if padded else None)

    fns = {name: _timed_fn(f, args.backward)
           for name, f in (("clip", clipped), ("plain", plain), ("xla", xla))}
    out_plain = jax.tree.leaves(fns["plain"](q, k, v, lengths))[0].astype(jnp.float32)
    out_xla = jax.tree.leaves(fns["xla"](q, k, v, lengths))[0].astype(jnp.float32)
    err = float(jnp.max(jnp.abs(out_plain - out_xla)))
    times = {name: time_fn(f, q, k, v, lengths, iters=iters) for name, f in fns.items()}
    cudnn = "-"
    if platform == "gpu" and dtype == jnp.bfloat16:
      try:
        f = _timed_fn(lambda *a: xla(*a, implementation="cudnn"), args.backward)
        cudnn = f"{1e3 * time_fn(f, q, k, v, lengths, iters=iters):9.3f}"
      except Exception as e:  # cuDNN attention is optional here
        cudnn = f"n/a ({type(e).__name__})"
    flops = 4.0 * B * H * T * T * K * (0.5 if causal else 1.0) * (3.5 if args.backward else 1.0)
    tf = {name: flops / t / 1e12 for name, t in times.items()}
    print(f"{label:42s} {1e3 * times['clip']:9.3f} {tf['clip']:6.1f} "
          f"{1e3 * times['plain']:9.3f} {tf['plain']:6.1f} {1e3 * times['xla']:9.3f} "
          f"{tf['xla']:6.1f} {times['xla'] / times['clip']:9.2f} {cudnn:>9s} {err:9.2e}",
          flush=True)


if __name__ == "__main__":
  main()
