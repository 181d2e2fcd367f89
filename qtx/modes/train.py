"""Train mode: the training loop around the jitted sharded train step (qtx.step).

Flow: config -> grain pipeline (per host) -> global sharded batch -> jitted step
(model + loss + optimizer) -> metrics.jsonl / TensorBoard / checkpoints. A workdir that holds
checkpoints is resumed at the exact next sample.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
from absl import logging
from etils import epath

from qtx import checkpoint as ckpt_lib
from qtx import config_lib, distributed, evaluate, parallel
from qtx import flops as flops_lib
from qtx import run as run_lib
from qtx.analysis import outliers as outlier_lib
from qtx.data import pipeline
from qtx.data import sources as data_sources
from qtx.metrics import MetricsWriter, summary_line
from qtx.step import (embedding_loss, loss_fn, make_train_step,  # noqa: F401 (public here)
                      microbatched_grads)


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf; the last good checkpoint is left untouched."""


def _progress(total, initial):
  try:
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=jax.process_index() != 0, mininterval=2.0)
  except ImportError:  # pragma: no cover
    return None


def run(config, workdir: str) -> dict:
  """Train (resuming from WORKDIR/checkpoints if present), evaluate, return final metrics.
  `config` is validated already (qtx.modes.run does it once)."""
  s = run_lib.build(config, train=True, validate=False)
  if int(config.train.microbatches) == 0:  # auto: the fewest that fit (qtx.aot.fit)
    from qtx.aot import fit
    config.train.microbatches = fit.resolve_for_run(config, s)
  writer = MetricsWriter(workdir)
  mgr = ckpt_lib.Manager(os.path.join(workdir, "checkpoints"), config)
  src = pipeline.make_source(config, "train")
  check_data_index(src, workdir, resuming=mgr.latest_step() is not None)
  data_iter = iter(pipeline.train_dataset(config, jax.process_index(), jax.process_count(),
                                          source=src))
  state = None
  restored = mgr.restore_latest(s.abstract_state, data_iter)
  if restored is not None:
    state = restored
    logging.info("resumed from step %d", int(state.step))
  elif config.init_from:  # parameters only: the optimizer state and the step start anew
    params, _ = run_lib.params_from(config.init_from, s, config.seed)
    state = run_lib.init_state(s, config.seed, params)
  if state is None:
    state = run_lib.init_state(s, config.seed)
  start = int(state.step)
  total = config.train.total_steps
  step_fn = make_train_step(s)
  enc_i, enc_t = run_lib.make_encoders(s)
  task = pipeline.eval_task(config) if config.eval.every_steps >= 0 else None
  extra_tasks = evaluate.zeroshot_tasks(config)
  outliers_every = int(config.quant.outliers_every_steps)
  outlier_fn = None
  if outliers_every > 0 and task is not None:
    n_probe = min(config.eval.batch_size, len(task.images))
    probe = (task.images[:n_probe], task.tokens[:n_probe])
    tower_fns = {t: outlier_lib.make_outlier_fn(s.model, t) for t in outlier_lib.TOWERS}
    outlier_fn = lambda p, im, tk: outlier_lib.outlier_metrics(s.model, p, im, tk, n_probe,
                                                               fns=tower_fns)
  step_flops = flops_lib.train_step_flops(config)
  peak = flops_lib.peak_tflops(s.mesh.devices.flat[0])
  n_dev = s.mesh.devices.size
  sps_hist = []
  last: dict = {}
  bar = _progress(total, start)
  t_log, n_log = time.perf_counter(), 0
  pending = None  # (step, metrics) of the previous step, checked after the next dispatch
  interrupted = ckpt_lib.PreemptionWatcher()
  try:
    for step in range(start, total):
      batch = parallel.global_batch(next(data_iter), s.mesh, s.rules)
      state, metrics = step_fn(state, batch)
      if pending is not None:
        _check_finite(*pending)
      pending = (step + 1, metrics)
      n_log += 1
      done = step + 1
      if done % config.train.log_every == 0 or done == total:
        _check_finite(*pending)
        m = jax.device_get(metrics)
        dt = time.perf_counter() - t_log
        sps = n_log * config.train.batch_size / dt
        if done > start + config.train.log_every:  # skip the interval with compilation
          sps_hist.append(sps)
        m["train/samples_per_sec"] = sps
        m["data/skipped"] = data_sources.SKIPPED.count
        tflops = n_log * step_flops / dt / n_dev / 1e12
        m["perf/tflops_per_sec_per_device"] = tflops
        if peak:
          m["perf/mfu"] = tflops / peak
        writer.write(done, m)
        last.update(m)
        if bar is not None:
          bar.set_postfix(loss=f"{float(m['train/loss']):.3f}", sps=f"{sps:.0f}")
        t_log, n_log = time.perf_counter(), 0
      if bar is not None:
        bar.update(1)
      if outlier_fn is not None and done % outliers_every == 0:
        writer.write(done, jax.device_get(outlier_fn(state.params, *probe)))
        t_log = time.perf_counter()
      if task is not None and config.eval.every_steps > 0 and (
          done % config.eval.every_steps == 0) and done != total:
        ev = evaluate.evaluate_all(enc_i, enc_t, state.params, task, extra_tasks, config)
        writer.write(done, ev)
        last.update(ev)
        t_log = time.perf_counter()
      if mgr.should_save(done) or interrupted.requested():
        _check_finite(*pending)
        mgr.save(done, state, data_iter)
        if interrupted.requested():
          mgr.wait()
          logging.warning("preemption signal: checkpoint saved at step %d, exiting", done)
          print(f"qtx: preempted, checkpoint saved at step {done}", flush=True)
          last["preempted_at"] = done
          return last
    if pending is not None:
      _check_finite(*pending)
    final_step = int(state.step)
    ev = {}
    if sps_hist:
      ev["train/samples_per_sec_steady"] = float(np.median(sps_hist))
    if task is not None:
      ev.update(evaluate.evaluate_all(enc_i, enc_t, state.params, task, extra_tasks, config))
    if ev:
      writer.write(final_step, ev)
      last.update(ev)
    mgr.save(final_step, state, data_iter, force=True)
    mgr.wait()
  finally:
    interrupted.close()
    if bar is not None:
      bar.close()
    writer.close()
    mgr.close()
  summary = summary_line("qtx", final_step, last)
  if jax.process_index() == 0:
    print(summary, flush=True)
  return last


