"""Sweep mode: train the config with each remedy preset and several seeds, run PTQ on each
trained model, and write the result tables (mean +- std over seeds) and a figure.

  python -m qtx.main --config configs/clip_tiny.py --workdir runs/remedies --config.mode=sweep \
      --config.sweep.normalizers=softmax,clipped_softmax,gated,softplus,softmax_sink,registers \
      --config.sweep.seeds=0,1,2 --config.quant.settings=w8a8_token,w4a8 \
      --config.sweep.out=docs/remedies.md

Each row applies its preset (`config_lib.set_normalizer`: the normalizer and gate of both
towers, alpha for clipped softmax, or registers / Muon on top of softmax) to the config; every
other key, command-line overrides included, is the config's. A row may carry its own settings
after the preset, each as `@KEY=VALUE`, applied after the preset: a bare KEY is a field of both
towers' attention blocks, a dotted KEY a config path, e.g.
`clipped_softmax@alpha=0.25,clipped_softmax@model.text.attention.alpha=2@zeta=1.5` (two rows). The tables: quality (float, the
config's PTQ setting and each of quant.settings), the mechanism (outliers per tower, where the
attention goes, qtx.analysis.attention_mass, train step time relative to the softmax row) and
cost; the figure (next to sweep.out, .png) draws the first two. Every (preset, seed) run lives in WORKDIR/<preset>/seed<k>
with its own metrics.jsonl; finished runs are reused, so an interrupted sweep continues where it
stopped, and `sweep.only_finished=True` tabulates the finished runs without training any.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np

from qtx import config_lib

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

STEP_TIME = "step_time_vs_softmax"
MECHANISM = (
    ("outliers/image/max_inf_norm", "image max inf-norm", 1.0),
    ("outliers/image/avg_kurtosis", "image avg kurtosis", 1.0),
    ("outliers/text/max_inf_norm", "text max inf-norm", 1.0),
    ("outliers/text/avg_kurtosis", "text avg kurtosis", 1.0),
    ("attn/image/null_mass", "image mass on no key", 1.0),
    ("attn/image/first_key_mass", "image mass on class token", 1.0),
    ("attn/image/background_mass", "image mass on background", 1.0),
    ("attn/image/register_mass", "image mass on registers", 1.0),
    ("attn/text/null_mass", "text mass on no key", 1.0),
    ("attn/text/first_key_mass", "text mass on start token", 1.0),
    ("attn/text/first_key_mass_filler", "text start-token mass, filler queries", 1.0),
    ("attn/text/first_key_mass_content", "text start-token mass, content queries", 1.0),
    ("attn/image/prob_tiny_mass", "image mass below 1/510", 1.0),
    ("attn/text/prob_tiny_mass", "text mass below 1/510", 1.0),
    (STEP_TIME, "train step time vs softmax", 1.0),
)

EXTRA = (
    ("eval/t2i_r1", "FP t2i R@1 (%)", 100.0),
    ("eval/zeroshot_top5", "FP zero-shot top-5 (%)", 100.0),
    ("train/samples_per_sec_steady", "train samples/s", 1.0),
    ("train_seconds", "train wall s", 1.0),
    ("ptq/total_seconds", "PTQ wall s", 1.0),
    ("peak_rss_gib", "peak RSS GiB", 1.0),
)


def _words(spec: str, what: str) -> list[str]:
  words = [w.strip() for w in str(spec).split(",") if w.strip()]
  if not words:
    raise ValueError(f"sweep.{what} is empty; give comma-separated values")
  return words


def parse_row(row: str) -> tuple[str, list[str]]:
  """A sweep row 'PRESET[@KEY=VALUE...]' -> (preset, config overrides 'path=value'): a bare
  KEY names a field of both towers' attention blocks, a dotted KEY is a config path."""
  if "/" in row or row.strip() in (".", ".."):
    raise ValueError(f"sweep.normalizers: row {row!r} has a '/'; a row names its run folder, "
                     f"so its settings cannot hold paths (set those for the whole sweep)")
  preset, *settings = [w.strip() for w in row.split("@")]
  if preset not in config_lib.NORMALIZER_PRESETS:
    raise ValueError(f"sweep.normalizers: unknown preset {preset!r} in row {row!r}; choose "
                     f"from {config_lib.NORMALIZER_PRESETS}")
  overrides = []
  for s in settings:
    key, sep, value = s.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"sweep.normalizers: {s!r} in row {row!r} is not KEY=VALUE "
                       f"(e.g. clipped_softmax@alpha=0.5)")
    key = key.strip()
    paths = ([key] if "." in key else
             [f"model.{t}.attention.{key}" for t in ("image", "text")])
    overrides += [f"{p}={value.strip()}" for p in paths]
  return preset, overrides


