"""Side by side: PTQ metrics of the same trained models measured by two versions of the code.

  # the sweep's models, measured again by the code before the measurement corrections
  git worktree add /tmp/qtx_old 42744f9
  (cd /tmp/qtx_old && PYTHONPATH=. python -m qtx.main --config configs/clip_tiny.py:NORM \
      --workdir $PWD_MAIN/runs/oldmeasure/NORM/seedK --config.mode=ptq \
      --config.init_from=$PWD_MAIN/runs/sweep/NORM/seedK --config.seed=K \
      --config.mesh.num_devices=1)          # for every NORM and K
  python scripts/measurement_shift.py runs/sweep runs/oldmeasure

Prints one markdown row per (normalizer, seed): the new value (from the sweep's done.json) and
the old one (the last metrics.jsonl row of the old PTQ run) of each metric.
"""
from __future__ import annotations

import json
import os
import sys

METRICS = (("ptq/w8a8_zeroshot_top1", "W8A8 zero-shot", 100), ("ptq/w8a8_i2t_r1", "W8A8 i2t R@1", 100),
           ("outliers/text/max_inf_norm", "text max inf-norm", 1),
           ("outliers/image/max_inf_norm", "image max inf-norm", 1),
           ("outliers/text/avg_kurtosis", "text avg kurtosis", 1),
           ("outliers/avg_kurtosis", "avg kurtosis", 1))


def _last(path):
  row = {}
  for line in open(path):
    row.update(json.loads(line))
  return row


def main(new_root: str, old_root: str) -> None:
  head = " | ".join(f"{label} new / old" for _, label, _ in METRICS)
  print(f"| run | {head} |\n|---|" + "---|" * len(METRICS))
  for norm in sorted(os.listdir(old_root)):
    for seed in sorted(os.listdir(os.path.join(old_root, norm))):
      old_path = os.path.join(old_root, norm, seed, "metrics.jsonl")
      new_path = os.path.join(new_root, norm, seed, "done.json")
      if not (os.path.isfile(old_path) and os.path.isfile(new_path)):
        continue
      old, new = _last(old_path), json.load(open(new_path))
      cells = [f"{new[k] * m:.{1 if m == 100 else 2}f} / {old[k] * m:.{1 if m == 100 else 2}f}"
               for k, _, m in METRICS]
      print(f"| {norm} {seed} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main(*sys.argv[1:3])
