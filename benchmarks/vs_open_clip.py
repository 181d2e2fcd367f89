"""Training throughput of qtx vs open_clip (PyTorch) on the same tiny architecture and batch, on
this machine's CPU, measured in one process.

  pip install torch==2.13.0 && pip install open_clip_torch --no-deps   # benchmark only
  python -m benchmarks.vs_open_clip --batch 128 --steps 10

Both sides: the tiny config's towers (ViT 32 px / patch 4 and a causal text transformer),
CLIP InfoNCE loss, AdamW, float32, one full train step (forward, backward, update) per
iteration. Prints samples/s of each and the ratio qtx / open_clip.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def qtx_samples_per_s(config, steps):
  from benchmarks.train_step import measure
  return measure(config, steps)["samples_per_s"]


def open_clip_samples_per_s(config, steps, threads):
  import torch
  import torch.nn.functional as F
  from qtx.weights import open_clip_model_class
  CLIP = open_clip_model_class()
  torch.set_num_threads(threads)
  im, tx = config.model.image, config.model.text
  model = CLIP(embed_dim=config.model.embed_dim,
               vision_cfg=dict(layers=im.depth, width=im.width, head_width=im.width // im.heads,
                               mlp_ratio=im.mlp_dim / im.width, patch_size=im.patch_size,
                               image_size=im.image_size),
               text_cfg=dict(context_length=tx.context_length, vocab_size=tx.vocab_size,
                             width=tx.width, heads=tx.heads, layers=tx.depth,
                             mlp_ratio=tx.mlp_dim / tx.width))
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=config.train.lr,
                          weight_decay=config.train.weight_decay)
  B = config.train.batch_size
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.standard_normal((B, 3, im.image_size, im.image_size),
                                                np.float32))
  tokens = torch.from_numpy(rng.integers(1, 1000, (B, tx.context_length)))
  tokens[:, -1] = 49407
  labels = torch.arange(B)

  def step():
    zi, zt, scale = model(images, tokens)
    logits = scale * zi @ zt.T
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
    opt.step()

  for _ in range(2):
    step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return B / statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/clip_tiny.py")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  args = p.parse_args()
  from benchmarks.train_step import load_config
  import jax
  config = load_config(args.config)
  config.train.batch_size = args.batch
  config.mesh.num_devices = 1
  q = qtx_samples_per_s(config, args.steps)
  o = open_clip_samples_per_s(config, args.steps, args.threads)
  print(f"device {jax.devices()[0].device_kind} | config {args.config} | batch {args.batch}")
  print(f"qtx       {q:8.1f} samples/s")
  print(f"open_clip {o:8.1f} samples/s (torch, {args.threads} threads)")
  print(f"ratio qtx/open_clip: {q / o:.2f}")


if __name__ == "__main__":
  main()
