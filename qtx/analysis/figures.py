"""PNG figures for the outlier study (matplotlib, Agg canvas, no pyplot state).

- per-layer max inf-norm and kurtosis of one run (both towers) or of several runs side by side
  (one per normalizer, read from their metrics.jsonl);
- attention-probability maps of the heads in the layers with the largest block-output
  inf-norm: Bondarenko et al. 2023 trace the outliers to "no-op" heads that put almost all
  their mass on one low-information token. For every chosen head a few T x T maps, and for the
  image tower the attention mass each key receives (mean over queries and samples) drawn over
  the patch grid, with the class token's share in the title.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from qtx.nn.clip import CLIP
from qtx.quant import outliers

METRICS = (outliers.INF_NORM, outliers.KURTOSIS)


def _new_figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


# ----------------------------------------------------------------------------- per-layer stats

def per_layer_from_metrics(metrics: Mapping[str, Any], prefix: str = "outliers/"
                           ) -> dict[str, dict[str, dict[str, float]]]:
  """{group: {metric: {layer: value}}} from flat metric names.

  'outliers/<tower>/<metric>/<layer...>' -> group <tower>; 'outliers/<metric>/<layer...>'
  (a run that logs a single model without towers) -> group ''. metric is inf_norm | kurtosis.
  """
  out: dict[str, dict[str, dict[str, float]]] = {}
  for key, v in metrics.items():
    if not key.startswith(prefix):
      continue
    parts = key[len(prefix):].split("/")
    if len(parts) >= 3 and parts[1] in METRICS:
      group, metric, layer = parts[0], parts[1], "/".join(parts[2:])
    elif len(parts) >= 2 and parts[0] in METRICS:
      group, metric, layer = "", parts[0], "/".join(parts[1:])
    else:
      continue
    out.setdefault(group, {m: {} for m in METRICS})[metric][canonical_layer(layer)] = float(v)
  return out


def canonical_layer(name: str) -> str:
  """'encoder/block_0/ffn_out' and 'encoder/blocks_0/block/ffn_out' (nn.scan) -> 'block_0/ffn_out'
  so that runs logged with and without the encoder prefix or nn.scan compare layer by layer."""
  parts = name.split("/")
  if parts and parts[0] == "encoder":
    parts = parts[1:]
  if len(parts) >= 2 and parts[0].startswith("blocks_") and parts[1] == "block":
    parts = ["block_" + parts[0][len("blocks_"):]] + parts[2:]
  return "/".join(parts)


def plot_run_outliers(metrics: Mapping[str, Any], path: str, title: str | None = None) -> str:
  """Per-layer inf-norm and kurtosis of one run, one bar colour per tower. Returns path."""
  per_layer = {g or "model": v for g, v in per_layer_from_metrics(metrics).items()}
  if not per_layer:
    raise ValueError("no per-layer outlier metrics ('outliers/<tower>/inf_norm/<layer>') found")
  return outliers.plot_outliers(per_layer, path, title=title)


def _flatten_groups(per_group: Mapping[str, Mapping[str, Mapping[str, float]]]):
  """{group: {metric: {layer}}} -> {metric: {'group/layer': value}}."""
  out = {m: {} for m in METRICS}
  for group, by_metric in per_group.items():
    for m in METRICS:
      for layer, v in by_metric.get(m, {}).items():
        out[m][f"{group}/{layer}" if group else layer] = v
  return out


def last_outlier_row(workdir: str) -> dict:
  """The last metrics.jsonl row of a workdir that has per-layer outlier statistics."""
  from qtx import metrics as metrics_lib
  rows = metrics_lib.read(workdir)
  for row in reversed(rows):
    if per_layer_from_metrics(row):
      return row
  raise ValueError(f"{workdir!r}: metrics.jsonl has no row with per-layer outlier statistics "
                   "(run --config.mode=eval or ptq first)")


def run_label(workdir: str) -> str:
  """Normalizer label of a run from its config.json (gated / clipped_softmax / ...), else the
  folder name."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      att = json.load(f)["model"]["image"]["attention"]
    return "gated" if att.get("gate", "none") != "none" else str(att["normalizer"])
  except (OSError, KeyError, ValueError, TypeError):
    return os.path.basename(os.path.normpath(workdir))


