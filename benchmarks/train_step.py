"""Train-step throughput of a config on the current backend.

  python -m benchmarks.train_step --config configs/clip_tiny.py --batch 128 --steps 20
  python -m benchmarks.train_step --config configs/clip_b16.py --batch 256 --dtype bfloat16 \
      --remat dots --scan
  python -m benchmarks.train_step --config configs/clip_tiny.py:softplus --steps 30 \
      --set model.image.attention.softplus_p=1.0000001 --set model.text.attention.softplus_p=1.0000001

Prints steps/s, samples/s, model TFLOP/s per device (analytic FLOPs, and XLA's count of the
compiled step), MFU against the device's peak (none on CPU), memory per device, host page
faults per step and the compile time. The baseline row is the same config with impl='xla' float32, measured in the same process, so
every other row reads as a ratio to it. `--set KEY=VALUE` (repeatable) changes the measured row
only, so a config option can be compared against the config as it is.

`--op-profile N` also traces N steps of each row with the JAX profiler and prints where the
step's time goes: XLA op time per step grouped by op kind (fusion names without their numeric
suffix, e.g. `ynn_fusion` or `dot` for matmuls on CPU), both rows side by side; with
`--op-group part`, grouped by tower, part of the model and direction instead ('image
attention bwd', from each op's JAX name scope). Op times are
summed over threads, so on a multi-core CPU they add up to more than the step's wall time.

  python -m benchmarks.train_step --config configs/clip_tiny.py --steps 20 --op-profile 5 \
      --set model.image.attention.normalizer=softplus --set model.text.attention.normalizer=softplus \
      --set model.image.attention.softplus_p=1.0 --set model.text.attention.softplus_p=1.0
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import resource
import statistics
import tempfile
import time

import jax
import numpy as np

from qtx.aot.hlo import part_of  # noqa: F401 (the grouping of op names, one home)
from qtx import flops as flops_lib
from qtx import parallel
from qtx import run as run_lib
from qtx import step as step_lib


def load_config(path: str):
  from qtx import config_lib
  return config_lib.load_config_file(path)


def _op_ms(trace_events, steps: int):
  """(name, milliseconds per step) of each complete ('X') event of a profiler trace, the
  executor's own spans and Python frames (names starting with '$') left out."""
  for e in trace_events:
    name = e.get("name", "")
    if e.get("ph") == "X" and "dur" in e and not name.startswith(("$", "ThunkExecutor")):
      yield name, e["dur"] / 1e3 / steps


def op_time_by_kind(trace_events, steps: int) -> dict[str, float]:
  """Milliseconds per step of each XLA op kind in a profiler trace: ops grouped by name without
  a trailing '.N' (`ynn_fusion.12` -> `ynn_fusion`)."""
  by_kind: collections.Counter = collections.Counter()
  for name, ms in _op_ms(trace_events, steps):
    by_kind[re.sub(r"\.\d+$", "", name)] += ms
  return dict(by_kind)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """{instruction name: its op_name metadata (the JAX name scope), '' where it has none} of
  every instruction of a compiled HLO module."""
  names = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if m:
      scope = re.search(r'op_name="([^"]*)"', line)
      names[m.group(1)] = scope.group(1) if scope else ""
  return names


def op_time_by_part(trace_events, steps: int, op_names: dict[str, str]) -> dict[str, float]:
  """Milliseconds per step of each part of the model (part_of) in a profiler trace. Events
  that are no instruction of the module (the host-side call and other spans that
  op_time_by_kind cannot tell from ops) are left out."""
  by_part: collections.Counter = collections.Counter()
  for name, ms in _op_ms(trace_events, steps):
    if name in op_names:
      by_part[part_of(op_names[name])] += ms
  return dict(by_part)