def _check_finite(step, metrics):
  loss = float(jax.device_get(metrics["train/loss"]))
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f"training loss is {loss} at step {step}; stopping. The last checkpoint saved before "
        f"this step is intact; lower train.lr or check the data.")


DATA_INDEX_FILE = "data_index.json"


def check_data_index(src, workdir: str, resuming: bool) -> None:
  """For sources with an index fingerprint and a `describe()` line (webdataset): every process must have built the same
  index (else the per-process split would repeat and drop samples), and a resumed run must find
  the index it started with (else its saved position would point at other samples). The first
  start writes WORKDIR/data_index.json."""
  if not hasattr(src, "fingerprint"):
    return
  fp = src.fingerprint()
  what = src.describe()
  distributed.assert_same(
      "the training data's index", f"{fp} ({len(src)} samples)",
      "Every host must see the same shards: check that data.path lists the same files on "
      "every host and that no shard was unreadable on one of them (the log names skipped "
      "shards).")
  path = epath.Path(workdir) / DATA_INDEX_FILE
  old = json.loads(path.read_text()) if resuming and path.exists() else None
  # every process must take the same decision below (one raising while the others go on
  # would leave them waiting in the first collective)
  distributed.assert_same(
      f"the saved data index {path}", str((old or {}).get("fingerprint", "absent")),
      "Every host must see the same workdir (a shared file system or bucket).")
  if old is not None:
    if old.get("fingerprint") != fp:
      raise ValueError(
          f"resuming {workdir}: the training data changed since the run started (it had "
          f"{old.get('describe', '?')}, now {what}), so the saved data position would point at "
          f"other samples. Restore the shards it had, or start a new --workdir with "
          f"--config.init_from={workdir} (parameters only).")
    return
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fingerprint": fp, "describe": what}, indent=1) + "\n")


# Keys that define which sample comes next (the checkpointed data position) or the model: a
# resume that changes one is refused instead of continuing with a different meaning.
DATA_ORDER_KEYS = ("seed", "data.name", "data.path", "data.eval_path", "data.num_workers",
                   "data.augment", "data.augment_scale", "train.batch_size")


def resume_changes(config, workdir: str) -> list[str]:
  """Lines naming every config key that differs from the run this workdir holds, when training
  resumes from its checkpoints (empty for a new run). Raises ValueError when a key of
  DATA_ORDER_KEYS or model.* changed."""
  wd = epath.Path(workdir)
  saved = wd / "config.json"
  ckpts = wd / "checkpoints"
  if not (saved.exists() and ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
    return []
  diff = {k: v for k, v in config_lib.differences(json.loads(saved.read_text()), config).items()
          if k not in ("mode", "init_from")}
  if not diff:
    return []
  order = [k for k in diff if k in DATA_ORDER_KEYS or k.startswith("model.")]
  if order:
    raise ValueError(
        f"resuming {workdir}: {', '.join(f'{k} {diff[k][0]!r} -> {diff[k][1]!r}' for k in order)}"
        " changed since the run was started; the saved data position (or the model) would not "
        "mean the same any more. Use a new --workdir, or resume with the old values")
  head = (f"resuming {workdir} with a config that differs from the one it was trained with "
          f"({len(diff)} key(s)); the run continues from its checkpoint with the new values:")
  return [head] + [f"  {k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()]
