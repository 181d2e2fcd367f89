"""Metrics sink: one JSON object per logging event in WORKDIR/metrics.jsonl, plus TensorBoard
event files beside it (tensorboardX, no TensorFlow needed)."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath


def is_remote(path: str) -> bool:
  """gs://, s3:// and other URL-style paths (handled through etils.epath)."""
  return "://" in str(path)


def _py(v: Any):
  if isinstance(v, (np.ndarray, jax.Array)):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  return v


class MetricsWriter:
  """Appends to metrics.jsonl (only process 0 writes)."""

  def __init__(self, workdir: str, enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(str(workdir), "metrics.jsonl")
    self._tb = None
    self._remote_lines = None
    if self.enabled:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      if is_remote(workdir):  # object stores cannot append: rewrite the whole (small) file
        p = epath.Path(self.path)
        self._remote_lines = p.read_text().splitlines() if p.exists() else []
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter
          self._tb = SummaryWriter(logdir=workdir, flush_secs=30)
        except ImportError:  # optional
          self._tb = None

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _py(v) for k, v in metrics.items()})
    line = json.dumps(row, allow_nan=True)
    if self._remote_lines is not None:
      self._remote_lines.append(line)
      epath.Path(self.path).write_text("\n".join(self._remote_lines) + "\n")
    else:
      with open(self.path, "a") as f:
        f.write(line + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) \
            and math.isfinite(v):
          self._tb.add_scalar(k, v, int(step))

  def close(self):
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None


def write_row(workdir: str, step: int, metrics: Mapping[str, Any], summary: str = "") -> None:
  """One row of `metrics` at `step` to WORKDIR/metrics.jsonl (and TensorBoard); `summary` is
  printed on process 0 (a mode's one-line end-of-run report)."""
  writer = MetricsWriter(workdir)
  try:
    writer.write(step, metrics)
  finally:
    writer.close()
  if summary and jax.process_index() == 0:
    print(summary, flush=True)


def read(workdir_or_path: str) -> list[dict]:
  path = epath.Path(workdir_or_path)
  if path.is_dir():
    path = path / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


SUMMARY_FIELDS = (("train/loss", "loss", "{:.4f}"),
                  ("eval/zeroshot_top1", "zero-shot top-1", "{:.1%}"),
                  ("eval/i2t_r1", "i2t R@1", "{:.1%}"),
                  ("eval/t2i_r1", "t2i R@1", "{:.1%}"),
                  ("outliers/max_inf_norm", "max inf-norm", "{:.2f}"),
                  ("outliers/avg_kurtosis", "avg kurtosis", "{:.2f}"),
                  ("train/samples_per_sec_steady", "samples/s", "{:.0f}"))


def summary_line(head: str, step: int, m: Mapping[str, Any], fields=SUMMARY_FIELDS) -> str:
  """'head: step N | label value | ...' for the fields present in m (end-of-run line)."""
  parts = [f"{head}: step {step}"]
  for key, label, fmt in fields:
    if key in m:
      parts.append(f"{label} {fmt.format(float(m[key]))}")
  # each extra zero-shot evaluator (eval.zeroshot: eval/<name>/zeroshot_top1), after the rest
  for key in sorted(m):
    parts_of = key.split("/")
    if len(parts_of) == 3 and parts_of[0] == "eval" and parts_of[2] == "zeroshot_top1":
      parts.append(f"{parts_of[1]} zero-shot top-1 {float(m[key]):.1%}")
  return " | ".join(parts)


def mean_std_table(results, columns, label: str = "normalizer") -> str:
  """Markdown table of runs grouped by row name: {row: [metrics of each seed]} and columns
  (metric key, header, multiplier). Cells are the mean +- sample std over the seeds that have
  the metric ('-' when none); percentages (multiplier != 1) to one decimal, others to 3
  significant digits."""
  header = f"| {label} | seeds | " + " | ".join(c[1] for c in columns) + " |"
  rows = [header, "|" + "---|" * (len(columns) + 2)]
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
