"""PTQ ablation: the quantized evaluation repeated with one class of quantization points at a
time kept in float (POINT_CLASSES: input, embed, attn_scores, attn_probs, attn_context, resid,
mlp_act, linear_out, ln_out, weights), to find which quantizer causes a drop before attributing
it to outliers (PAPERS.md section 7). `qtx.modes.ptq` runs it when `quant.ablate` is set.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qtx.analysis.quantized import (calibrate, init_quant_stats, quantized_metrics,
                                    timed_evaluate)
from qtx.nn.clip import CLIP
from qtx.quant.layers import ACT_POINTS, QUANT_STATS, ActQuant, QuantConfig
from qtx.run import build_model

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


