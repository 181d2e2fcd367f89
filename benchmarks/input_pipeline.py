"""Host input pipeline: images/s of ONE process for 224 px JPEG decode + training augmentation,
qtx against open_clip's pipeline (webdataset + torchvision transforms) on the same shards.

  pip install webdataset torch torchvision      # the open_clip side only (benchmark only)
  python -m benchmarks.input_pipeline --images 512 --rounds 5

Both sides read the same tar shards (written here: --images JPEGs of --size px, img2dataset
layout) in order, decode every JPEG and apply CLIP's training crop (random resized crop, area
scale (0.9, 1.0), bicubic, to 224 px):
- qtx: `WebDatasetSource` (indexed tar members, PIL decode) + `augment.random_resized_crop`;
  the result is the uint8 image that leaves for the device;
- open_clip: `webdataset.WebDataset(...).decode("pil")` + torchvision's
  `RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=BICUBIC)`, `ToTensor`, `Normalize`
  (open_clip's train transform, its normalisation included: qtx normalises on the device).
One process, no workers, the two sides alternating for --rounds rounds over all images; prints
the median images/s of each side, the spread (min-max) and the median ratio qtx / open_clip.
Images/s of one process is the number to multiply by the worker processes a host can run.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import tarfile
import tempfile
import time

import numpy as np


def write_shards(root: str, n_images: int, size: int, per_shard: int = 128, seed: int = 0):
  """Photo-like JPEGs (smooth gradients plus noise, quality 90) in img2dataset's layout."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  paths = []
  for s in range((n_images + per_shard - 1) // per_shard):
    path = os.path.join(root, f"{s:05d}.tar")
    with tarfile.open(path, "w") as tar:
      for i in range(s * per_shard, min(n_images, (s + 1) * per_shard)):
        c = rng.uniform(0, 255, (3, 3))
        img = (c[0] * xx[..., None] / 3 + c[1] * yy[..., None] / 3 + c[2] / 3
               + rng.normal(0, 12, (size, size, 3)))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        for name, data in ((f"{i:06d}.jpg", buf.getvalue()),
                           (f"{i:06d}.txt", f"a picture number {i}".encode())):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    paths.append(path)
  return paths


def qtx_round(shards, crop: int) -> float:
  from qtx.data import augment, webdataset
  src = webdataset.WebDatasetSource(os.path.dirname(shards[0]), "train", crop, fit="keep",
                                    held_out=False)
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  n = 0
  for i in range(len(src)):
    r = src[i]
    img = augment.random_resized_crop(r["image"], crop, rng, (0.9, 1.0))
    n += img.shape[0] > 0
  return n / (time.perf_counter() - t0)


def open_clip_round(shards, crop: int) -> float:
  import torch
  import webdataset as wds
  from torchvision import transforms as T
  torch.set_num_threads(1)
  tf = T.Compose([T.RandomResizedCrop(crop, scale=(0.9, 1.0),
                                      interpolation=T.InterpolationMode.BICUBIC),
                  T.ToTensor(),
                  T.Normalize((0.48145466, 0.4578275, 0.40821073),
                              (0.26862954, 0.26130258, 0.27577711))])
  ds = wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("jpg", "txt")
  t0 = time.perf_counter()
  n = 0
  for img, _ in ds:
    x = tf(img)
    n += x.shape[0] > 0
  return n / (time.perf_counter() - t0)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--images", type=int, default=512)
  p.add_argument("--size", type=int, default=256, help="side of the stored JPEGs (px)")
  p.add_argument("--crop", type=int, default=224)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--qtx-only", action="store_true", help="skip the open_clip side")
  args = p.parse_args(argv)
  with tempfile.TemporaryDirectory() as root:
    shards = write_shards(root, args.images, args.size)
    rows = {"qtx": [], "open_clip": []}
    for _ in range(args.rounds):  # alternate, so drifts of the machine hit both sides
      rows["qtx"].append(qtx_round(shards, args.crop))
      if not args.qtx_only:
        rows["open_clip"].append(open_clip_round(shards, args.crop))
  print(f"{args.images} JPEGs of {args.size} px -> {args.crop} px random resized crop, one "
        f"process, {args.rounds} alternating rounds")
  for name, v in rows.items():
    if v:
      print(f"  {name:10s} median {statistics.median(v):7.1f} images/s  "
            f"(min {min(v):.1f}, max {max(v):.1f})")
  if rows["open_clip"]:
    ratios = [a / b for a, b in zip(rows["qtx"], rows["open_clip"])]
    print(f"  ratio qtx / open_clip: median {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
  return rows


if __name__ == "__main__":
  main()