def plan(config) -> list[tuple[str, int]]:
  """(row, seed) pairs of the sweep, seed-major (every row has a first result early)."""
  presets = _words(config.sweep.normalizers, "normalizers")
  for p in presets:
    run_config(config, p, 0, "train")  # names a bad preset, setting or key before any training
  if len(set(presets)) != len(presets):
    raise ValueError(f"sweep.normalizers: a row is listed twice in {config.sweep.normalizers!r}")
  try:
    seeds = [int(s) for s in _words(config.sweep.seeds, "seeds")]
  except ValueError as e:
    raise ValueError(f"sweep.seeds must be comma-separated integers, got "
                     f"{config.sweep.seeds!r}") from e
  return [(p, s) for s in seeds for p in presets]


def run_config(config, preset: str, seed: int, mode: str):
  """The config of one sweep run: `config` with the row's preset and settings (`parse_row`),
  the seed and the mode."""
  c = config.copy_and_resolve_references()
  name, overrides = parse_row(preset)
  config_lib.set_normalizer(c, name)
  for o in overrides:
    try:
      config_lib.override(c, o)
    except (ValueError, TypeError) as e:
      raise ValueError(f"sweep row {preset!r}: {e}") from None
  c.seed = seed
  c.mode = mode
  return c


# Keys that decide a run's result (a finished run is reused only when they match); the train
# block's logging interval does not.
_RESULT_KEYS = ("seed", "model.", "data.", "train.")
_NOT_RESULT_KEYS = ("train.log_every",)


def settings_changed(saved: dict, config) -> list[str]:
  """'key: saved -> wanted' for every result-defining key of `config` whose value differs from
  the saved config.json of a finished run (keys the saved config predates are not compared)."""
  return [f"{k}: {a!r} -> {b!r}"
          for k, (a, b) in config_lib.differences(saved, config, both=True).items()
          if (k == "seed" or k.startswith(_RESULT_KEYS[1:])) and k not in _NOT_RESULT_KEYS]


