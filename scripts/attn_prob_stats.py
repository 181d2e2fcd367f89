"""Attention-probability statistics of trained models: how much of each layer's softmax output
an 8-bit [0, max] grid keeps. Per layer: the largest probability, the share of exact zeros, the
share of non-zero probabilities below 1/510 (half a step of the 8-bit grid over [0, 1]: they
round to 0) and their median, on the first 64 eval samples, over the entries
`qtx.analysis.attention_mass` counts (its PTQ statistics are these, averaged over layers).

  PYTHONPATH=. python scripts/attn_prob_stats.py runs/sweep/clipped_softmax/seed0 ...
"""
from __future__ import annotations

import sys

import jax
import numpy as np
from qtx import run as run_lib


def main(workdir: str, n: int = 64) -> None:
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  from qtx.analysis.attention_mass import TINY_PROB, seen_entries
  from qtx.data import pipeline
  from qtx.nn.clip import CLIP

  cfg, s, params, step = run_lib.load_run(workdir)
  task = pipeline.eval_task(cfg, n)
  print(f"{workdir} (step {step})")
  for tower, x, method in (("image", task.images, CLIP.encode_image),
                           ("text", task.tokens, CLIP.encode_text)):
    _, state = s.model.apply({"params": params}, x, method=method, mutable=["intermediates"])
    for path, p in jax.tree_util.tree_leaves_with_path(state):
      name = jax.tree_util.keystr(path)
      if "attn_probs" not in name:
        continue
      p = np.asarray(p, np.float32)  # B x H x T x S
      p = p[np.broadcast_to(np.asarray(seen_entries(tower, x, *p.shape[2:])), p.shape)]
      nz = p[p > 0]
      layer = name.split("['encoder']")[-1].split("['attn']")[0].strip("[]'")
      print(f"  {tower} {layer}: max {p.max():.3f} | exact zeros {np.mean(p == 0):.2f} | "
            f"non-zero < 1/510 {np.mean(nz < TINY_PROB):.3f} | median non-zero {np.median(nz):.4f}")


if __name__ == "__main__":
  for wd in sys.argv[1:]:
    main(wd)
