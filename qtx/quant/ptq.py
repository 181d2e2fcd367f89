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
     outliers/...                                   (qtx.eval_run.outlier_metrics, float model)
     ptq/calib_seconds          wall time of the calibration loop (compilation included)
     ptq/calib_step_seconds     median steady calibration step
     ptq/fp_step_seconds        median float forward of the same batches
     ptq/calib_overhead         calib_step_seconds / fp_step_seconds
     ptq/fp_eval_seconds, ptq/w{W}a{A}_eval_seconds   evaluation wall time after compilation
     ptq/quant_eval_overhead    quantized / float evaluation time (same process)

Ablation (`ablate_points`, enabled by `quant.ablate`): the quantized evaluation repeated with one
class of quantization points at a time kept in float (POINT_CLASSES: input, embed, attn_scores,
attn_probs, attn_context, resid, mlp_act, linear_out, ln_out, weights), to find which quantizer
causes a drop before attributing it to outliers (PAPERS.md section 7). Metrics
ptq/ablate/<class>/<metric>.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qtx import eval_run, evaluate, parallel, train
from qtx.data import pipeline
from qtx.metrics import MetricsWriter
from qtx.nn.clip import CLIP, build_model
from qtx.quant.layers import ACT_POINTS, QUANT_STATS, ActQuant, QuantConfig

# Keys of the `quant` block read by this driver only (QuantConfig must not see them).
PTQ_KEYS = ("ablate",)
TABLE_METRICS = (("zeroshot_top1", "zero-shot top-1"), ("i2t_r1", "i2t R@1"),
                 ("t2i_r1", "t2i R@1"))


# ----------------------------------------------------------------------------- config

def quant_config(config, **overrides) -> QuantConfig:
  """QuantConfig from config.quant with enabled=True (overrides win)."""
  d = config.quant.to_dict() if hasattr(config.quant, "to_dict") else dict(config.quant)
  for k in PTQ_KEYS:
    d.pop(k, None)
  d["enabled"] = True
  d.update(overrides)
  return QuantConfig.from_config(d)


def bits_label(qcfg: QuantConfig) -> str:
  """'w8a8', 'w4a8', 'w8a16', ... (the metric name part)."""
  return f"w{qcfg.weight_bits}a{qcfg.act_bits}"


# ----------------------------------------------------------------------------- calibration

def _dummy_inputs(config, batch: int = 1):
  img, txt = config.model.image, config.model.text
  return (np.zeros((batch, img.image_size, img.image_size, img.channels), np.uint8),
          np.zeros((batch, txt.context_length), np.int32))


def init_quant_stats(model: CLIP, config, seed: int = 0) -> dict:
  """The model's 'quant_stats' collection (all counts 0); {} when nothing is calibrated."""
  images, tokens = _dummy_inputs(config)
  fn = jax.jit(lambda rng: model.init(rng, images, tokens).get(QUANT_STATS, {}))
  return nn.meta.unbox(fn(jax.random.key(seed)))


def make_calibrate_step(model: CLIP) -> Callable:
  """Jitted (params, stats, images, tokens) -> stats updated by one batch (both towers)."""

  def step(params, stats, images, tokens):
    _, upd = model.apply({"params": params, QUANT_STATS: stats}, images, tokens,
                         mutable=[QUANT_STATS])
    return upd.get(QUANT_STATS, {})

  return jax.jit(step)


def _replicate_like(tree, params):
  """tree replicated over the mesh of params (when params carry a NamedSharding), i.e. placed as
  the jitted step returns it, so the second step does not compile again."""
  for leaf in jax.tree.leaves(params):
    sh = getattr(leaf, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding):
      return jax.device_put(tree, jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec()))
  return tree


def calibrate(model: CLIP, params, stats, batches: Iterable[Mapping[str, Any]]):
  """Runs the calibration steps; returns (stats, per-step seconds, first included)."""
  step = make_calibrate_step(model)
  stats = _replicate_like(stats, params)
  times = []
  for batch in batches:
    t0 = time.perf_counter()
    stats = jax.block_until_ready(step(params, stats, batch["image"], batch["tokens"]))
    times.append(time.perf_counter() - t0)
  if not times:
    raise ValueError("calibration got no batches; set quant.calib_batches >= 1")
  return stats, times


def iter_calibration_batches(config, s: train.Setup, num_batches: int | None = None
                             ) -> Iterator[dict]:
  """The first `quant.calib_batches` training batches as global (sharded) arrays, one at a
  time (host memory holds one batch)."""
  n = int(num_batches if num_batches is not None else config.quant.calib_batches)
  if n < 1:
    raise ValueError(f"quant.calib_batches must be >= 1, got {n}")
  it = iter(pipeline.train_dataset(config, jax.process_index(), jax.process_count()))
  for _ in range(n):
    yield parallel.global_batch(next(it), s.mesh, s.rules)


