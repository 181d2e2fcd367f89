"""Eval mode: restore a checkpoint, evaluate zero-shot + retrieval, measure activation outliers.

  python -m qtx.main --config configs/clip_tiny.py --workdir RUN --config.mode=eval \
      [--config.init_from=CKPT]

Params come from `config.init_from` (a qtx checkpoint directory or a PyTorch CLIP state_dict) or,
when it is empty, from WORKDIR's own latest checkpoint. One row goes to WORKDIR/metrics.jsonl:
the `eval/*` metrics of the training loop's final evaluation (`qtx.train.evaluate_all`: the eval
split plus the `eval.zeroshot` tasks) plus the outlier statistics of both towers
(Bondarenko et al. 2023: inf-norm and kurtosis of every block output and FFN output, per
sequence, averaged over the eval set):

  outliers/{image,text}/inf_norm/block_<i>/{block_out,ffn_out}   per layer
  outliers/{image,text}/kurtosis/block_<i>/{block_out,ffn_out}
  outliers/{image,text}/max_inf_norm, outliers/{image,text}/avg_kurtosis   per tower
  outliers/max_inf_norm (max over both towers), outliers/avg_kurtosis (mean over all tensors)
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from qtx import checkpoint as ckpt_lib
from qtx import config_lib
from qtx import train
from qtx.data import pipeline
from qtx.metrics import MetricsWriter
from qtx.nn.clip import CLIP
from qtx.nn.text import valid_tokens
from qtx.quant import outliers

TOWERS = ("image", "text")
_TOWER_MODULES = {"image": "visual", "text": "textual"}
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


# ----------------------------------------------------------------------------- checkpoints

def _has_steps(path: str) -> bool:
  return os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path))


def checkpoint_path(config, workdir: str) -> str:
  """Where the params come from: config.init_from, else WORKDIR (its checkpoints/ folder).

  Raises FileNotFoundError naming the path that was looked at when nothing is there.
  """
  if config.init_from:
    path = os.path.abspath(os.path.expanduser(config.init_from))
    if not os.path.exists(path):
      raise FileNotFoundError(f"config.init_from={config.init_from!r}: checkpoint {path!r} does "
                              "not exist")
    return path
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not _has_steps(ckpt_dir):
    raise FileNotFoundError(
        f"no checkpoint to load: config.init_from is empty and {ckpt_dir!r} holds no "
        "checkpoint; train into this workdir first or pass --config.init_from=CKPT")
  return os.path.abspath(workdir)


def load_params(config, workdir: str, s: train.Setup | None = None):
  """(params, step) of the checkpoint `checkpoint_path` picks, placed with the run's shardings.

  step is the checkpoint's training step (0 for a PyTorch state_dict).
  """
  s = s or train.setup(config)
  path = checkpoint_path(config, workdir)
  if os.path.isfile(path) and path.endswith(_TORCH_SUFFIXES):
    state = ckpt_lib.init_from(path, s, config.seed)
    return state.params, 0
  try:
    state = ckpt_lib.restore_params(path, s.abstract_state)
  except ValueError as e:  # orbax: stored shapes differ from this config's model
    raise ValueError(f"checkpoint {path!r} does not match the model of this config (same "
                     f"model.* settings as the run that wrote it?): {e}") from e
  return state.params, int(jax.device_get(state.step))


LEGACY_KEEP_FLOAT = ("gates", "temperature")


def load_run(workdir: str, step: int | str | None = None):
  """(config, setup, params, step) of a run `qtx.main` wrote: WORKDIR/config.json and the
  checkpoint of training step `step` (the latest when None). Keys the saved config predates
  get their config_lib.LEGACY_DEFAULTS value."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} does not exist: {workdir!r} is not a qtx.main workdir")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config_lib.fill_legacy(config)
  # quant.keep_float once listed 'gates' and 'temperature', which were always float anyway
  kf = config.get("quant", {}).get("keep_float")
  names = [n.strip() for n in kf.split(",") if n.strip()] if isinstance(kf, str) else []
  if any(n in LEGACY_KEEP_FLOAT for n in names):
    config.quant.keep_float = ",".join(n for n in names if n not in LEGACY_KEEP_FLOAT)
  if step is not None:
    config.init_from = os.path.join(workdir, "checkpoints", str(step))
  s = train.setup(config)
  params, at = load_params(config, workdir, s)
  return config, s, params, at


# ----------------------------------------------------------------------------- outliers

def _encoder_tree(intermediates: Mapping[str, Any], tower: str):
  """(tree, scanned) of one tower's encoder blocks, named block_<i> with or without nn.scan."""
  enc = intermediates[_TOWER_MODULES[tower]]["encoder"]
  if "blocks" in enc:  # nn.scan: blocks/block/<tensor> with a leading layer axis
    return enc["blocks"], ("block",)
  return enc, ()


