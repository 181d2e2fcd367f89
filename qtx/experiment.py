"""The normalizer comparison: train the same config with each normalizer and several seeds,
run PTQ on each trained model, and write one table (mean +- std over seeds).

  python -m qtx.experiment --config configs/clip_tiny.py --workdir runs/sweep \
      --normalizers softmax,clipped_softmax,gated,softplus --seeds 0,1,2 --out docs/results_sweep.md

Every (normalizer, seed) run lives in WORKDIR/<normalizer>/seed<k> with its own metrics.jsonl;
finished runs are reused, so an interrupted sweep continues where it stopped. Extra
`--set KEY=VALUE` options override config fields of every run.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import time

import numpy as np

COLUMNS = (
    ("eval/zeroshot_top1", "FP zero-shot top-1 (%)", 100.0),
    ("ptq/w8a8_zeroshot_top1", "W8A8 zero-shot top-1 (%)", 100.0),
    ("eval/i2t_r1", "FP i2t R@1 (%)", 100.0),
    ("ptq/w8a8_i2t_r1", "W8A8 i2t R@1 (%)", 100.0),
    ("outliers/max_inf_norm", "max inf-norm", 1.0),
    ("outliers/avg_kurtosis", "avg kurtosis", 1.0),
    ("outliers/image/max_inf_norm", "image max inf-norm", 1.0),
    ("outliers/text/max_inf_norm", "text max inf-norm", 1.0),
)


EXTRA = (
    ("eval/t2i_r1", "FP t2i R@1 (%)", 100.0),
    ("eval/zeroshot_top5", "FP zero-shot top-5 (%)", 100.0),
    ("train/samples_per_sec_steady", "train samples/s", 1.0),
    ("train_seconds", "train wall s", 1.0),
    ("ptq/total_seconds", "PTQ wall s", 1.0),
    ("peak_rss_gib", "peak RSS GiB", 1.0),
)


def load_config(path: str):
  from qtx import config_lib
  return config_lib.load_config_file(path)


def _set(config, assignment: str):
  key, _, value = assignment.partition("=")
  node = config
  *path, last = key.split(".")
  for p in path:
    node = node[p]
  try:
    value = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    pass
  node[last] = value


def _last_metrics(workdir: str) -> dict:
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    for line in open(path):
      out.update(json.loads(line))
  return out


def run_one(config_path, normalizer, seed, workdir, overrides) -> dict:
  from qtx import main as qmain
  done = os.path.join(workdir, "done.json")
  if os.path.exists(done):
    return json.load(open(done))
  config = load_config(f"{config_path}:{normalizer}")
  config.seed = seed
  for o in overrides:
    _set(config, o)
  t0 = time.perf_counter()
  config.mode = "train"
  train_out = qmain.run(config, workdir)
  train_s = time.perf_counter() - t0
  if "preempted_at" in train_out:
    # SIGTERM: the run saved a checkpoint and stopped early; do not record it as finished and
    # do not start the next run (rerunning the same command resumes it).
    raise SystemExit(f"{normalizer} seed {seed} was preempted at step "
                     f"{train_out['preempted_at']}; rerun the same command to resume")
  config.mode = "ptq"
  config.init_from = workdir
  ptq_out = qmain.run(config, os.path.join(workdir, "ptq"))
  result = {**{k: v for k, v in train_out.items() if isinstance(v, (int, float))},
            **{k: v for k, v in ptq_out.items() if isinstance(v, (int, float))},
            "train_seconds": train_s,
            # peak resident memory of this process so far (it ran every earlier run too)
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
  with open(done, "w") as f:
    json.dump(result, f, indent=1)
  return result


def table(results: dict[str, list[dict]], columns=COLUMNS) -> str:
  header = "| normalizer | seeds | " + " | ".join(c[1] for c in columns) + " |"
  sep = "|" + "---|" * (len(columns) + 2)
  rows = [header, sep]
  for name, runs in results.items():
    cells = []
    for key, _, mult in columns:
      vals = np.asarray([r[key] for r in runs if key in r], np.float64) * mult
      if len(vals) == 0:
        cells.append("-")
      elif len(vals) == 1:
        cells.append(f"{vals[0]:.3g}" if mult == 1.0 else f"{vals[0]:.1f}")
      else:
        fmt = "{:.3g} ± {:.2g}" if mult == 1.0 else "{:.1f} ± {:.1f}"
        cells.append(fmt.format(vals.mean(), vals.std(ddof=1)))
    rows.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/clip_tiny.py")
  p.add_argument("--workdir", required=True)
  p.add_argument("--normalizers", default="softmax,clipped_softmax,gated,softplus")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
  p.add_argument("--out", default=None, help="markdown file to write the table to")
  args = p.parse_args()
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  names = args.normalizers.split(",")
  seeds = [int(x) for x in args.seeds.split(",")]
  results: dict[str, list[dict]] = {n: [] for n in names}
  cmd = "python -m qtx.experiment " + " ".join(
      [f"--config {args.config}", f"--workdir {args.workdir}", f"--normalizers {args.normalizers}",
       f"--seeds {args.seeds}"] + [f"--set {x}" for x in args.set]
      + ([f"--out {args.out}"] if args.out else []))
  for seed in seeds:  # seed-major: every normalizer has a first result early
    for name in names:
      wd = os.path.join(args.workdir, name, f"seed{seed}")
      r = run_one(args.config, name, seed, wd, args.set)
      results[name].append(r)
      print(f"{name} seed {seed}: " + ", ".join(
          f"{k}={r[k]:.4g}" for k, *_ in COLUMNS + EXTRA if k in r), flush=True)
      t = table(results)
      if args.out:
        with open(args.out, "w") as f:
          f.write(f"Command: `{cmd}`\n\nSeeds finished so far per row in the 'seeds' column."
                  f"\n\n{t}\n\n{table(results, EXTRA)}\n")
  print(t)


if __name__ == "__main__":
  main()