def calibration_batches(config, s: train.Setup, num_batches: int | None = None) -> list:
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


# ----------------------------------------------------------------------------- evaluation

def make_quant_encoders(model: CLIP):
  """Jitted (params, stats, x) -> normalised embeddings of the fake-quantized model."""

  def wrap(method):
    return jax.jit(lambda params, stats, x: model.apply(
        {"params": params, QUANT_STATS: stats}, x, method=method))

  return wrap(CLIP.encode_image), wrap(CLIP.encode_text)


def _batch_of(x: np.ndarray, batch_size: int) -> np.ndarray:
  """The first batch_size rows of x, repeated when x is shorter (the shape evaluate uses)."""
  reps = -(-batch_size // len(x))
  return np.concatenate([x] * reps)[:batch_size] if reps > 1 else x[:batch_size]


def _warm_up(enc_i, enc_t, task, batch_size):
  """Compile both encoders on the eval batch shape so the timed runs exclude compilation."""
  jax.block_until_ready(enc_i(_batch_of(task.images, batch_size)))
  jax.block_until_ready(enc_t(_batch_of(task.tokens, batch_size)))


def timed_evaluate(enc_i, enc_t, task, batch_size: int, prefix: str):
  """(metrics, seconds) of evaluate.evaluate after compiling the encoders."""
  _warm_up(enc_i, enc_t, task, batch_size)
  t0 = time.perf_counter()
  m = evaluate.evaluate(enc_i, enc_t, task, batch_size, prefix=prefix)
  return m, time.perf_counter() - t0


def quantized_metrics(model: CLIP, params, stats, task, batch_size: int, prefix: str):
  enc_i, enc_t = make_quant_encoders(model)
  return timed_evaluate(lambda x: enc_i(params, stats, x), lambda x: enc_t(params, stats, x),
                        task, batch_size, prefix)


# ----------------------------------------------------------------------------- ablation

# Classes of activation quantization points: the ActQuant `point` names.
ACT_CLASSES = ACT_POINTS
WEIGHTS = "weights"
POINT_CLASSES = ACT_CLASSES + (WEIGHTS,)


def check_point_class(name: str) -> str:
  if name not in POINT_CLASSES:
    raise ValueError(f"unknown quantization point class {name!r}; choose one of {POINT_CLASSES}")
  return name


def act_point_class(module: ActQuant) -> str | None:
  """The ablation class of an activation quantizer (None: not in any class)."""
  return module.point if module.point in ACT_CLASSES else None


def keep_float_interceptor(keep_C) -> Callable:
  """Flax interceptor: an ActQuant of class ACT_CLASSES[i] returns its input where keep_C[i].

  keep_C is a boolean vector (traced or concrete) over ACT_CLASSES, so one compiled program
  serves every ablation entry. Selecting the input is exact: the result equals a model whose
  QuantConfig.keep_float lists that point.
  """

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != "__call__" or not isinstance(m, ActQuant):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    cls = act_point_class(m)
    if cls is None:
      return y
    return jnp.where(keep_C[ACT_CLASSES.index(cls)], args[0], y)

  return interceptor


def make_masked_encoders(model: CLIP):
  """Jitted (params, stats, keep_C, x) -> embeddings with the classes in keep_C kept float."""

  def wrap(method):
    def fn(params, stats, keep_C, x):
      with nn.intercept_methods(keep_float_interceptor(keep_C)):
        return model.apply({"params": params, QUANT_STATS: stats}, x, method=method)
    return jax.jit(fn)

  return wrap(CLIP.encode_image), wrap(CLIP.encode_text)


def keep_mask(names: Sequence[str]) -> np.ndarray:
  """Boolean vector over ACT_CLASSES, True for the listed classes."""
  for n in names:
    if n not in ACT_CLASSES:
      raise ValueError(f"unknown activation point class {n!r}; choose one of {ACT_CLASSES}")
  return np.asarray([c in names for c in ACT_CLASSES])


def float_weights_config(qcfg: QuantConfig) -> QuantConfig:
  """qcfg with float weights (kernels and LayerNorm scales): 'weights' joins keep_float."""
  keep = tuple(qcfg.keep_float) + (() if WEIGHTS in qcfg.keep_float else (WEIGHTS,))
  return dataclasses.replace(qcfg, keep_float=keep)


def ablate_points(config, params, task, qcfg: QuantConfig, stats=None,
                  batches: Sequence[Mapping[str, Any]] | None = None,
                  classes: Sequence[str] | None = None,
                  batch_size: int | None = None) -> dict[str, dict[str, float]]:
  """Quantized evaluation with one point class at a time kept in float.

  Classes: POINT_CLASSES (activation classes ACT_CLASSES, then 'weights'). stats: the calibrated
  'quant_stats' of the `qcfg` model; they serve every activation class, because calibration
  passes activations through in float (their ranges do not depend on which activation points
  are quantized); without them, or for 'weights' (which changes the calibration forward), the
  model is calibrated on `batches`. All activation classes share one compiled program.
  Returns {class: {'zeroshot_top1', 'i2t_r1', 't2i_r1', ...}}, one entry per class, in order.
  """
  names = list(POINT_CLASSES if classes is None else classes)
  for n in names:
    check_point_class(n)
  bs = batch_size or config.eval.batch_size
  out: dict[str, dict[str, float]] = {}

  def need_batches(what):
    if not batches:
      raise ValueError(f"ablation of {what} needs calibration batches")
    return batches

  act_names = [n for n in names if n in ACT_CLASSES]
  if act_names:
    model = build_model(config, quant=qcfg)
    if stats is None:
      stats, _ = calibrate(model, params, init_quant_stats(model, config),
                           need_batches("activations"))
    enc_i, enc_t = make_masked_encoders(model)
    for n in act_names:
      keep = keep_mask([n])
      out[n], _ = timed_evaluate(lambda x, k=keep: enc_i(params, stats, k, x),
                                 lambda x, k=keep: enc_t(params, stats, k, x), task, bs,
                                 prefix="")
  if WEIGHTS in names:
    model = build_model(config, quant=float_weights_config(qcfg))
    st, _ = calibrate(model, params, init_quant_stats(model, config), need_batches(WEIGHTS))
    out[WEIGHTS], _ = quantized_metrics(model, params, st, task, bs, prefix="")
  return {n: out[n] for n in names}


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

def _calibrate_timed(config, s: train.Setup, qmodel: CLIP, params, keep_batches: bool):
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


def run_ptq(config, workdir: str, ablate: bool | None = None) -> dict:
  """PTQ mode (module docstring); returns the metrics written to WORKDIR/metrics.jsonl (plus
  'ablation': {class: metrics} when the ablation ran).

  ablate: run `ablate_points` too; None reads `config.quant.ablate` (False when absent).
  """
  if ablate is None:
    ablate = bool(config.quant.get("ablate", False))
  t_start = time.perf_counter()
  eval_run.checkpoint_path(config, workdir)  # fail fast, before building anything
  s = train.setup(config)
  params, step = eval_run.load_params(config, workdir, s)
  qcfg = quant_config(config)
  label = bits_label(qcfg)
  qmodel = build_model(config, quant=qcfg)
  task = pipeline.eval_task(config)
  bs = config.eval.batch_size

  # The ablation calibrates again (float weights), so it keeps the batches.
  stats, batches, metrics = _calibrate_timed(config, s, qmodel, params, keep_batches=ablate)
  enc_i, enc_t = train.make_encoders(s)
  fp, fp_sec = timed_evaluate(lambda x: enc_i(params, x), lambda x: enc_t(params, x), task, bs,
                              prefix="ptq/fp_")
  q, q_sec = quantized_metrics(qmodel, params, stats, task, bs, prefix=f"ptq/{label}_")
  metrics.update({**fp, **q, "ptq/fp_eval_seconds": fp_sec, f"ptq/{label}_eval_seconds": q_sec,
                  "ptq/quant_eval_overhead": q_sec / fp_sec})
  metrics.update(eval_run.outlier_metrics(s.model, params, task.images, task.tokens, bs))

  rows = {"fp": _strip(fp, "ptq/fp_"), label: _strip(q, f"ptq/{label}_")}
  ablation = None
  if ablate:
    if batches is None:  # nothing was calibrated; the weights entry still needs batches
      batches = calibration_batches(config, s)
    ablation = ablate_points(config, params, task, qcfg, stats=stats, batches=batches,
                             batch_size=bs)
    for name, m in ablation.items():
      metrics.update({f"ptq/ablate/{name}/{k}": v for k, v in m.items()})
      rows[f"{label} ({name} float)"] = m

  figure_paths = []
  if jax.process_index() == 0:
    from qtx.quant import figures
    figure_paths = figures.save_ptq_figures(s.model, params, task, metrics,
                                            os.path.join(workdir, "figures"))
  metrics["ptq/total_seconds"] = time.perf_counter() - t_start

  writer = MetricsWriter(workdir)
  try:
    writer.write(step, metrics)
  finally:
    writer.close()
  if jax.process_index() == 0:
    print(_report(step, label, qcfg, rows, metrics, len(task.images), figure_paths), flush=True)
  if ablation is not None:
    metrics["ablation"] = ablation
  return metrics
