"""The fake-quantized model: its QuantConfig, calibration of its ranges, its evaluation.

A model built with `QuantConfig.from_config(config.quant)` shares the float model's params; its
calibrated ranges live in the 'quant_stats' collection (`init_quant_stats`), updated by one
jitted apply per batch (`calibrate`: activations pass through in float, weights are quantized).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from qtx import evaluate, parallel
from qtx import run as run_lib
from qtx.nn.clip import CLIP
from qtx.quant.layers import QUANT_STATS, QuantConfig
from qtx.quant.settings import SETTINGS, setting_names  # noqa: F401  (re-exported)

# ----------------------------------------------------------------------------- config

def quant_config(config, **overrides) -> QuantConfig:
  """QuantConfig from config.quant with enabled=True (overrides win)."""
  d = config.quant.to_dict() if hasattr(config.quant, "to_dict") else dict(config.quant)
  d["enabled"] = True  # the modes' keys (calib_batches, ...) are QuantConfig's DRIVER_KEYS
  d.update(overrides)
  return QuantConfig.from_config(d)


def bits_label(qcfg: QuantConfig) -> str:
  """'w8a8', 'w4a8', 'w8a16', ... (the metric name part)."""
  return f"w{qcfg.weight_bits}a{qcfg.act_bits}"


# ----------------------------------------------------------------------------- calibration

def init_quant_stats(model: CLIP, config, seed: int = 0) -> dict:
  """The model's 'quant_stats' collection (all counts 0); {} when nothing is calibrated."""
  images, tokens = run_lib.dummy_inputs(config)
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
  mesh = parallel.mesh_of(params)
  return tree if mesh is None else jax.device_put(tree, parallel.replicated(mesh))


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
