"""Eval mode: restore a checkpoint's parameters, evaluate zero-shot + retrieval, measure outliers.

  python -m qtx.main --config configs/clip_tiny.py --workdir RUN --config.mode=eval \
      [--config.init_from=CKPT]

Params come from `config.init_from` (a qtx checkpoint directory or a PyTorch CLIP state_dict) or,
when it is empty, from WORKDIR's own latest checkpoint; the optimizer state is never read. One
row goes to WORKDIR/metrics.jsonl: the `eval/*` metrics of the training loop's final evaluation
(`qtx.evaluate.evaluate_all`: the eval split plus the `eval.zeroshot` tasks) plus the outlier
statistics of both towers (`qtx.analysis.outliers`).
"""
from __future__ import annotations

from qtx import checkpoint as ckpt_lib
from qtx import evaluate
from qtx import metrics as metrics_lib
from qtx import run as run_lib
from qtx.analysis import outliers
from qtx.data import pipeline


def run(config, workdir: str) -> dict:
  """Restore, evaluate zero-shot + retrieval and outliers on the eval task, log one row."""
  ckpt_lib.checkpoint_path(config, workdir)  # fail fast, before building anything
  r = run_lib.build(config, validate=False)
  params, step = run_lib.load_params(config, workdir, r)
  task = pipeline.eval_task(config)
  enc_i, enc_t = run_lib.make_encoders(r)
  # the same evaluators as the end of training (eval/..., and eval/<name>/... per extra task)
  metrics = evaluate.evaluate_all(enc_i, enc_t, params, task, evaluate.zeroshot_tasks(config),
                                  config)
  metrics.update(outliers.outlier_metrics(r.model, params, task.images, task.tokens,
                                          config.eval.batch_size))
  metrics_lib.write_row(workdir, step, metrics, metrics_lib.summary_line("qtx eval", step, metrics))
  return metrics