def make_outlier_fn(model: CLIP, tower: str, variables_extra: dict | None = None) -> Callable:
  """Jitted (params, x) -> {tensor: (inf_norm_B, kurtosis_B)} of one tower's block outputs and
  FFN outputs (tensor names 'block_<i>/block_out', 'block_<i>/ffn_out'). Text statistics count
  the tokens up to each row's end-of-text token only."""
  if tower not in TOWERS:
    raise ValueError(f"unknown tower {tower!r}; choose one of {TOWERS}")
  method = CLIP.encode_image if tower == "image" else CLIP.encode_text
  extra = dict(variables_extra or {})

  def fn(params, x):
    _, state = model.apply({"params": params, **extra}, x, method=method,
                           mutable=["intermediates"])
    tree, scanned = _encoder_tree(state["intermediates"], tower)
    # text: only the tokens up to end-of-text, which are all the output can depend on
    valid = valid_tokens(x) if tower == "text" else None
    return outliers.per_sequence_stats(tree, scanned, include=outliers.TENSORS, valid_BxT=valid)

  return jax.jit(fn)


def _tower_summary(stats_fn: Callable, params, x: np.ndarray, batch_size: int) -> dict:
  """Means over all sequences of x (fixed-size batches, the last one padded and trimmed)."""
  n = x.shape[0]
  if n == 0:
    raise ValueError("outlier statistics need at least one sequence, got an empty eval set")
  sums: dict[str, np.ndarray] = {}
  for i in range(0, n, batch_size):
    chunk = x[i:i + batch_size]
    valid = chunk.shape[0]
    if valid < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, axis=0)])
    stats = jax.device_get(stats_fn(params, chunk))
    for k, (inf, kurt) in stats.items():
      s = np.array([np.sum(inf[:valid], dtype=np.float64), np.sum(kurt[:valid], dtype=np.float64)])
      sums[k] = sums.get(k, 0.0) + s
  return {k: v / n for k, v in sums.items()}


def aggregate_outliers(means_by_tower: Mapping[str, Mapping[str, Any]],
                       prefix: str = "outliers/") -> dict[str, float]:
  """{tower: {tensor: (mean inf-norm, mean kurtosis)}} -> flat metric dict (module docstring).

  Per tower: max of the inf-norms and mean of the kurtoses over its tensors; combined: max over
  all tensors and mean over all tensors of both towers.
  """
  out: dict[str, float] = {}
  all_inf, all_kurt = [], []
  for tower, means in means_by_tower.items():
    if not means:
      raise ValueError(f"no outlier tensors for tower {tower!r}")
    infs = [float(v[0]) for v in means.values()]
    kurts = [float(v[1]) for v in means.values()]
    for name, (inf, kurt) in sorted(means.items(), key=lambda kv: _layer_order(kv[0])):
      out[f"{prefix}{tower}/{outliers.INF_NORM}/{name}"] = float(inf)
      out[f"{prefix}{tower}/{outliers.KURTOSIS}/{name}"] = float(kurt)
    out[f"{prefix}{tower}/max_inf_norm"] = max(infs)
    out[f"{prefix}{tower}/avg_kurtosis"] = float(np.mean(kurts))
    all_inf += infs
    all_kurt += kurts
  out[f"{prefix}max_inf_norm"] = max(all_inf)
  out[f"{prefix}avg_kurtosis"] = float(np.mean(all_kurt))
  return out


def _layer_order(name: str):
  head, _, rest = name.partition("/")
  idx = head.rsplit("_", 1)[-1]
  return (int(idx) if idx.isdigit() else 1 << 30, head, rest)


def outlier_metrics(model: CLIP, params, images: np.ndarray, tokens: np.ndarray,
                    batch_size: int, variables_extra: dict | None = None,
                    prefix: str = "outliers/", fns: Mapping[str, Callable] | None = None
                    ) -> dict[str, float]:
  """Outlier statistics of both towers over `images` and `tokens` (see the module docstring).
  `fns`: per-tower functions from make_outlier_fn, reused across calls to avoid recompiling."""
  means = {}
  for tower, x in (("image", images), ("text", tokens)):
    fn = fns[tower] if fns else make_outlier_fn(model, tower, variables_extra)
    means[tower] = {k: tuple(v) for k, v in _tower_summary(fn, params, x, batch_size).items()}
  return aggregate_outliers(means, prefix)


# ----------------------------------------------------------------------------- eval mode

def summary_line(step: int, m: Mapping[str, Any], head: str = "qtx eval") -> str:
  from qtx import metrics as metrics_lib
  return metrics_lib.summary_line(head, step, m)


def run_eval(config, workdir: str) -> dict:
  """Restore, evaluate zero-shot + retrieval and outliers on the eval task, log one row."""
  checkpoint_path(config, workdir)  # fail fast, before building anything
  s = train.setup(config)
  params, step = load_params(config, workdir, s)
  task = pipeline.eval_task(config)
  bs = config.eval.batch_size
  enc_i, enc_t = train.make_encoders(s)
  # the same evaluators as the end of training (eval/..., and eval/<name>/... per extra task)
  metrics = train.evaluate_all(enc_i, enc_t, params, task, train.zeroshot_tasks(config), config)
  metrics.update(outlier_metrics(s.model, params, task.images, task.tokens, bs))
  writer = MetricsWriter(workdir)
  try:
    writer.write(step, metrics)
  finally:
    writer.close()
  if jax.process_index() == 0:
    print(summary_line(step, metrics), flush=True)
  return metrics
