"""Training-time image augmentation on the host (in the input pipeline, before uint8 batches
leave for the device).

`data.augment`:
  none                  the source's evaluation transform (shorter side to size, centre crop)
  random_resized_crop   CLIP training's crop (open_clip's default): a random region covering
                        a fraction of the image area drawn from `data.augment_scale` (default
                        (0.9, 1.0)), aspect ratio log-uniform in [3/4, 4/3], resized to the
                        model's image size (bicubic). Up to 10 draws; if none fits, a centre
                        crop at the nearest allowed aspect ratio.
The crop of every sample is drawn from an rng that grain derives from the run's seed and the
sample's position in the (shuffled, repeated) dataset: another crop each epoch, and the same
one again after a resume, so a resumed run sees exactly the data the uninterrupted one does.
"""
from __future__ import annotations

import math

import numpy as np

AUGMENTS = ("none", "random_resized_crop")
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def check(name: str, scale) -> tuple[float, float]:
  if name not in AUGMENTS:
    raise ValueError(f"unknown data.augment {name!r}; choose one of {AUGMENTS}")
  lo, hi = (float(v) for v in scale)
  if not 0.0 < lo <= hi <= 1.0:
    raise ValueError(f"data.augment_scale must be (min, max) with 0 < min <= max <= 1, got "
                     f"{tuple(scale)}")
  return lo, hi


def crop_box(height: int, width: int, rng: np.random.Generator, scale=(0.9, 1.0),
             ratio=RATIO) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a random resized crop (torchvision's sampling rule)."""
  area = height * width
  log_r = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_r))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image_HxWx3: np.ndarray, size: int, rng: np.random.Generator,
                        scale=(0.9, 1.0)) -> np.ndarray:
  from PIL import Image
  top, left, h, w = crop_box(image_HxWx3.shape[0], image_HxWx3.shape[1], rng, scale)
  crop = np.ascontiguousarray(image_HxWx3[top:top + h, left:left + w])
  if crop.shape[:2] == (size, size):
    return crop
  return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC,
                                                 reducing_gap=3.0))
