"""Where the largest activations of a trained image tower sit: the signature of the paper's
outlier mechanism (large values in a few hidden channels of low-information tokens, which
"no-op" attention heads attend to), measured on the embedded dataset's eval images.

Per block output of the image tower, over the first N eval images:
  - inf-norm (mean over images of max |x|) and kurtosis, as in metrics.jsonl;
  - background share of the top 0.1% |x| entries vs the share of background tokens (a patch is
    background when no pixel of the shape falls in it, from the generator's own layout);
  - the channel holding most of those top entries, and its share (1/width when spread evenly);
  - that channel's mean |x| on background patches, shape patches and the class token.
Per head of every block: the attention mass that class-token and patch queries put on
background keys (the base rate is the background share of the keys).

  PYTHONPATH=. python scripts/outlier_locate.py runs/sweep/softmax/seed0 \\
      runs/outlier_probe/softmax/seed0@2000 runs/outlier_probe/softmax/seed0

WORKDIR@STEP reads checkpoint STEP of WORKDIR instead of its latest one.
"""
from __future__ import annotations

import sys

import jax
import numpy as np
from qtx.analysis import outliers as outlier_lib
from qtx import run as run_lib

TOP_FRACTION = 1e-3


def background_patches(src, n: int, patch: int) -> np.ndarray:
  """n x P bool: patch p of eval image i holds no pixel of its shape."""
  from qtx.data import synthetic
  out = []
  for i in range(n):
    rng = src.rng(i)
    attrs = synthetic.sample_attributes(rng)
    center, radius = synthetic.layout(attrs, rng, src.shape_scale)
    mask = synthetic.shape_mask(attrs["shape"], center, radius, src.image_size)
    g = src.image_size // patch
    out.append(~mask.reshape(g, patch, g, patch).any(axis=(1, 3)).reshape(-1))
  return np.stack(out)


def main(spec: str, n: int = 250) -> None:
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  from qtx.data import pipeline
  from qtx.nn.clip import CLIP
  from qtx.quant import outliers

  workdir, _, step = spec.partition("@")
  cfg, s, params, at = run_lib.load_run(workdir, step or None)
  if cfg.data.name != "synthetic":
    raise ValueError(f"{workdir}: needs a run on the embedded synthetic data, got "
                     f"data.name={cfg.data.name!r}")
  src = pipeline.make_source(cfg, "eval")
  n = min(n, len(src))
  task = pipeline.eval_task(cfg, n, source=src)
  bg = background_patches(src, n, cfg.model.image.patch_size)  # n x P
  _, state = s.model.apply({"params": params}, task.images, method=CLIP.encode_image,
                           mutable=["intermediates"])
  tree, scanned = outlier_lib._encoder_tree(state["intermediates"], "image")
  flat = outliers.flatten_intermediates(tree, scanned=scanned)
  print(f"{spec} (step {at}): {n} eval images, background {bg.mean():.1%} of the patches")
  for name in sorted(k for k in flat if k.endswith("block_out")):
    x = np.asarray(flat[name], np.float32)  # n x (1 + P) x D, class token first
    a = np.abs(x)
    k = max(1, int(TOP_FRACTION * a.size))
    idx = np.argpartition(a.reshape(-1), -k)[-k:]
    img, tok, ch = np.unravel_index(idx, a.shape)
    patch = tok > 0
    on_bg = bg[img[patch], tok[patch] - 1]
    top_ch = np.bincount(ch, minlength=a.shape[-1]).argmax()
    share_ch = np.mean(ch == top_ch)
    c = a[:, :, top_ch]
    inf = a.max(axis=(1, 2)).mean()
    kurt = float(np.mean(jax.device_get(outliers.kurtosis_per_sequence(x))))
    print(f"  {name}: inf-norm {inf:.1f} | kurtosis {kurt:.2f} | top {TOP_FRACTION:.1%} |x|: "
          f"{np.mean(on_bg) if on_bg.size else 0:.0%} on background patches, "
          f"{np.mean(~patch):.0%} on the class token, {share_ch:.0%} in channel {top_ch} | "
          f"channel {top_ch} mean |x|: background {c[:, 1:][bg].mean():.2f}, "
          f"shape {c[:, 1:][~bg].mean():.2f}, class {c[:, 0].mean():.2f}")
  probs = {k: v for k, v in flat.items() if k.endswith("attn_probs")}
  for name in sorted(probs):
    p = np.asarray(probs[name], np.float32)  # n x H x Tq x Tk
    mass_bg = (p[:, :, :, 1:] * bg[:, None, None, :]).sum(-1)  # n x H x Tq
    cls_q = mass_bg[:, :, 0].mean(0)
    patch_q = mass_bg[:, :, 1:].mean((0, 2))
    cls_k = p[:, :, 1:, 0].mean((0, 2))
    heads = " ".join(f"h{h}: {cls_q[h]:.2f}/{patch_q[h]:.2f}/{cls_k[h]:.2f}"
                     for h in range(p.shape[1]))
    print(f"  {name} mass on background keys from class/patch queries, patch->class: {heads}")


if __name__ == "__main__":
  if len(sys.argv) < 2:
    sys.exit(__doc__)
  for wd in sys.argv[1:]:
    main(wd)
