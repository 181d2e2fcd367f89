"""One-shot accelerator check: every kernel compiled and checked, their speed, the ViT-B/16 step.

  python -m benchmarks.device_check --out device_check.md      # on one GPU (H100/H200) or TPU
  python -m benchmarks.device_check --dry-run --out /tmp/x.md  # CPU: tiny shapes, interpret mode

Runs unattended from the root of a clean checkout with only the packages of a JAX accelerator
machine (jax with CUDA or TPU support, flax, optax, orbax, chex, ml_collections; nothing to
install, and none of qtx's data packages: the test suite runs it with grain, regex, PIL and the
rest hidden), in under 8 minutes (a deadline, --budget_s, skips what would not fit and says
so). It writes one markdown report naming the device:

1. correctness: each Pallas kernel compiled for the backend (Triton on GPU, Mosaic on TPU;
   interpreted on CPU) against its XLA reference, forward and backward: two-pass softmax
   (plain, clipped, masked), logsumexp, two-pass attention (softmax, clipped, sink, softplus;
   causal with padding);
2. two-pass softmax against jax.nn.softmax at ViT/CLIP score shapes and long rows: time, GB/s
   (one read of x, one write of y), % of the device's HBM peak, ratio;
3. two-pass attention (softmax, clipped, sink, softplus) against jax.nn.dot_product_attention at
   T = 197 and 1024, forward + backward, bfloat16, block sizes autotuned over a small grid;
4. the ViT-B/16 CLIP train step (bfloat16, remat) at the largest batch that fits: samples/s,
   model TFLOP/s per device and MFU, beside the compiler's cost-model roofline of the same
   executable (qtx.aot.report: an estimate; the measured step says how good it is).

Timing: the sides of a comparison alternate over several rounds in one process; the median of
the round medians is reported with the spread (min-max of the rounds' medians).
"""
from __future__ import annotations

import argparse
import platform as py_platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import device_info
from qtx import kernels
from qtx.kernels import reference


class Deadline:
  def __init__(self, seconds: float):
    self.end = time.perf_counter() + seconds

  def left(self) -> float:
    return self.end - time.perf_counter()


def alternate(fns: dict, args: tuple, rounds: int, iters: int) -> dict:
  """{name: (median seconds, spread)}: every fn compiled, then `rounds` rounds in which each fn
  runs `iters` times in turn; median of the round medians, spread = max - min of them."""
  for f in fns.values():
    jax.block_until_ready(f(*args))
  per = {k: [] for k in fns}
  for _ in range(rounds):
    for name, f in fns.items():
      ts = []
      for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
      per[name].append(statistics.median(ts))
  return {k: (statistics.median(v), max(v) - min(v)) for k, v in per.items()}


# ----------------------------------------------------------------------------- correctness

