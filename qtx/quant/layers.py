"""Flax Linen building blocks that run in float or fake-quantized from the same code.

The model calls these instead of nn.Dense / nn.LayerNorm and places `ActQuant` at the
activation points Bondarenko et al. 2023 quantize (linear outputs, softmax input and output,
P.V, residual sums, LayerNorm outputs, embeddings). With `cfg=None` or `cfg.enabled=False`
every block is exactly its float counterpart and creates no extra variables.

Calibration state of activation quantizers lives in the variable collection 'quant_stats'
(never in 'params'):

  # calibrate (float forward, statistics updated)
  _, upd = model.apply({'params': p, 'quant_stats': s}, batch, mutable=['quant_stats'])
  # evaluate quantized (collection read-only -> fake quant with the stored ranges)
  y = model.apply({'params': p, 'quant_stats': upd['quant_stats']}, batch)

During calibration only the activation quantizers pass float through; weights are static and
are fake-quantized in both passes, so the calibrated ranges see the quantized weights.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtx.quant import estimators as est
from qtx.quant.fake_quant import fake_quant, validate_bits

QUANT_STATS = "quant_stats"
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
ACT_GRANULARITIES = ("per_tensor", "per_token")
# Activation quantization points (the `point` of every ActQuant the model places).
ACT_POINTS = ("input", "embed", "attn_scores", "attn_probs", "attn_context", "resid", "mlp_act",
              "linear_out", "ln_out")
# Names quant.keep_float accepts: an activation point, 'weights' (every kernel and LayerNorm
# scale) or 'head' (the towers' final projections, weights and all).
KEEP_FLOAT_NAMES = ACT_POINTS + ("weights", "head")
# Always float whatever the config says, so listing them would promise nothing.
_ALWAYS_FLOAT = {"gates": "attention gates are always computed in float",
                 "temperature": "the temperature (and SigLIP bias) is never quantized"}
# Keys of the `quant` config block that belong to drivers (calibration loop, training loop),
# not to the quantizers themselves.
DRIVER_KEYS = ("calib_batches", "outliers_every_steps", "ablate", "settings")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """What to quantize and how (hashable: usable as a Linen module attribute).

  enabled: off -> every block is float and identical to its nn counterpart.
  weight_bits / act_bits: integer widths in [2, 16] (W8A8 default).
  weight_granularity: per_tensor | per_channel (weights are symmetric).
  act_granularity: per_tensor (calibrated, asymmetric) | per_token (dynamic per-token min-max).
  estimator: activation range estimator: minmax | running_minmax | percentile | mse; with 'mse'
    weights use the MSE search as well, otherwise weights use min-max.
  percentile: q of the percentile estimator.  momentum: EMA momentum of running_minmax.
  keep_float: names kept in float, from KEEP_FLOAT_NAMES: an activation point (ActQuant
    skips it), 'weights' (kernels and LayerNorm scales) or 'head' (the final projections).
  """
  enabled: bool = False
  weight_bits: int = 8
  act_bits: int = 8
  weight_granularity: str = "per_tensor"
  act_granularity: str = "per_tensor"
  estimator: str = "running_minmax"
  percentile: float = 99.99
  momentum: float = 0.9
  keep_float: tuple[str, ...] = ("head",)

  def __post_init__(self):
    validate_bits(self.weight_bits)
    validate_bits(self.act_bits)
    _check_choice("weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES)
    _check_choice("act_granularity", self.act_granularity, ACT_GRANULARITIES)
    _check_choice("estimator", self.estimator, est.ESTIMATORS)
    if not 50.0 <= float(self.percentile) <= 100.0:
      raise ValueError(f"quant.percentile={self.percentile!r} must be in [50, 100]")
    if not 0.0 <= float(self.momentum) < 1.0:
      raise ValueError(f"quant.momentum={self.momentum!r} must be in [0, 1)")
    if isinstance(self.keep_float, str):
      object.__setattr__(self, "keep_float", _split_names(self.keep_float))
    else:
      object.__setattr__(self, "keep_float", tuple(self.keep_float))
    check_keep_float(self.keep_float)

  @classmethod
  def from_config(cls, c: Mapping[str, Any] | None) -> "QuantConfig":
    """Builds from the `quant` config block (a ConfigDict or dict); None -> disabled.

    keep_float may be a comma-separated string ("head,temperature,gates"). Driver keys
    (calib_batches, outliers_every_steps) are ignored; other unknown keys are errors.
    """
    if c is None:
      return cls()
    d = dict(c.to_dict() if hasattr(c, "to_dict") else c)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in fields and k not in DRIVER_KEYS)
    if unknown:
      raise ValueError(f"unknown quant config keys {unknown}; accepted: "
                       f"{sorted(fields | set(DRIVER_KEYS))}")
    kw = {k: v for k, v in d.items() if k in fields}
    if "keep_float" in kw and isinstance(kw["keep_float"], str):
      kw["keep_float"] = _split_names(kw["keep_float"])
    return cls(**kw)

  @property
  def weight_estimator(self) -> str:
    return "mse" if self.estimator == "mse" else "minmax"

  def quantizes(self, name: str) -> bool:
    """True when enabled and `name` is not kept in float."""
    return self.enabled and name not in self.keep_float


def check_keep_float(names) -> None:
  """Raises ValueError for a quant.keep_float name that nothing would read."""
  for n in names:
    if n in _ALWAYS_FLOAT:
      raise ValueError(f"quant.keep_float: {_ALWAYS_FLOAT[n]}, so {n!r} would change nothing; "
                       f"remove it (accepted names: {', '.join(KEEP_FLOAT_NAMES)})")
    if n not in KEEP_FLOAT_NAMES:
      raise ValueError(f"quant.keep_float: unknown name {n!r}; choose from "
                       f"{', '.join(KEEP_FLOAT_NAMES)}")


def _check_choice(key, value, choices):
  if value not in choices:
    raise ValueError(f"unknown quant.{key} {value!r}; choose one of {choices}")


def _split_names(s: str) -> tuple[str, ...]:
  return tuple(n.strip() for n in s.split(",") if n.strip())


def is_active(cfg: QuantConfig | None) -> bool:
  return cfg is not None and cfg.enabled


def quantize_weight(w, cfg: QuantConfig | None, channel_axis: int = -1):
  """Symmetric fake quant of a kernel (per-tensor or per-channel along channel_axis).

  Range: min-max, or the MSE search when cfg.estimator == 'mse'. Identity when cfg is None or
  disabled. Gradient: straight-through.
  """
  if not is_active(cfg) or not cfg.quantizes("weights"):
    return w
  x_min, x_max = est.estimate_range(
      w, cfg.weight_estimator, cfg.weight_granularity, channel_axis,
      num_bits=cfg.weight_bits, symmetric=True)
  return fake_quant(w, x_min, x_max, cfg.weight_bits, symmetric=True)


def _act_batch_range(x, cfg: QuantConfig, where=None):
  """Raw per-tensor range of one calibration batch for cfg.estimator over the entries `where`
  counts (all when None). Not widened to include 0: the quantization grid does that."""
  if cfg.estimator == "percentile":
    return est.percentile(x, cfg.percentile, where=where)
  if cfg.estimator == "mse":
    return est.mse_range(x, cfg.act_bits, symmetric=False, where=where)
  return est.minmax(x, where=where)


class ActQuant(nn.Module):
  """Asymmetric activation fake quantizer at one named point.

  - cfg None / disabled / point in cfg.keep_float: identity, no variables.
  - per_token granularity: dynamic per-token min-max of the current input, no variables.
  - per_tensor: range kept in the 'quant_stats' collection (x_min, x_max, count).
    * collection mutable (calibration): statistics updated, x returned unchanged (float).
        running_minmax: EMA with cfg.momentum, first batch initialises;
        minmax: min / max over all calibration batches seen;
        percentile, mse: mean over calibration batches of the per-batch estimate.
      The stored range is the raw statistic (an EMA of raw batch extremes, not of ranges
      already widened to include 0). During `init` the variables are only created.
    * collection read-only: x fake-quantized with the stored range. An uncalibrated quantizer
      (count == 0) falls back to the current input's min-max.
  The quantization grid always widens the range to include 0.

  valid: optional boolean mask broadcastable to x (True = an entry the model's output can
  depend on). Ranges (calibrated or dynamic) are taken over these entries only, so the padding
  after a text's end-of-text token, or the scores a causal row never attends, do not widen
  them. Every entry is still quantized.
  """
  cfg: QuantConfig | None = None
  point: str = "act"

  @nn.compact
  def __call__(self, x, valid=None):
    cfg = self.cfg
    if not is_active(cfg) or not cfg.quantizes(self.point):
      return x
    if cfg.act_granularity == "per_token":
      x_min, x_max = est.minmax(jax.lax.stop_gradient(x), axis=-1, keepdims=True, where=valid)
      return fake_quant(x, x_min, x_max, cfg.act_bits, symmetric=False)

    if not self.is_mutable_collection(QUANT_STATS) and not self.has_variable(
        QUANT_STATS, "x_min"):
      raise ValueError(
          f"ActQuant {self.scope.path_text!r} (point {self.point!r}) has no '{QUANT_STATS}' "
          f"variables; pass the collection from model.init / calibration, or apply with "
          f"mutable=['{QUANT_STATS}'] to calibrate")
    v_min = self.variable(QUANT_STATS, "x_min", lambda: jnp.zeros((), jnp.float32))
    v_max = self.variable(QUANT_STATS, "x_max", lambda: jnp.zeros((), jnp.float32))
    v_cnt = self.variable(QUANT_STATS, "count", lambda: jnp.zeros((), jnp.int32))

    if self.is_mutable_collection(QUANT_STATS):
      if self.is_initializing():
        return x
      xs = jax.lax.stop_gradient(x)
      count = v_cnt.value
      first = count == 0
      if cfg.estimator == "running_minmax":
        state = est.running_minmax(est.RangeState(v_min.value, v_max.value, count), xs,
                                   cfg.momentum, where=valid)
        new_min, new_max = state.x_min, state.x_max
      elif cfg.estimator == "minmax":
        b_min, b_max = _act_batch_range(xs, cfg, valid)
        new_min = jnp.where(first, b_min, jnp.minimum(v_min.value, b_min))
        new_max = jnp.where(first, b_max, jnp.maximum(v_max.value, b_max))
      else:
        b_min, b_max = _act_batch_range(xs, cfg, valid)
        w = 1.0 / (count + 1).astype(jnp.float32)
        new_min = v_min.value + w * (b_min - v_min.value)
        new_max = v_max.value + w * (b_max - v_max.value)
      v_min.value = new_min.astype(jnp.float32)
      v_max.value = new_max.astype(jnp.float32)
      v_cnt.value = count + 1
      return x

    calibrated = v_cnt.value > 0
    d_min, d_max = est.minmax(jax.lax.stop_gradient(x), where=valid)
    x_min = jnp.where(calibrated, v_min.value, d_min)
    x_max = jnp.where(calibrated, v_max.value, d_max)
    return fake_quant(x, x_min, x_max, cfg.act_bits, symmetric=False)


class QDense(nn.Module):
  """nn.Dense with a fake-quantized kernel and a quantized output.

  Params are named exactly like nn.Dense's ('kernel' (in, features), 'bias' (features,)), so
  checkpoints are interchangeable. kernel_init / bias_init may be wrapped with
  nn.with_logical_partitioning. The bias stays in float. The input is assumed to be quantized
  by the preceding point; the output goes through ActQuant(point='linear_out') when
  quantize_output is set (`valid` is passed on to it).
  """
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  cfg: QuantConfig | None = None
  quantize_output: bool = True

  @nn.compact
  def __call__(self, x, valid=None, *, stage: str = "full"):
    """stage='full': x -> the layer's output. The two other stages let a caller fuse the
    matmuls of several layers that read the same input into one (fused_dense):
    'weights' takes the same input x and returns (kernel, bias) exactly as 'full' multiplies
    x by them (quantized; bias None without one) without multiplying; 'output' takes
    x @ kernel + bias computed by the caller and returns what 'full' returns for it."""
    if stage not in ("full", "weights", "output"):
      raise ValueError(f"unknown QDense stage {stage!r}; choose 'full', 'weights' or 'output'")
    if stage == "output":
      return self._output(x, valid)
    kernel = self.param("kernel", self.kernel_init, (jnp.shape(x)[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,),
                      self.param_dtype) if self.use_bias else None
    kernel = quantize_weight(kernel, self.cfg, channel_axis=-1)
    if stage == "weights":
      return kernel, bias
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return self._output(y, valid)

  def _output(self, y, valid):
    if self.quantize_output:
      y = ActQuant(self.cfg, point="linear_out", name="out_quant")(y, valid)
    return y


def fused_dense(layers, x, valid=None):
  """[layer(x, valid) for layer in layers] for QDense layers of one input, with one matmul.

  The kernels (each quantized as its layer quantizes it) are stacked to (in, n, features) and
  multiplied by x once: one pass over x in the forward pass, and one matmul instead of n in
  each direction of the backward pass. Each output then goes through its own layer's output
  quantizer. Parameters and their names are the layers' own, so checkpoints do not change.
  All layers must have the same width, dtype and bias use.
  """
  layers = list(layers)
  first = layers[0]
  if any((l.features, l.dtype, l.use_bias, l.precision) !=
         (first.features, first.dtype, first.use_bias, first.precision) for l in layers):
    raise ValueError("fused_dense needs layers of equal width, dtype, bias use and precision")
  weights = [l(x, stage="weights") for l in layers]
  kernel = jnp.stack([w for w, _ in weights], axis=1)
  bias = jnp.stack([b for _, b in weights]) if first.use_bias else None
  x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=first.dtype)
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                          precision=first.precision)
  if bias is not None:
    y = y + bias
  return [l(y[..., i, :], valid, stage="output") for i, l in enumerate(layers)]


class QLayerNorm(nn.Module):
  """LayerNorm over the last axis with a quantized scale and a quantized output.

  Params 'scale' and 'bias' like nn.LayerNorm. Statistics in float32; the scale is
  fake-quantized symmetric per-tensor with cfg.weight_bits (a per-channel grid for a vector
  would be lossless), the bias stays float. Identity quantization when cfg is None/disabled.
  """
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  scale_init: Callable = nn.initializers.ones_init()
  bias_init: Callable = nn.initializers.zeros_init()
  cfg: QuantConfig | None = None
  quantize_output: bool = True

  @nn.compact
  def __call__(self, x, valid=None):
    features = jnp.shape(x)[-1]
    x32 = jnp.asarray(x, jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))
    y = standardize(x32, self.epsilon)
    if self.use_scale:
      scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
      if is_active(self.cfg):
        scale = quantize_weight(scale, dataclasses.replace(
            self.cfg, weight_granularity="per_tensor"))
      y = y * jnp.asarray(scale, y.dtype)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
      y = y + jnp.asarray(bias, y.dtype)
    out_dtype = self.dtype or nn.dtypes.canonicalize_dtype(x, dtype=None)
    y = y.astype(out_dtype)
    if self.quantize_output:
      y = ActQuant(self.cfg, point="ln_out", name="out_quant")(y, valid)
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def standardize(x, epsilon):
  """(x - mean(x)) / sqrt(var(x) + epsilon) over the last axis (LayerNorm before its scale
  and bias), with its backward written out.

  The backward is one elementwise pass with two row means, dx = rstd * (g - mean(g) -
  xhat * mean(g * xhat)), from the saved xhat and rstd. Autodiff's form of the same gradient is
  a chain of elementwise terms that XLA:CPU fuses into every consumer of the residual stream's
  gradient, so it recomputed the chains of several layers inside each weight-gradient
  transpose (docs/benchmarks.md). Reverse mode only (a custom_vjp has no jvp).
  """
  return _standardize_fwd(x, epsilon)[0]


def _standardize_fwd(x, epsilon):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  xc = x - mean
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + epsilon)
  xhat = xc * rstd
  return xhat, (xhat, rstd)


def _standardize_bwd(epsilon, res, g):
  xhat, rstd = res
  dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
               - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
  return (dx,)


standardize.defvjp(_standardize_fwd, _standardize_bwd)