def compare_outliers(workdirs: Sequence[str], path: str, names: Sequence[str] | None = None,
                     title: str | None = None) -> str:
  """Per-layer inf-norm and kurtosis of several runs side by side (one colour per run).

  Each workdir's last metrics row with per-layer outlier statistics is used; layers are named
  '<tower>/block_<i>/<tensor>'. names default to the runs' normalizers (the folder name is
  appended when two runs share one). Returns path.
  """
  if not workdirs:
    raise ValueError("compare_outliers: no workdirs given")
  if names is not None and len(names) != len(workdirs):
    raise ValueError(f"compare_outliers: {len(names)} names for {len(workdirs)} workdirs")
  labels = list(names) if names is not None else [run_label(w) for w in workdirs]
  if names is None:
    for i, lbl in enumerate(labels):
      if labels.count(lbl) > 1:
        labels[i] = f"{lbl} ({os.path.basename(os.path.normpath(workdirs[i]))})"
  per_run = {}
  for lbl, w in zip(labels, workdirs):
    per_run[lbl] = _flatten_groups(per_layer_from_metrics(last_outlier_row(w)))
  return outliers.plot_outliers(per_run, path, title=title)


# ----------------------------------------------------------------------------- attention maps

def capture_attention(model: CLIP, params, images_BxHxWxC: np.ndarray, tokens_BxT: np.ndarray
                      ) -> dict[str, dict[str, dict[str, np.ndarray]]]:
  """{tower: {layer: {'attn_probs': B x H x T x T, 'block_out': B x T x D}}} of the float model."""
  out = {}
  for tower, method, x in (("image", CLIP.encode_image, images_BxHxWxC),
                           ("text", CLIP.encode_text, tokens_BxT)):
    fn = jax.jit(lambda p, x, method=method: model.apply(
        {"params": p}, x, method=method, mutable=["intermediates"])[1]["intermediates"])
    inter = jax.device_get(fn(params, x))
    enc = inter["visual" if tower == "image" else "textual"]["encoder"]
    tree, scanned = (enc["blocks"], ("block",)) if "blocks" in enc else (enc, ())
    flat = outliers.flatten_intermediates(tree, scanned=scanned,
                                          include=("attn_probs", "block_out"))
    layers: dict[str, dict[str, np.ndarray]] = {}
    for name, v in flat.items():
      layer, tensor = name.split("/")[0], name.split("/")[-1]
      layers.setdefault(layer, {})[tensor] = np.asarray(v, np.float32)
    out[tower] = layers
  return out


@dataclasses.dataclass(frozen=True)
class HeadChoice:
  layer: str
  head: int
  layer_inf_norm: float  # mean over sequences of the block output's inf-norm
  sink_mass: float  # mean attention mass on the key that receives the most
  sink_token: int  # that key's index


def sink_scores(probs_BxHxTxS: np.ndarray):
  """Per head: (mass_H, key_H): the largest mean (over samples and queries) attention mass any
  single key receives, and that key. A no-op head scores close to 1."""
  p = np.asarray(probs_BxHxTxS, np.float64)
  mass_HxS = p.mean(axis=(0, 2))
  key_H = mass_HxS.argmax(axis=-1)
  return mass_HxS[np.arange(mass_HxS.shape[0]), key_H], key_H