def _attn_ref(q, k, v, causal, km, gamma=None, sink=None):
  if sink is None:
    return reference.attention_ref(q, k, v, causal=causal, key_mask_BxS=km, gamma=gamma)
  from qtx.nn.normalizers import softmax_with_sink
  T, K = q.shape[1], q.shape[3]
  s = jnp.einsum("bthk,bshk->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) / np.sqrt(K)
  p = softmax_with_sink(s, jnp.broadcast_to(sink, s.shape[:3] + (1,)),
                        where=reference.attention_mask(T, T, causal, km))
  return jnp.einsum("bhts,bshk->bthk", p, v.astype(jnp.float32))


def _softplus_ref(q, k, v, km, p=3.0):
  from qtx.nn.normalizers import plain_softplus_reweight
  B, T, H, K = q.shape
  where = jnp.broadcast_to(reference.attention_mask(T, T, True, km), (B, H, T, T))
  n = jnp.sum(where, -1, keepdims=True).astype(jnp.float32)
  s = jnp.einsum("bthk,bshk->bhts", q.astype(jnp.float32), k.astype(jnp.float32))
  s = s * np.log(K) * jnp.log(jnp.maximum(n, 2.0))
  return jnp.einsum("bhts,bshk->bthk", plain_softplus_reweight(s, where, p, 1e-6),
                    v.astype(jnp.float32))


def correctness_rows(dry: bool) -> list[list[str]]:
  rows = []
  rng = jax.random.split(jax.random.key(0), 6)
  R, N = (16, 260) if dry else (4096, 1024)
  x = 4 * jax.random.normal(rng[0], (R, N))
  where = jax.random.uniform(rng[1], (R, N)) < 0.8

  def err(f, f_ref, *a):
    out, vjp = jax.vjp(f, *a)
    out_r, vjp_r = jax.vjp(f_ref, *a)
    ct = jax.random.normal(jax.random.key(7), out.shape, jnp.float32).astype(out.dtype)
    e_out = float(jnp.max(jnp.abs(out.astype(jnp.float32) - out_r.astype(jnp.float32))))
    e_grad = max(float(jnp.max(jnp.abs(a1.astype(jnp.float32) - a2.astype(jnp.float32))))
                 for a1, a2 in zip(vjp(ct), vjp_r(ct)))
    return e_out, e_grad

  cases = [
      ("two_pass_softmax", lambda x: kernels.two_pass_softmax(x),
       lambda x: jax.nn.softmax(x), (x,), 1e-5),
      ("two_pass_softmax masked, clipped", lambda x: kernels.two_pass_softmax(
          x, where=where, gamma=-0.01), lambda x: reference.softmax_ref(
              x, where=where, gamma=-0.01), (x,), 1e-5),
      ("logsumexp", lambda x: kernels.logsumexp(x), lambda x: jax.nn.logsumexp(x, -1), (x,),
       1e-4),
  ]
  B, T, H, K = (2, 37, 1, 16) if dry else (8, 197, 12, 64)
  q, k, v = (jax.random.normal(r, (B, T, H, K)) for r in rng[3:6])
  km = jnp.arange(T)[None, :] < jnp.linspace(T, T // 3, B).astype(jnp.int32)[:, None]
  sink = jnp.linspace(-1.0, 1.0, H)[:, None, None]
  for label, kw in (("softmax", {}), ("clipped", {"gamma": -1.0 / T}), ("sink", {"sink": sink})):
    cases.append((f"two_pass_attention {label}, causal + padding",
                  lambda q, k, v, kw=kw: kernels.two_pass_attention(
                      q, k, v, causal=True, key_mask_BxS=km, **kw),
                  lambda q, k, v, kw=kw: _attn_ref(q, k, v, True, km, **kw), (q, k, v), 5e-5))
  nrm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  cases.append(("two_pass_attention softplus p=3, causal + padding",
                lambda q, k, v: kernels.two_pass_attention(
                    nrm(q), nrm(k), v, causal=True, key_mask_BxS=km, softplus_p=3.0),
                lambda q, k, v: _softplus_ref(nrm(q), nrm(k), v, km), (q, k, v), 5e-5))
  for name, f, f_ref, a, tol in cases:
    try:
      e_out, e_grad = err(jax.jit(f), jax.jit(f_ref), *a)
      ok = e_out <= tol and e_grad <= 10 * tol
      rows.append([name, f"{e_out:.1e}", f"{e_grad:.1e}", "pass" if ok else "FAIL"])
    except Exception as e:  # noqa: BLE001 - the report says what broke
      rows.append([name, "-", "-", f"ERROR {type(e).__name__}: {str(e)[:120]}"])
  return rows


# ----------------------------------------------------------------------------- softmax speed

def softmax_rows(dry: bool, peak_gbs, deadline: Deadline, rounds: int, iters: int):
  shapes = ([("T=197 scores (small)", 197, 197), ("long row 2 x 4096", 2, 4096)] if dry else
            [("ViT-B/16 scores B=128 H=12 T=197", 128 * 12 * 197, 197),
             ("CLIP text scores B=256 H=8 T=77", 256 * 8 * 77, 77),
             ("scores B=16 H=12 T=1024", 16 * 12 * 1024, 1024),
             ("long rows 8192 x 32768", 8192, 32768)])
  rows = []
  for label, R, N in shapes:
    if deadline.left() < 30:
      rows.append([label, "skipped (time budget)", "", "", "", ""])
      continue
    for dtype in (jnp.float32, jnp.bfloat16):
      x = jax.random.normal(jax.random.key(1), (R, N)).astype(dtype)
      fns = {"kernel": jax.jit(lambda x: kernels.two_pass_softmax(x)),
             "xla": jax.jit(lambda x: jax.nn.softmax(x))}
      try:
        t = alternate(fns, (x,), rounds, iters)
      except Exception as e:  # noqa: BLE001
        rows.append([f"{label} {jnp.dtype(dtype).name}", f"ERROR {e}"[:120], "", "", "", ""])
        continue
      gbs = 2 * x.size * x.dtype.itemsize / t["kernel"][0] / 1e9
      pct = f"{100 * gbs / peak_gbs:.0f}%" if peak_gbs else "-"
      rows.append([f"{label} {jnp.dtype(dtype).name}",
                   f"{1e3 * t['kernel'][0]:.3f} ± {1e3 * t['kernel'][1]:.3f}",
                   f"{1e3 * t['xla'][0]:.3f}", f"{gbs:.0f}", pct,
                   f"{t['xla'][0] / t['kernel'][0]:.2f}x"])
  return rows


# ----------------------------------------------------------------------------- attention speed

def _block_grid(platform: str, T: int, dry: bool):
  if dry:
    return [(None, None), (16, 32)]
  if platform == "tpu":
    return [(None, None), (128, 256), (256, 128), (256, 256)]
  return [(None, None)] + [(bq, bk) for bq in (32, 64, 128) for bk in (32, 64, 128)
                           if bq <= max(32, T) and bk <= max(32, T)]


def attention_rows(dry: bool, plat: str, deadline: Deadline, rounds: int, iters: int):
  shapes = [(1, 33, 1, 16)] if dry else [(64, 197, 12, 64), (8, 1024, 12, 64)]
  dtype = jnp.float32 if dry else jnp.bfloat16
  rows = []
  for B, T, H, K in shapes:
    q, k, v = (jax.random.normal(r, (B, T, H, K)).astype(dtype)
               for r in jax.random.split(jax.random.key(2), 3))

    def fwd_bwd(f):
      return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)),
                              argnums=(0, 1, 2)))

    base = {"xla": fwd_bwd(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))}
    if plat == "gpu":
      base["cudnn"] = fwd_bwd(lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, implementation="cudnn"))
    base_t = {}
    for name, f in base.items():
      try:
        base_t[name] = alternate({name: f}, (q, k, v), rounds, iters)[name][0]
      except Exception:  # noqa: BLE001 - cudnn may not support the shape
        pass
    sink = jnp.zeros((H, 1, 1))
    for label, kw in (("softmax", {}), ("clipped", {"gamma": -0.003}), ("sink", {"sink": sink}),
                      ("softplus", {"softplus_p": 1.0})):
      if deadline.left() < 45:
        rows.append([f"T={T} {label}", "skipped (time budget)", "", "", ""])
        continue
      best = None
      grid = _block_grid(plat, T, dry)
      if dry and label != "softmax":
        grid = grid[:1]  # the dry run exercises the search once
      for bq, bk in grid:
        f = fwd_bwd(lambda q, k, v, kw=kw, bq=bq, bk=bk: kernels.two_pass_attention(
            q, k, v, block_q=bq, block_k=bk, **kw))
        try:
          t = alternate({"k": f}, (q, k, v), max(1, rounds // 2), iters)["k"][0]
        except Exception:  # noqa: BLE001 - a block size the backend refuses
          continue
        if best is None or t < best[0]:
          best = (t, bq, bk)
        if deadline.left() < 45:
          break
      if best is None:
        rows.append([f"T={T} {label}", "ERROR: no block size compiled", "", "", ""])
        continue
      _, bq, bk = best
      f = fwd_bwd(lambda q, k, v, kw=kw: kernels.two_pass_attention(q, k, v, block_q=bq,
                                                                     block_k=bk, **kw))
      t = alternate({"k": f, "base": base[min(base_t, key=base_t.get)]}, (q, k, v), rounds, iters)
      rows.append([f"B={B} T={T} H={H} K={K} {label}",
                   f"{1e3 * t['k'][0]:.3f} ± {1e3 * t['k'][1]:.3f}",
                   f"{1e3 * t['base'][0]:.3f} ({min(base_t, key=base_t.get)})",
                   f"{t['base'][0] / t['k'][0]:.2f}x",
                   "default" if bq is None else f"{bq} x {bk}"])
  return rows


# ----------------------------------------------------------------------------- train step

def train_rows(dry: bool, deadline: Deadline):
  from benchmarks.train_step import measure
  from qtx import config_lib
  rows = []
  batches = [8] if dry else [1024, 512, 256, 128]
  for B in batches:
    if deadline.left() < (20 if dry else 90):
      rows.append([f"batch {B}", "skipped (time budget)", "", "", "", "", ""])
      break
    if dry:
      c = config_lib.tiny_config()
      c.model.image.depth = c.model.text.depth = 1
      label = "tiny CLIP (dry run), float32"
    else:
      c = config_lib.b16_config()
      c.data.allow_synthetic = True
      label = "ViT-B/16 CLIP, bfloat16, remat=dots"
    c.train.batch_size = B
    c.mesh.num_devices = 1
    c.mesh.shape = {"data": 1, "fsdp": 1, "tensor": 1}
    try:
      m = measure(c, steps=2 if dry else 5, warmup=1)
    except Exception as e:  # noqa: BLE001 - out of memory: try a smaller batch
      msg = str(e).splitlines()[0][:100]
      rows.append([f"{label}, batch {B}", f"did not fit/run: {type(e).__name__} {msg}",
                   "", "", "", "", ""])
      continue
    mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] else "- (no peak for this device)"
    mem = f"{m['mem_gib']:.1f}" if m["mem_gib"] else "-"
    est = (f"{1e3 * m['roofline_s']:.1f} / {1e3 * m['step_s']:.1f}" if m.get("roofline_s")
           else f"- / {1e3 * m['step_s']:.1f}")
    rows.append([f"{label}, batch {B}", f"{m['samples_per_s']:.0f}", f"{m['tflops']:.1f}", mfu,
                 mem, f"{m['compile_s']:.0f}", est])
    break
  return rows


# ----------------------------------------------------------------------------- report

def _table(header, rows):
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(out)


def main(argv=None) -> str:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, interpret mode")
  ap.add_argument("--out", default="device_check.md")
  ap.add_argument("--budget_s", type=float, default=450.0, help="deadline for the whole run")
  a = ap.parse_args(argv)
  t_start = time.perf_counter()
  deadline = Deadline(a.budget_s)
  plat, kind, peak_gbs = device_info()
  from qtx import flops
  peak_tf = flops.peak_tflops()
  rounds, iters = (2, 2) if a.dry_run else (5, 10)
  import flax
  import optax
  env = (f"Device: **{kind}** ({plat}, {jax.device_count()} device(s)); jax {jax.__version__}, "
         f"flax {flax.__version__}, optax {optax.__version__}, Python "
         f"{py_platform.python_version()}. Peak HBM {peak_gbs or '-'} GB/s, peak "
         f"{peak_tf or '-'} TFLOP/s (bf16 dense).")
  if a.dry_run:
    env += " **Dry run**: tiny shapes, kernels interpreted on CPU; no figure here is a speed."
  sections = [f"# Device check\n\nCommand: `python -m benchmarks.device_check "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{env}"]

  def section(title, header, fn):
    t0 = time.perf_counter()
    try:
      rows = fn()
    except Exception:  # noqa: BLE001 - keep going: the rest of the report still matters
      rows = [["ERROR"] + [traceback.format_exc().splitlines()[-1][:150]] + [""] *
              (len(header) - 2)]
    sections.append(f"## {title}\n\n{_table(header, rows)}\n\n({time.perf_counter() - t0:.0f} s)")
    print(sections[-1], flush=True)

  section("1. Kernels against XLA (max abs error)", ["kernel", "output", "gradient", "result"],
          lambda: correctness_rows(a.dry_run))
  section("2. Two-pass softmax vs jax.nn.softmax",
          ["shape", "kernel ms", "jax.nn.softmax ms", "kernel GB/s", "% HBM peak",
           "speed-up"], lambda: softmax_rows(a.dry_run, peak_gbs, deadline, rounds, iters))
  section("3. Two-pass attention vs jax.nn.dot_product_attention (forward + backward)",
          ["shape / normalizer", "kernel ms", "fused baseline ms", "speed-up", "best blocks"],
          lambda: attention_rows(a.dry_run, plat, deadline, rounds, iters))
  section("4. CLIP train step", ["model, batch", "samples/s", "TFLOP/s per device", "MFU",
                                 "memory GiB", "compile s",
                                 "cost-model roofline ms / measured step ms"],
          lambda: train_rows(a.dry_run, deadline))
  sections.append(f"Total {time.perf_counter() - t_start:.0f} s.")
  text = "\n\n".join(sections) + "\n"
  with open(a.out, "w") as f:
    f.write(text)
  print(f"device check written to {a.out} ({time.perf_counter() - t_start:.0f} s)")
  return text


if __name__ == "__main__":
  main()
