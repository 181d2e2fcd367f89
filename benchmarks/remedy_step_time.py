"""Train-step time of every remedy relative to softmax, all rows in one process.

  python -m benchmarks.remedy_step_time --rounds 7 --steps 5 --out docs/remedy_step_time.md

Each row is a sweep row (`PRESET[@KEY=VALUE]`, as `sweep.normalizers` takes them) applied to
`--config`, built and compiled on one device. After warming every row up, each round times
`--steps` steps of every row, the order reversed every round, so drift of the machine's speed
spreads over all rows alike. It prints each row's step time (median, min-max over rounds) and
the median of the per-round ratios row / softmax (with their range): a fair version of the
sweep's "train step time vs softmax" column, whose runs may have shared the machine or run at
different commits.
"""
from __future__ import annotations

import argparse
import statistics

PROTOCOL_ROWS = ("softmax,clipped_softmax,gated,gated_mlp,gated_all_heads,gated_elementwise,"
                 "softmax_sink,softplus,registers,muon")


def row_config(base, row: str):
  """`base` with a sweep row's preset and settings, on one device (qtx.modes.sweep.run_config)."""
  from qtx.modes import sweep
  c = sweep.run_config(base, row, 0, "train")
  c.mesh.num_devices = 1
  c.mesh.shape = {"data": 1, "fsdp": 1, "tensor": 1}
  return c


def ratios(ms: dict[str, list[float]], baseline: str) -> dict[str, list[float]]:
  """Per-round step-time ratios row / baseline (each round's rows ran back to back)."""
  base = ms[baseline]
  return {k: [a / b for a, b in zip(v, base)] for k, v in ms.items()}


def markdown(ms: dict[str, list[float]], baseline: str, header: str) -> str:
  r = ratios(ms, baseline)
  lines = [header, "",
           f"| row | ms / step, median (min-max) | time vs {baseline}, median of rounds (min-max) |",
           "|---|---|---|"]
  for k, v in ms.items():
    lines.append(f"| {k} | {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f}) | "
                 f"{statistics.median(r[k]):.3f} ({min(r[k]):.2f}-{max(r[k]):.2f}) |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/clip_tiny.py")
  p.add_argument("--rows", default=PROTOCOL_ROWS, help="comma-separated sweep rows; the first "
                 "is the baseline")
  p.add_argument("--batch", type=int, default=None, help="default: the config's batch size")
  p.add_argument("--steps", type=int, default=5, help="steps per row per round")
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override applied to every row (repeatable)")
  p.add_argument("--out", default=None, help="also write the table to this markdown file")
  args = p.parse_args(argv)
  import jax
  from benchmarks import vs_commit
  from benchmarks.train_step import load_config
  from benchmarks.vs_open_clip import qtx_stepper
  from qtx import config_lib
  base = load_config(args.config)
  if args.batch:
    base.train.batch_size = args.batch
  for kv in args.set:
    config_lib.override(base, kv)
  rows = [w.strip() for w in args.rows.split(",") if w.strip()]
  steppers = {}
  for row in rows:
    print(f"compiling {row} ...", flush=True)
    steppers[row] = qtx_stepper(row_config(base, row))
  ms = vs_commit.alternate(steppers, args.steps, args.rounds, warmup=2)
  header = (f"device {jax.devices()[0].device_kind} ({jax.device_count()} device(s), "
            f"{jax.default_backend()}) | jax {jax.__version__} | config {args.config} "
            f"{' '.join(args.set)} | batch {base.train.batch_size} | {args.rounds} rounds of "
            f"{args.steps} steps per row")
  text = markdown(ms, rows[0], header)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(f"Command: `python -m benchmarks.remedy_step_time "
              f"{' '.join(argv) if argv is not None else ' '.join(__import__('sys').argv[1:])}`"
              f"\n\n{text}")
  return ms


if __name__ == "__main__":
  from qtx import hostmem
  hostmem.maybe_reuse_freed_memory()  # as python -m qtx.main does on the CPU
  main()