def select_heads(layers: Mapping[str, Mapping[str, np.ndarray]],
                 layer_inf_norms: Mapping[str, float] | None = None,
                 num_layers: int = 2, heads_per_layer: int = 2) -> list[HeadChoice]:
  """Heads to draw: the `num_layers` layers with the largest block-output inf-norm, and in each
  the `heads_per_layer` heads with the largest sink mass.

  layer_inf_norms ({layer: value}, e.g. from the full eval set) ranks the layers; without it
  the captured block outputs do.
  """
  if layer_inf_norms is None:
    layer_inf_norms = {
        k: float(np.mean(np.abs(v["block_out"]).reshape(v["block_out"].shape[0], -1).max(1)))
        for k, v in layers.items() if "block_out" in v}
  ranked = sorted((k for k in layers if k in layer_inf_norms and "attn_probs" in layers[k]),
                  key=lambda k: -layer_inf_norms[k])
  out = []
  for layer in ranked[:num_layers]:
    mass, key = sink_scores(layers[layer]["attn_probs"])
    for h in np.argsort(-mass, kind="stable")[:heads_per_layer]:
      out.append(HeadChoice(layer, int(h), float(layer_inf_norms[layer]), float(mass[h]),
                            int(key[h])))
  return out


def _patch_grid(num_tokens: int) -> int | None:
  """Side of the patch grid when T = 1 + side^2 (class token + patches), else None."""
  side = round(float(np.sqrt(num_tokens - 1)))
  return side if side * side == num_tokens - 1 else None


def plot_attention_maps(layers: Mapping[str, Mapping[str, np.ndarray]],
                        heads: Sequence[HeadChoice], path: str, num_samples: int = 3,
                        length: int | None = None, patch_grid: bool = False,
                        title: str | None = None) -> str:
  """One row per chosen head: T x T probability maps of the first `num_samples` samples, and
  (patch_grid) the per-key attention mass over the patch grid. `length` crops the maps to the
  first tokens (text: up to the longest end-of-text). Returns path."""
  if not heads:
    raise ValueError("plot_attention_maps: no heads to draw")
  first = layers[heads[0].layer]["attn_probs"]
  n = min(num_samples, first.shape[0])
  T = first.shape[-1]
  L = min(length or T, T)
  grid = _patch_grid(T) if patch_grid else None
  ncols = n + (1 if grid else 0)
  fig = _new_figure(2.4 * ncols + 0.6, 2.3 * len(heads) + 0.4)
  axes = fig.subplots(len(heads), ncols, squeeze=False)
  for r, hc in enumerate(heads):
    p_BxHxTxS = layers[hc.layer]["attn_probs"]
    # one colour scale per head (long rows spread their mass thinly), shared by its samples
    vmax = max(float(np.max(p_BxHxTxS[:n, hc.head, :L, :L])), 1e-6)
    for c in range(n):
      ax = axes[r, c]
      im = ax.imshow(p_BxHxTxS[c, hc.head, :L, :L], cmap="viridis", vmin=0.0, vmax=vmax,
                     interpolation="nearest")
      ax.set_title(f"{hc.layer} head {hc.head}, sample {c}", fontsize=7)
      ax.set_xlabel("key", fontsize=6)
      ax.set_ylabel("query", fontsize=6)
      ax.tick_params(labelsize=5)
    fig.colorbar(im, ax=axes[r, n - 1], fraction=0.046, pad=0.04).ax.tick_params(labelsize=5)
    if grid:
      ax = axes[r, n]
      mass_S = np.asarray(p_BxHxTxS[:, hc.head], np.float64).mean(axis=(0, 1))
      im = ax.imshow(mass_S[1:].reshape(grid, grid), cmap="magma", interpolation="nearest")
      ax.set_title(f"mass per key (cls {mass_S[0]:.2f})", fontsize=7)
      ax.set_xticks([])
      ax.set_yticks([])
      fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=5)
    axes[r, 0].set_ylabel(f"inf-norm {hc.layer_inf_norm:.1f}, sink {hc.sink_mass:.2f} @ key "
                          f"{hc.sink_token}\nquery", fontsize=6)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def _text_length(tokens_BxT: np.ndarray) -> int:
  """Tokens up to and including the longest end-of-text (the highest id of each row)."""
  return int(np.max(np.argmax(tokens_BxT, axis=-1))) + 1


