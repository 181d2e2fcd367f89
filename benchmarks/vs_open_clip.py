"""Training throughput of qtx vs open_clip (PyTorch) on the same tiny architecture and batch, on
this machine's CPU, measured in one process with the two sides alternating.

  pip install torch --index-url https://download.pytorch.org/whl/cpu
  pip install open_clip_torch --no-deps                                 # benchmark only
  python -m benchmarks.vs_open_clip --batch 128 --steps 10 --rounds 5

Both sides: the tiny config's towers (ViT 64 px / patch 8 and a causal text transformer), the
same exact-erf GELU (open_clip's nn.GELU; qtx's activation='gelu'), CLIP InfoNCE loss, AdamW
with global-norm clipping, float32, one full train step (forward, backward, update) per
iteration. After compiling / warming up both, each round times `--steps` steps of one side and
then of the other (the order alternates between rounds); it prints each side's samples/s
(median and min-max over rounds) and the median of the per-round ratios qtx / open_clip.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def qtx_stepper(config, package: str = "qtx"):
  """A callable running one train step of `package` (qtx, or an exported earlier version of
  it: benchmarks.vs_commit), blocked on its result."""
  import importlib
  import jax
  from benchmarks.train_step import random_batch
  run_lib = importlib.import_module(f"{package}.run")
  train_mode = importlib.import_module(f"{package}.modes.train")
  s = run_lib.build(config, train=True)
  box = [run_lib.init_state(s, 0)]
  step_fn = train_mode.make_train_step(s)
  batch = random_batch(config, s)
  compiled = step_fn.lower(box[0], batch).compile()

  def step():
    box[0], m = compiled(box[0], batch)
    jax.block_until_ready(m)

  return step


def open_clip_stepper(config, threads):
  """A callable running one open_clip train step."""
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

  return step


def alternate(steppers: dict, batch: int, steps: int, rounds: int, warmup: int = 2) -> dict:
  """{name: [samples/s per round]}, the sides alternating (order reversed every round)."""
  for f in steppers.values():
    for _ in range(warmup):
      f()
  out = {k: [] for k in steppers}
  names = list(steppers)
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      t0 = time.perf_counter()
      for _ in range(steps):
        steppers[name]()
      out[name].append(batch * steps / (time.perf_counter() - t0))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/clip_tiny.py")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=10, help="steps per side per round")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  p.add_argument("--devices", type=int, default=1,
                 help="qtx side: split the batch over this many CPU devices (data parallel "
                      "on the same cores; XLA runs each device's program on its own thread)")
  args = p.parse_args(argv)
  import jax
  if args.devices > 1:
    jax.config.update("jax_num_cpu_devices", args.devices)
  from benchmarks.train_step import load_config
  import importlib.metadata
  import torch
  open_clip_version = importlib.metadata.version("open_clip_torch")  # no import: torchvision-free
  config = load_config(args.config)
  config.train.batch_size = args.batch
  config.mesh.num_devices = args.devices
  config.mesh.shape = {"data": args.devices, "fsdp": 1, "tensor": 1}
  for t in (config.model.image, config.model.text):
    t.activation = "gelu"  # open_clip's nn.GELU (exact erf)
  res = alternate({"qtx": qtx_stepper(config),
                   "open_clip": open_clip_stepper(config, args.threads)},
                  args.batch, args.steps, args.rounds)
  ratios = [q / o for q, o in zip(res["qtx"], res["open_clip"])]
  print(f"device {jax.devices()[0].device_kind} | jax {jax.__version__} | torch "
        f"{torch.__version__} | open_clip {open_clip_version} | config {args.config} | "
        f"batch {args.batch} | qtx on {args.devices} CPU device(s) | {args.rounds} rounds of "
        f"{args.steps} steps per side")
  for name, v in res.items():
    print(f"{name:10s} {statistics.median(v):8.1f} samples/s (min {min(v):.1f}, max {max(v):.1f})")
  print(f"ratio qtx/open_clip: {statistics.median(ratios):.2f} (rounds: "
        f"{', '.join(f'{r:.2f}' for r in ratios)})")
  return res


if __name__ == "__main__":
  from qtx import hostmem
  hostmem.maybe_reuse_freed_memory()  # as python -m qtx.main does on the CPU
  main()