def profile_ops(compiled, state, batch, steps: int, op_names=None) -> dict[str, float]:
  """XLA op time per step of `steps` traced calls: by op kind, or by part of the model
  (op_time_by_part) when `op_names` (hlo_op_names of the compiled step) is given."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(steps):
        state, m = compiled(state, batch)
      jax.block_until_ready(m)
    files = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
    if not files:
      raise RuntimeError(f"the profiler wrote no trace under {d}")
    with gzip.open(files[0]) as f:
      events = json.load(f)["traceEvents"]
  if op_names is not None:
    return op_time_by_part(events, steps, op_names)
  return op_time_by_kind(events, steps)


def random_batch(config, s):
  """A global batch of random uint8 images and tokens (end-of-text last) for `config`."""
  B, im = config.train.batch_size, config.model.image
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 1000, (B, config.model.text.context_length)).astype(np.int32)
  tokens[:, -1] = 49407
  return parallel.global_batch({
      "image": rng.integers(0, 256, (B, im.image_size, im.image_size, im.channels), np.uint8),
      "tokens": tokens}, s.mesh, s.rules)


def measure(config, steps: int, warmup: int = 2, op_profile: int = 0,
            op_group: str = "kind") -> dict:
  s = run_lib.build(config, train=True)
  state = run_lib.init_state(s, 0)
  step_fn = step_lib.make_train_step(s)
  B = config.train.batch_size
  batch = random_batch(config, s)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  times = []
  faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps
  dt = statistics.median(times)
  ops = None
  if op_profile:
    names = hlo_op_names(compiled.as_text()) if op_group == "part" else None
    ops = profile_ops(compiled, state, batch, op_profile, names)
  n_dev = s.mesh.devices.size
  model_flops = flops_lib.train_step_flops(config)
  xla_flops = flops_lib.compiled_flops(compiled)
  peak = flops_lib.peak_tflops(s.mesh.devices.flat[0])
  tflops = model_flops / dt / n_dev / 1e12
  mem = None
  try:
    ma = compiled.memory_analysis()
    mem = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
           - ma.alias_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every backend reports it
    pass
  est = None
  try:  # the compiler's cost-model roofline of the same executable (qtx.aot.report)
    from qtx import chips
    from qtx.aot import report
    chip = chips.of_device(s.mesh.devices.flat[0])
    if chip is not None:
      est = report.analyse(compiled, n_dev, model_flops, chip).get("roofline_s")
  except Exception:  # noqa: BLE001 - an estimate must never break a measurement
    est = None
  return {"step_s": dt, "steps_per_s": 1 / dt, "samples_per_s": B / dt, "tflops": tflops,
          "roofline_s": est,
          "xla_tflops": (xla_flops / dt / n_dev / 1e12) if xla_flops else None,
          "mfu": tflops / peak if peak else None, "mem_gib": mem / 2**30 if mem else None,
          "compile_s": compile_s, "devices": n_dev, "ops": ops, "faults": faults}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/clip_tiny.py")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--remat", default="none")
  p.add_argument("--scan", action="store_true")
  p.add_argument("--impl", default="xla", choices=["xla", "pallas"])
  p.add_argument("--mesh", default=None, help="e.g. 1,-1,1 for (data, fsdp, tensor)")
  p.add_argument("--no-baseline", action="store_true")
  p.add_argument("--op-profile", type=int, default=0, metavar="N",
                 help="trace N more steps per row and print XLA op time per step by op kind")
  p.add_argument("--op-group", default="kind", choices=["kind", "part"],
                 help="group the op profile by XLA op kind, or by tower / part of the model / "
                      "direction ('image attention bwd')")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for the measured row (not the baseline)")
  args = p.parse_args()

  def make(dtype, remat, scan, impl, overrides=()):
    from qtx import config_lib
    c = load_config(args.config)
    for o in overrides:
      config_lib.override(c, o)
    if args.batch:
      c.train.batch_size = args.batch
    if args.mesh:
      sizes = [int(x) for x in args.mesh.split(",")]
      if len(sizes) != 3:
        p.error(f"--mesh takes three sizes (data,fsdp,tensor), got {args.mesh!r}")
      c.mesh.shape = dict(zip(("data", "fsdp", "tensor"), sizes))
    c.model.dtype, c.model.remat, c.model.scan = dtype, remat, scan
    for t in (c.model.image, c.model.text):
      t.attention.impl = impl
    return c

  dev = jax.devices()[0]
  print(f"backend {jax.default_backend()} | device {dev.device_kind} x {jax.device_count()} | "
        f"config {args.config} | batch {make('float32', 'none', False, 'xla').train.batch_size}")
  rows = []
  if not args.no_baseline:
    rows.append(("baseline f32 xla", measure(make("float32", "none", False, "xla"), args.steps,
                                             op_profile=args.op_profile,
                                             op_group=args.op_group)))
  rows.append((f"{args.dtype} remat={args.remat} scan={args.scan} {args.impl}"
               + "".join(f" {o}" for o in args.set),
               measure(make(args.dtype, args.remat, args.scan, args.impl, args.set), args.steps,
                       op_profile=args.op_profile, op_group=args.op_group)))
  base = rows[0][1]["step_s"]
  fmt = lambda v, f: "-" if v is None else f.format(v)
  print(f"{'variant':42s} {'step ms':>9s} {'samples/s':>10s} {'TFLOP/s/dev':>11s} "
        f"{'XLA TFLOP/s':>11s} {'MFU':>6s} {'mem GiB':>8s} {'faults/step':>11s} "
        f"{'compile s':>9s} {'speedup':>8s}")
  for name, r in rows:
    print(f"{name:42s} {r['step_s'] * 1e3:9.1f} {r['samples_per_s']:10.1f} "
          f"{r['tflops']:11.3f} {fmt(r['xla_tflops'], '{:11.3f}'):>11s} "
          f"{fmt(r['mfu'], '{:6.1%}'):>6s} {fmt(r['mem_gib'], '{:8.2f}'):>8s} "
          f"{r['faults']:11.0f} {r['compile_s']:9.1f} {base / r['step_s']:8.2f}x")
  if args.op_profile:
    print_op_table(rows, *(("parts of the model", "part") if args.op_group == "part"
                           else ("op kinds", "op kind")))


def print_op_table(rows, what: str = "op kinds", label: str = "op kind", top: int = 20) -> None:
  kinds = collections.Counter()
  for _, r in rows:
    kinds.update(r["ops"])
  names = [k for k, _ in kinds.most_common(top)]
  print(f"\nXLA op time per step (ms, summed over threads), top {len(names)} {what}:")
  print(f"{label:40s}" + "".join(f" {f'row {i}':>10s}" for i in range(len(rows))))
  for k in names + ["(all ops)"]:
    vals = [sum(r["ops"].values()) if k == "(all ops)" else r["ops"].get(k, 0.0) for _, r in rows]
    print(f"{k[:40]:40s}" + "".join(f" {v:10.2f}" for v in vals))


if __name__ == "__main__":
  from qtx import hostmem
  hostmem.maybe_reuse_freed_memory()  # as python -m qtx.main does on the CPU
  main()
