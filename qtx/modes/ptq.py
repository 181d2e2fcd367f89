"""Post-training quantization: calibrate, then evaluate float and fake-quantized in one run.

  python -m qtx.main --config configs/clip_tiny.py --workdir RUN --config.mode=ptq \
      --config.init_from=CKPT [--config.quant.weight_bits=4 ...]

1. Restore the float params (`config.init_from`, else WORKDIR's latest checkpoint).
2. Build the same model with `QuantConfig.from_config(config.quant)` and enabled=True; the params
   are shared, the calibration ranges live in the 'quant_stats' collection from `model.init`.
3. Calibrate on `quant.calib_batches` training batches (both towers, one jitted apply with
   mutable=['quant_stats'] per batch; activations pass through in float, weights are quantized).
4. Evaluate the float and the quantized model (zero-shot + retrieval) on the same eval task,
   measure the float model's outliers, print one table, save figures to WORKDIR/figures/ and
   write one metrics row:
     ptq/fp_{zeroshot_top1,i2t_r1,t2i_r1,...}, ptq/w{W}a{A}_{...}   (e.g. ptq/w8a8_zeroshot_top1)
     outliers/...                                   (qtx.analysis.outliers, float model)
     attn/...      where the heads' attention goes (qtx.analysis.attention_mass, float model)
     ptq/<setting>_{...}   each named setting of quant.settings (e.g. w8a8_token, w4a8), each
                           calibrated on the same batches
     ptq/calib_seconds          wall time of the calibration loop (compilation included)
     ptq/calib_step_seconds     median steady calibration step
     ptq/fp_step_seconds        median float forward of the same batches
     ptq/calib_overhead         calib_step_seconds / fp_step_seconds
     ptq/fp_eval_seconds, ptq/w{W}a{A}_eval_seconds   evaluation wall time after compilation
     ptq/quant_eval_overhead    quantized / float evaluation time (same process)

Ablation (`quant.ablate`, `qtx.analysis.ablation`): the quantized evaluation repeated with one
class of quantization points at a time kept in float, to find which quantizer causes a drop
before attributing it to outliers (PAPERS.md section 7). Metrics ptq/ablate/<class>/<metric>.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax

from qtx import checkpoint as ckpt_lib
from qtx import metrics as metrics_lib
from qtx import parallel
from qtx import run as run_lib
from qtx.analysis import attention_mass, outliers
from qtx.analysis.quantized import (SETTINGS, bits_label, calibrate, init_quant_stats,
                                    quant_config, quantized_metrics, setting_names,
                                    timed_evaluate)
from qtx.data import pipeline
from qtx.nn.clip import CLIP
from qtx.run import Run, build_model

TABLE_METRICS = (("zeroshot_top1", "zero-shot top-1"), ("i2t_r1", "i2t R@1"),
                 ("t2i_r1", "t2i R@1"))


# ----------------------------------------------------------------------------- calibration batches

def iter_calibration_batches(config, s: Run, num_batches: int | None = None
                             ) -> Iterator[dict]:
  """The first `quant.calib_batches` training batches as global (sharded) arrays, one at a
  time (host memory holds one batch)."""
  n = int(num_batches if num_batches is not None else config.quant.calib_batches)
  if n < 1:
    raise ValueError(f"quant.calib_batches must be >= 1, got {n}")
  it = iter(pipeline.train_dataset(config, jax.process_index(), jax.process_count()))
  for _ in range(n):
    yield parallel.global_batch(next(it), s.mesh, s.rules)


def calibration_batches(config, s: Run, num_batches: int | None = None) -> list:
  """iter_calibration_batches as a list (for repeated calibrations, e.g. the ablation)."""
  return list(iter_calibration_batches(config, s, num_batches))


def _float_step_seconds(model: CLIP, params, batch: Mapping[str, Any], repeats: int = 3
                        ) -> list[float]:
  """Steady wall time of the float forward (both towers) on one calibration batch."""
  fwd = jax.jit(lambda p, i, t: model.apply({"params": p}, i, t)[:2])
  jax.block_until_ready(fwd(params, batch["image"], batch["tokens"]))  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(params, batch["image"], batch["tokens"]))
    times.append(time.perf_counter() - t0)
  return times


# ----------------------------------------------------------------------------- report

def format_table(rows: Mapping[str, Mapping[str, float]], title: str = "") -> str:
  """rows: {row label: {metric: value}} -> a fixed-width text table (percentages)."""
  label_w = max([len("model")] + [len(r) for r in rows]) + 2
  col_w = max(len(lbl) for _, lbl in TABLE_METRICS) + 2
  lines = [title] if title else []
  lines.append("model".ljust(label_w) + "".join(lbl.rjust(col_w) for _, lbl in TABLE_METRICS))
  for label, m in rows.items():
    cells = [f"{100 * m[k]:.1f}%" if k in m else "-" for k, _ in TABLE_METRICS]
    lines.append(label.ljust(label_w) + "".join(c.rjust(col_w) for c in cells))
  return "\n".join(lines)


def _strip(m: Mapping[str, float], prefix: str) -> dict[str, float]:
  return {k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- driver

def _calibrate_timed(config, s: Run, qmodel: CLIP, params, keep_batches: bool):
  """(stats, batches kept or None, timing metrics) of the calibration of `qmodel`.

  Without calibrated quantizers (per-token activations) nothing runs and the timing is empty.
  Otherwise the batches stream through (kept only for keep_batches), and the float forward is
  timed on the last one: ptq/calib_overhead = calibration step / float forward.
  """
  stats = init_quant_stats(qmodel, config, config.seed)
  if not jax.tree.leaves(stats):
    return stats, None, {"ptq/calib_batches": 0, "ptq/calib_seconds": 0.0}
  batches = (calibration_batches(config, s) if keep_batches
             else iter_calibration_batches(config, s))
  last = []

  def keep_last(it):
    for b in it:
      last[:] = [b]
      yield b

  t0 = time.perf_counter()
  stats, times = calibrate(qmodel, params, stats, keep_last(batches))
  seconds = time.perf_counter() - t0
  calib_step = statistics.median(times[1:] or times)  # the first step compiles
  fp_step = statistics.median(_float_step_seconds(s.model, params, last[0]))
  return stats, (batches if keep_batches else None), {
      "ptq/calib_batches": len(times), "ptq/calib_seconds": seconds,
      "ptq/calib_step_seconds": calib_step, "ptq/fp_step_seconds": fp_step,
      "ptq/calib_overhead": calib_step / fp_step}


def _named_settings(config, label: str, qcfg) -> list[str]:
  """quant.settings without the config's own setting; a named setting that has the config's
  label (e.g. 'w8a8') but other fields would overwrite its metrics and is refused."""
  names = []
  for name in setting_names(config.quant.get("settings", "")):
    if name == label:
      if quant_config(config, **SETTINGS[name]) != qcfg:
        raise ValueError(f"quant.settings names {name!r}, the label of the config's own "
                         f"setting ({qcfg}), with other fields; drop it from quant.settings or "
                         "change the config's quant block")
      continue
    names.append(name)
  return names


def _evaluate_setting(config, params, name: str, task, batches):
  """(metrics ptq/<name>_<metric>, eval seconds) of one named setting (quant.settings),
  calibrated on `batches`, the main setting's."""
  qm = build_model(config, quant=quant_config(config, **SETTINGS[name]))
  stats = init_quant_stats(qm, config, config.seed)
  if jax.tree.leaves(stats):
    stats, _ = calibrate(qm, params, stats, batches)
  return quantized_metrics(qm, params, stats, task, config.eval.batch_size, prefix=f"ptq/{name}_")


