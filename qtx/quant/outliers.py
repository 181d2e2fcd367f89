"""Activation outlier statistics as reported by Bondarenko et al. 2023 (PAPERS.md section 1).

For every monitored tensor (each block's output and each FFN output), per sequence b:
  inf_norm[b] = max |x[b]| over the flattened T x D tensor,
  kurtosis[b] = mean((x[b] - mu)^4) / var^2 over the same flattened tensor (non-excess;
                Gaussian ~= 3, uniform ~= 1.8).
Both are averaged over sequences (the whole validation set). For the text tower only the tokens
up to the end-of-text token count (`valid_BxT`): the padding after it never reaches the output.
Over tensors:
  max_inf_norm = max of the per-tensor mean inf-norms,
  avg_kurtosis = mean of the per-tensor mean kurtoses.

`summarize` works on one batch (jittable); `OutlierAccumulator` streams over batches and gives
the mean over all sequences seen. Result keys: 'max_inf_norm', 'avg_kurtosis',
'inf_norm/<tensor>', 'kurtosis/<tensor>'.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

INF_NORM = "inf_norm"
KURTOSIS = "kurtosis"
# The tensors the paper measures: each block's output and each FFN output.
TENSORS = ("block_out", "ffn_out")


def _f32(x):
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32)) if jnp.issubdtype(
      x.dtype, jnp.floating) else x.astype(jnp.float32)


def kurtosis(x, axis=None, keepdims: bool = False, where=None):
  """Non-excess kurtosis mean((x - mu)^4) / var^2 over axis (all axes when None).

  Computed in float32 (or wider). A constant slice (var == 0) has kurtosis 0 by definition
  here, so that averages stay finite. where: optional boolean mask broadcastable to x; the
  moments are those of the counted entries only.
  """
  x = _f32(x)
  if where is not None:
    where = jnp.broadcast_to(where, x.shape)
  mu = jnp.mean(x, axis=axis, keepdims=True, where=where)
  d2 = jnp.square(x - mu)
  if where is not None:
    d2 = jnp.where(where, d2, 0.0)
  var = jnp.mean(d2, axis=axis, keepdims=keepdims, where=where)
  m4 = jnp.mean(jnp.square(d2), axis=axis, keepdims=keepdims, where=where)
  safe = jnp.where(var > 0, var, 1.0)
  return jnp.where(var > 0, m4 / jnp.square(safe), 0.0)


def _sequence_axes(x) -> tuple[int, ...]:
  if jnp.ndim(x) < 2:
    raise ValueError(f"expected a batch of sequences (B x T x ...), got shape {jnp.shape(x)}")
  return tuple(range(1, jnp.ndim(x)))


def _token_mask(x, valid_BxT):
  """valid_BxT (B x T bool) broadcast to x (B x T x ...), or None."""
  if valid_BxT is None:
    return None
  v = jnp.asarray(valid_BxT, bool)
  if v.shape != jnp.shape(x)[:2]:
    raise ValueError(f"token mask of shape {v.shape} does not match the tensor's leading "
                     f"(batch, tokens) dims {jnp.shape(x)[:2]}")
  return jnp.broadcast_to(v.reshape(v.shape + (1,) * (jnp.ndim(x) - 2)), jnp.shape(x))


def inf_norm_per_sequence(x_BxTxD, valid_BxT=None):
  """max |x| of every sequence over all non-batch axes -> B (only the tokens valid_BxT marks
  when given)."""
  a = jnp.abs(_f32(x_BxTxD))
  w = _token_mask(x_BxTxD, valid_BxT)
  if w is not None:
    a = jnp.where(w, a, 0.0)
  return jnp.max(a, axis=_sequence_axes(x_BxTxD))


def kurtosis_per_sequence(x_BxTxD, valid_BxT=None):
  """Kurtosis of every sequence over its flattened non-batch axes -> B (only the tokens
  valid_BxT marks when given)."""
  return kurtosis(x_BxTxD, axis=_sequence_axes(x_BxTxD),
                  where=_token_mask(x_BxTxD, valid_BxT))


def flatten_intermediates(tree: Mapping[str, Any], sep: str = "/",
                          scanned: Sequence[str] = (),
                          include: Sequence[str] | None = None) -> dict[str, jax.Array]:
  """Nested dict (e.g. Flax 'intermediates') -> {'a/b/c': B x T x ... array}.

  Tuples written by `sow` are unwrapped: a single element keeps the path, several get the
  suffix '/<i>'. `scanned` names path components of an nn.scan over layers (e.g. 'blocks'):
  below them arrays carry a leading layer axis, which is split into one entry per layer with
  the component renamed '<component>_<i>'. `include` keeps only tensors whose last path
  component is listed (e.g. TENSORS = ('block_out', 'ffn_out'), the paper's choice).
  """
  out: dict[str, jax.Array] = {}
  scanned = tuple(scanned)

  def visit(path, node):
    if isinstance(node, Mapping):
      for k, v in node.items():
        visit(path + (str(k),), v)
    elif isinstance(node, (tuple, list)):
      if len(node) == 1:
        visit(path, node[0])
      else:
        for i, v in enumerate(node):
          visit(path + (str(i),), v)
    else:
      emit(path, node)

  def emit(path, x):
    for j, part in enumerate(path):
      if part in scanned:
        for layer in range(jnp.shape(x)[0]):
          emit(path[:j] + (f"{part}_{layer}",) + path[j + 1:], x[layer])
        return
    if include is None or (path and path[-1] in include):
      out[sep.join(path)] = x

  visit((), tree)
  return out


def per_sequence_stats(intermediates: Mapping[str, Any], scanned: Sequence[str] = (),
                       include: Sequence[str] | None = None, valid_BxT=None
                       ) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{name: (inf_norm_B, kurtosis_B)} for every tensor in (possibly nested) intermediates.
  valid_BxT: optional B x T bool mask of the tokens that count (e.g. text up to end-of-text)."""
  flat = flatten_intermediates(intermediates, scanned=scanned, include=include)
  return {k: (inf_norm_per_sequence(v, valid_BxT), kurtosis_per_sequence(v, valid_BxT))
          for k, v in flat.items()}


def _aggregate(means: Mapping[str, tuple[Any, Any]], xp) -> dict[str, Any]:
  if not means:
    raise ValueError("no tensors to summarize (empty intermediates, or `include` matched none)")
  out = {}
  for k, (inf, kurt) in means.items():
    out[f"{INF_NORM}/{k}"] = inf
    out[f"{KURTOSIS}/{k}"] = kurt
  out["max_inf_norm"] = xp.max(xp.stack([v[0] for v in means.values()]))
  out["avg_kurtosis"] = xp.mean(xp.stack([v[1] for v in means.values()]))
  return out


def summarize(intermediates: Mapping[str, Any], scanned: Sequence[str] = (),
              include: Sequence[str] | None = None, valid_BxT=None) -> dict[str, jax.Array]:
  """Outlier summary of one batch (jittable).

  Returns 'inf_norm/<name>' and 'kurtosis/<name>' (means over the sequences of the batch),
  'max_inf_norm' (max over tensors) and 'avg_kurtosis' (mean over tensors). `scanned` and
  `include` as in flatten_intermediates, `valid_BxT` as in per_sequence_stats.
  """
  stats = per_sequence_stats(intermediates, scanned, include, valid_BxT)
  return _aggregate({k: (jnp.mean(i), jnp.mean(c)) for k, (i, c) in stats.items()}, jnp)


_per_sequence_stats_jit = jax.jit(per_sequence_stats, static_argnums=(1, 2))


class OutlierAccumulator:
  """Streams `summarize` over batches: means over all sequences seen, then over tensors.

    acc = OutlierAccumulator(scanned=('blocks',), include=TENSORS)
    for batch in data: acc.update(intermediates_of(batch))
    metrics = acc.result()   # same keys as summarize, Python floats
  """

  def __init__(self, scanned: Sequence[str] = (), include: Sequence[str] | None = None):
    self.scanned = tuple(scanned)
    self.include = None if include is None else tuple(include)
    self.reset()

  def reset(self):
    self._sums: dict[str, np.ndarray] = {}
    self._counts: dict[str, int] = {}

  def update(self, intermediates: Mapping[str, Any], valid_BxT=None) -> None:
    """Adds one batch of intermediates; valid_BxT as in per_sequence_stats."""
    self.add(_per_sequence_stats_jit(dict(intermediates), self.scanned, self.include, valid_BxT))

  def add(self, stats: Mapping[str, tuple[Any, Any]], num_valid: int | None = None) -> None:
    """Adds per-sequence statistics ({tensor: (inf_norm_B, kurtosis_B)}, as per_sequence_stats
    returns them); only the first `num_valid` sequences count (a padded last batch)."""
    stats = jax.device_get(dict(stats))
    for k, (inf, kurt) in stats.items():
      inf, kurt = np.asarray(inf)[:num_valid], np.asarray(kurt)[:num_valid]
      s = np.array([np.sum(inf, dtype=np.float64), np.sum(kurt, dtype=np.float64)])
      self._sums[k] = self._sums.get(k, np.zeros(2)) + s
      self._counts[k] = self._counts.get(k, 0) + int(inf.shape[0])

  def means(self) -> dict[str, tuple[float, float]]:
    """{tensor: (mean inf-norm, mean kurtosis)} over all sequences added."""
    return {k: (float(self._sums[k][0] / self._counts[k]), float(self._sums[k][1] / self._counts[k]))
            for k in self._sums}

  @property
  def num_sequences(self) -> dict[str, int]:
    return dict(self._counts)

  def result(self) -> dict[str, float]:
    return {k: float(v) for k, v in _aggregate(self.means(), np).items()}


def layer_order(name: str):
  """Sort key of 'block_<i>/<tensor>' names: by layer index, then name."""
  head, _, rest = name.partition("/")
  idx = head.rsplit("_", 1)[-1]
  return (int(idx) if idx.isdigit() else 1 << 30, head, rest)


def aggregate_towers(means_by_tower: Mapping[str, Mapping[str, tuple[float, float]]],
                     prefix: str = "outliers/") -> dict[str, float]:
  """{tower: {tensor: (mean inf-norm, mean kurtosis)}} -> flat metrics:

    <prefix><tower>/{inf_norm,kurtosis}/<tensor>    per tensor, in layer order
    <prefix><tower>/max_inf_norm, <prefix><tower>/avg_kurtosis   per tower
    <prefix>max_inf_norm, <prefix>avg_kurtosis      over all tensors of all towers
  """
  out: dict[str, float] = {}
  all_inf, all_kurt = [], []
  for tower, means in means_by_tower.items():
    if not means:
      raise ValueError(f"no outlier tensors for tower {tower!r}")
    for name, (inf, kurt) in sorted(means.items(), key=lambda kv: layer_order(kv[0])):
      out[f"{prefix}{tower}/{INF_NORM}/{name}"] = float(inf)
      out[f"{prefix}{tower}/{KURTOSIS}/{name}"] = float(kurt)
    infs = [float(v[0]) for v in means.values()]
    kurts = [float(v[1]) for v in means.values()]
    out[f"{prefix}{tower}/max_inf_norm"] = max(infs)
    out[f"{prefix}{tower}/avg_kurtosis"] = float(np.mean(kurts))
    all_inf += infs
    all_kurt += kurts
  out[f"{prefix}max_inf_norm"] = max(all_inf)
  out[f"{prefix}avg_kurtosis"] = float(np.mean(all_kurt))
  return out


def per_layer_values(summary: Mapping[str, Any], metric: str) -> dict[str, float]:
  """{tensor: value} of one metric ('inf_norm' or 'kurtosis') from a summary dict."""
  prefix = f"{metric}/"
  return {k[len(prefix):]: float(v) for k, v in summary.items() if k.startswith(prefix)}


def plot_outliers(per_layer: Mapping[str, Mapping[str, Any]], path: str,
                  metrics: tuple[str, ...] = (INF_NORM, KURTOSIS), title: str | None = None,
                  log_scale: bool = True) -> str:
  """Saves a PNG of per-layer inf-norm and kurtosis, one bar group per layer and one bar
  colour per normalizer.

  per_layer maps a normalizer name to either a summary dict (keys 'inf_norm/<layer>',
  'kurtosis/<layer>', as returned by summarize / OutlierAccumulator.result) or a nested
  {metric: {layer: value}} dict. Returns path.
  """
  from matplotlib import ticker
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not per_layer:
    raise ValueError("plot_outliers: per_layer is empty")

  def values(entry, metric):
    if metric in entry and isinstance(entry[metric], Mapping):
      return {str(k): float(v) for k, v in entry[metric].items()}
    return per_layer_values(entry, metric)

  names = list(per_layer)
  n_layers = max(len(values(per_layer[n], m)) for n in names for m in metrics)
  # Figure + Agg canvas directly: no pyplot state, no global backend switch.
  fig = Figure(figsize=(max(6.0, 0.4 * n_layers + 2.0), 3.2 * len(metrics)))
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(metrics), 1, squeeze=False)
  width = 0.8 / len(names)
  for ax, metric in zip(axes[:, 0], metrics):
    layers: list[str] = []
    for n in names:
      for layer in values(per_layer[n], metric):
        if layer not in layers:
          layers.append(layer)
    xs = np.arange(len(layers))
    for i, n in enumerate(names):
      vals = values(per_layer[n], metric)
      ys = [vals.get(layer, np.nan) for layer in layers]
      ax.bar(xs + (i - (len(names) - 1) / 2) * width, ys, width, label=n)
    ax.set_xticks(xs)
    ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
    label = {INF_NORM: "inf-norm (mean over sequences)",
             KURTOSIS: "kurtosis (mean over sequences)"}.get(metric, metric)
    ax.set_ylabel(label, fontsize=8)
    if log_scale:
      ax.set_yscale("log")
      ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
      ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
      ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path

