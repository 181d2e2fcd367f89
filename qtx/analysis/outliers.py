"""Outlier statistics of a CLIP model's towers over an eval set (Bondarenko et al. 2023).

The statistics themselves (inf-norm and kurtosis per sequence, their means and aggregates) are
`qtx.quant.outliers`; this module runs the model to get the tensors they are taken of: every
block output and FFN output of both towers. Metric names:

  outliers/{image,text}/inf_norm/block_<i>/{block_out,ffn_out}   per layer
  outliers/{image,text}/kurtosis/block_<i>/{block_out,ffn_out}
  outliers/{image,text}/max_inf_norm, outliers/{image,text}/avg_kurtosis   per tower
  outliers/max_inf_norm (max over both towers), outliers/avg_kurtosis (mean over all tensors)
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from qtx.nn.clip import CLIP
from qtx.nn.text import valid_tokens
from qtx.quant import outliers

TOWERS = ("image", "text")
_TOWER_MODULES = {"image": "visual", "text": "textual"}


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


def tower_means(stats_fn: Callable, params, x: np.ndarray, batch_size: int
                ) -> dict[str, tuple[float, float]]:
  """{tensor: (mean inf-norm, mean kurtosis)} over all sequences of x, in fixed-size batches
  (the last one padded; the padding is not counted)."""
  n = x.shape[0]
  if n == 0:
    raise ValueError("outlier statistics need at least one sequence, got an empty eval set")
  acc = outliers.OutlierAccumulator()
  for i in range(0, n, batch_size):
    chunk = x[i:i + batch_size]
    valid = chunk.shape[0]
    if valid < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, axis=0)])
    acc.add(stats_fn(params, chunk), num_valid=valid)
  return acc.means()


def outlier_metrics(model: CLIP, params, images: np.ndarray, tokens: np.ndarray,
                    batch_size: int, variables_extra: dict | None = None,
                    prefix: str = "outliers/", fns: Mapping[str, Callable] | None = None
                    ) -> dict[str, float]:
  """Outlier statistics of both towers over `images` and `tokens` (module docstring).
  `fns`: per-tower functions from make_outlier_fn, reused across calls to avoid recompiling."""
  means = {}
  for tower, x in (("image", images), ("text", tokens)):
    fn = fns[tower] if fns else make_outlier_fn(model, tower, variables_extra)
    means[tower] = tower_means(fn, params, x, batch_size)
  return outliers.aggregate_towers(means, prefix)