def _report(step, label, qcfg, rows, metrics, num_samples, figure_paths) -> str:
  m = metrics
  title = (f"qtx ptq: step {step} | {label.upper()} ({qcfg.estimator}, weights "
           f"{qcfg.weight_granularity}, activations {qcfg.act_granularity}, "
           f"{m['ptq/calib_batches']} calibration batches) | eval {num_samples} samples")
  lines = [format_table(rows, title)]
  lines.append(f"outliers (float): max inf-norm {m['outliers/max_inf_norm']:.2f} (image "
               f"{m['outliers/image/max_inf_norm']:.2f}, text "
               f"{m['outliers/text/max_inf_norm']:.2f}) | avg kurtosis "
               f"{m['outliers/avg_kurtosis']:.2f}")
  lines.append("attention mass (float): " + " | ".join(
      f"{tower} no key {m[f'attn/{tower}/null_mass']:.2f}, first key "
      f"{m[f'attn/{tower}/first_key_mass']:.2f}, top key {m[f'attn/{tower}/top_key_mass']:.2f}"
      for tower in ("image", "text")) + f" | image background "
      f"{m['attn/image/background_mass']:.2f}")
  if "ptq/calib_overhead" in m:
    calib = (f"calibration {m['ptq/calib_seconds']:.1f}s ({m['ptq/calib_step_seconds'] * 1e3:.0f} "
             f"ms/batch, {m['ptq/calib_overhead']:.2f}x float forward)")
  else:
    calib = "calibration: none (dynamic per-token ranges)"
  lines.append(f"timing: {calib} | eval fp {m['ptq/fp_eval_seconds']:.1f}s, {label} "
               f"{m[f'ptq/{label}_eval_seconds']:.1f}s ({m['ptq/quant_eval_overhead']:.2f}x) | "
               f"total {m['ptq/total_seconds']:.1f}s")
  lines += [f"figure: {p}" for p in figure_paths]
  return "\n".join(lines)