def save_ptq_figures(model: CLIP, params, task, metrics: Mapping[str, Any], outdir: str,
                     num_samples: int = 4, num_layers: int = 2, heads_per_layer: int = 2
                     ) -> list[str]:
  """outliers.png (per-layer inf-norm and kurtosis, both towers) and attention_<tower>.png
  (heads of the layers with the largest block-output inf-norm). Returns the paths."""
  os.makedirs(outdir, exist_ok=True)
  paths = []
  if per_layer_from_metrics(metrics):
    paths.append(plot_run_outliers(metrics, os.path.join(outdir, "outliers.png"),
                                   title="per-layer outliers (float model)"))
  n = min(num_samples, len(task.images))
  captured = capture_attention(model, params, task.images[:n], task.tokens[:n])
  per_group = per_layer_from_metrics(metrics)
  for tower, layers in captured.items():
    inf = per_group.get(tower, {}).get(outliers.INF_NORM, {})
    layer_inf = {k.split("/")[0]: v for k, v in inf.items() if k.endswith("/block_out")} or None
    heads = select_heads(layers, layer_inf, num_layers, heads_per_layer)
    if not heads:
      continue
    length = _text_length(task.tokens[:n]) if tower == "text" else None
    paths.append(plot_attention_maps(
        layers, heads, os.path.join(outdir, f"attention_{tower}.png"), num_samples=min(3, n),
        length=length, patch_grid=tower == "image",
        title=f"{tower} tower: heads of the layers with the largest block-output inf-norm"))
  return paths


def plot_remedies(results: Mapping[str, Sequence[Mapping[str, float]]],
                  quality: Sequence[tuple[str, str, float]], path: str) -> str:
  """The sweep's figure: zero-shot top-1 per remedy, float and each quantized setting (mean and
  std over seeds), and the max inf-norm of each tower. Returns path."""
  names = list(results)
  zs = [c for c in quality if c[0].endswith("zeroshot_top1")]
  fig = _new_figure(max(7.0, 1.1 * len(names) + 2), 6.5)
  ax1, ax2 = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
  x = np.arange(len(names))

  def stats(key, mult):
    vals = [np.asarray([r[key] for r in results[n] if key in r], np.float64) * mult
            for n in names]
    mean = [v.mean() if len(v) else np.nan for v in vals]
    std = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals]
    return np.asarray(mean), np.asarray(std)

  w = 0.8 / max(len(zs), 1)
  for i, (key, label, mult) in enumerate(zs):
    m, e = stats(key, mult)
    ax1.bar(x + (i - (len(zs) - 1) / 2) * w, m, w, yerr=e, capsize=2,
            label=label.replace(" zero-shot top-1 (%)", ""))
  ax1.set_ylabel("zero-shot top-1 (%)")
  ax1.set_xticks(x, names, rotation=20, fontsize=8)
  ax1.legend(fontsize=7, ncol=len(zs))
  for i, tower in enumerate(("image", "text")):
    m, e = stats(f"outliers/{tower}/max_inf_norm", 1.0)
    ax2.bar(x + (i - 0.5) * 0.4, m, 0.4, yerr=e, capsize=2, label=f"{tower} tower")
  ax2.set_ylabel("max inf-norm (float model)")
  ax2.set_xticks(x, names, rotation=20, fontsize=8)
  ax2.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  return path


def main(argv: Sequence[str] | None = None) -> str:
  """python -m qtx.analysis.figures OUT.png WORKDIR [WORKDIR ...] [--names a,b,...]: per-layer
  inf-norm and kurtosis of several runs side by side (compare_outliers)."""
  import argparse
  p = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
  p.add_argument("out", help="PNG file to write")
  p.add_argument("workdirs", nargs="+", help="run folders with metrics.jsonl (eval or ptq rows)")
  p.add_argument("--names", default=None, help="comma-separated labels, one per workdir")
  p.add_argument("--title", default=None)
  args = p.parse_args(argv)
  names = args.names.split(",") if args.names else None
  path = compare_outliers(args.workdirs, args.out, names=names, title=args.title)
  print(path)
  return path


if __name__ == "__main__":
  main()