def run_one(config, preset: str, seed: int, workdir: str) -> dict:
  """Train and PTQ of one (preset, seed); the result is cached in WORKDIR/done.json."""
  from qtx import modes
  done = os.path.join(workdir, "done.json")
  if os.path.exists(done):
    saved = os.path.join(workdir, "config.json")
    if os.path.exists(saved):
      with open(saved) as f:
        changed = settings_changed(json.load(f), run_config(config, preset, seed, "train"))
      if changed:
        raise ValueError(
            f"sweep: {workdir} holds a finished run of row {preset!r} seed {seed} made with "
            f"other settings ({'; '.join(changed)}); its result would be tabulated under this "
            f"row. Move it away or use another --workdir to train the row anew, or restore "
            f"those settings")
    with open(done) as f:
      return json.load(f)
  t0 = time.perf_counter()
  train_out = modes.run(run_config(config, preset, seed, "train"), workdir)
  train_s = time.perf_counter() - t0
  if "preempted_at" in train_out:
    # SIGTERM: the run saved a checkpoint and stopped early; do not record it as finished and
    # do not start the next run (rerunning the same command resumes it).
    raise SystemExit(f"{preset} seed {seed} was preempted at step "
                     f"{train_out['preempted_at']}; rerun the same command to resume")
  ptq = run_config(config, preset, seed, "ptq")
  ptq.init_from = workdir
  ptq_out = modes.run(ptq, os.path.join(workdir, "ptq"))
  result = {**{k: v for k, v in train_out.items() if isinstance(v, (int, float))},
            **{k: v for k, v in ptq_out.items() if isinstance(v, (int, float))},
            "train_seconds": train_s,
            # peak resident memory of this process so far (it ran every earlier run too)
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
  with open(done, "w") as f:
    json.dump(result, f, indent=1)
  return result


def quality_columns(config) -> tuple:
  """FP, the config's own PTQ setting and each named setting of quant.settings: zero-shot
  top-1 and i2t R@1."""
  from qtx.analysis.quantized import bits_label, quant_config, setting_names
  main = bits_label(quant_config(config))
  names = [main] + [n for n in setting_names(config.quant.get("settings", "")) if n != main]
  cols = [("eval/zeroshot_top1", "FP zero-shot top-1 (%)", 100.0)]
  cols += [(f"ptq/{n}_zeroshot_top1", f"{n.upper()} zero-shot top-1 (%)", 100.0) for n in names]
  # the loss of each setting, per run (paired: seeds differ more than settings do)
  cols += [(f"ptq/{n}_zeroshot_loss", f"{n.upper()} zero-shot loss (points)", 100.0)
           for n in names]
  cols += [("eval/i2t_r1", "FP i2t R@1 (%)", 100.0)]
  cols += [(f"ptq/{n}_i2t_r1", f"{n.upper()} i2t R@1 (%)", 100.0) for n in names]
  return tuple(cols)


def with_losses(results: dict[str, list[dict]]) -> dict[str, list[dict]]:
  """A copy of results where each run also has, per quantization setting n it was evaluated
  in, ptq/<n>_zeroshot_loss = float zero-shot top-1 (PTQ's float evaluation, else the
  training's) - its top-1 under n."""
  def add(r):
    fp = r.get("ptq/fp_zeroshot_top1", r.get("eval/zeroshot_top1"))  # PTQ's own float eval
    extra = {}
    for k, v in r.items():
      if fp is not None and k.startswith("ptq/") and k.endswith("_zeroshot_top1") and \
          not k.startswith("ptq/fp_"):
        extra[k[:-len("_zeroshot_top1")] + "_zeroshot_loss"] = fp - v
    return {**r, **extra}
  return {name: [add(r) for r in runs] for name, runs in results.items()}


def with_step_time(results: dict[str, list[dict]], baseline: str = "softmax"
                   ) -> dict[str, list[dict]]:
  """A copy of results where each run also has its train step time relative to the baseline
  row's mean (from the steady samples/s); unchanged copies when the baseline has no timing."""
  key = "train/samples_per_sec_steady"
  base = [r[key] for r in results.get(baseline, []) if key in r]
  mean = float(np.mean(base)) if base else None
  return {name: [{**r, **({STEP_TIME: mean / r[key]} if mean and key in r else {})}
                 for r in runs] for name, runs in results.items()}


def table(results: dict[str, list[dict]], columns=COLUMNS, drop_absent: bool = False) -> str:
  """Markdown table: one row per preset, mean +- sample std over its seeds, '-' when absent;
  with drop_absent, columns no run has are left out (e.g. register mass without registers)."""
  from qtx import metrics
  if drop_absent:
    present = {k for runs in results.values() for r in runs for k in r}
    columns = tuple(c for c in columns if c[0] in present)
  return metrics.mean_std_table(results, columns, label="normalizer")


def run(config, workdir: str) -> dict:
  """Every (preset, seed) of the sweep; returns {preset: [result per seed]}. The table is
  rewritten to sweep.out (when set) after every run."""
  pairs = plan(config)
  results: dict[str, list[dict]] = {p: [] for p, _ in pairs}
  cmd = "python -m qtx.main " + " ".join(sys.argv[1:]) if sys.argv[1:] else "(library call)"
  quality = quality_columns(config)
  t = ""
  only_finished = bool(config.sweep.get("only_finished", False))
  for preset, seed in pairs:
    run_dir = os.path.join(workdir, preset, f"seed{seed}")
    if only_finished and not os.path.exists(os.path.join(run_dir, "done.json")):
      continue
    r = run_one(config, preset, seed, run_dir)
    results[preset].append(r)
    shown = {k: v for k, v in results.items() if v}  # rows with a finished run
    print(f"{preset} seed {seed}: " + ", ".join(
        f"{k}={r[k]:.4g}" for k, *_ in quality + MECHANISM + EXTRA if k in r), flush=True)
    t = table(with_losses(shown), quality)
    if config.sweep.out:
      figure = os.path.splitext(config.sweep.out)[0] + ".png"
      from qtx.analysis import figures
      figures.plot_remedies(shown, quality, figure)
      with open(config.sweep.out, "w") as f:
        f.write(f"Command: `{cmd}`\n\nSeeds finished so far per row in the 'seeds' column; "
                f"mean ± std over seeds.\n\n### Quality\n\n{t}\n\n### Mechanism\n\n"
                f"{table(with_step_time(shown), MECHANISM, drop_absent=True)}\n\n### Cost\n\n{table(shown, EXTRA)}\n\n"
                f"![remedies]({os.path.basename(figure)})\n")
  print(t)
  return results