def run(config, workdir: str, ablate: bool | None = None) -> dict:
  """PTQ mode (module docstring); returns the metrics written to WORKDIR/metrics.jsonl (plus
  'ablation': {class: metrics} when the ablation ran).

  ablate: run `ablate_points` too; None reads `config.quant.ablate` (False when absent).
  """
  if ablate is None:
    ablate = bool(config.quant.get("ablate", False))
  t_start = time.perf_counter()
  ckpt_lib.checkpoint_path(config, workdir)  # fail fast, before building anything
  s = run_lib.build(config, validate=False)
  params, step = run_lib.load_params(config, workdir, s)
  qcfg = quant_config(config)
  label = bits_label(qcfg)
  qmodel = build_model(config, quant=qcfg)
  task = pipeline.eval_task(config)
  bs = config.eval.batch_size

  # The ablation and the named settings calibrate again, so they keep the batches.
  settings = _named_settings(config, label, qcfg)
  stats, batches, metrics = _calibrate_timed(config, s, qmodel, params,
                                             keep_batches=ablate or bool(settings))
  enc_i, enc_t = run_lib.make_encoders(s)
  fp, fp_sec = timed_evaluate(lambda x: enc_i(params, x), lambda x: enc_t(params, x), task, bs,
                              prefix="ptq/fp_")
  q, q_sec = quantized_metrics(qmodel, params, stats, task, bs, prefix=f"ptq/{label}_")
  metrics.update({**fp, **q, "ptq/fp_eval_seconds": fp_sec, f"ptq/{label}_eval_seconds": q_sec,
                  "ptq/quant_eval_overhead": q_sec / fp_sec})
  metrics.update(outliers.outlier_metrics(s.model, params, task.images, task.tokens, bs))
  metrics.update(attention_mass.attention_mass_metrics(
      s.model, params, task.images, task.tokens, bs, config.model.image.patch_size,
      config.model.image.get("registers", 0), filler_ids=task.filler_token_ids()))

  rows = {"fp": _strip(fp, "ptq/fp_"), label: _strip(q, f"ptq/{label}_")}
  if settings and batches is None:  # nothing was calibrated for the main setting
    batches = calibration_batches(config, s)
  for name in settings:
    m, sec = _evaluate_setting(config, params, name, task, batches)
    metrics.update({**m, f"ptq/{name}_eval_seconds": sec})
    rows[name] = _strip(m, f"ptq/{name}_")
  ablation = None
  if ablate:
    if batches is None:  # nothing was calibrated; the weights entry still needs batches
      batches = calibration_batches(config, s)
    from qtx.analysis import ablation as ablation_lib
    ablation = ablation_lib.ablate_points(config, params, task, qcfg, stats=stats, batches=batches,
                             batch_size=bs)
    for name, m in ablation.items():
      metrics.update({f"ptq/ablate/{name}/{k}": v for k, v in m.items()})
      rows[f"{label} ({name} float)"] = m

  figure_paths = []
  if jax.process_index() == 0:
    from qtx.analysis import figures
    figure_paths = figures.save_ptq_figures(s.model, params, task, metrics,
                                            os.path.join(workdir, "figures"))
  metrics["ptq/total_seconds"] = time.perf_counter() - t_start

  metrics_lib.write_row(workdir, step, metrics,
                        _report(step, label, qcfg, rows, metrics, len(task.images), figure_paths))
  if ablation is not None:
    metrics["ablation"] = ablation
  return metrics
