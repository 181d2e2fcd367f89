"""Embedded, procedurally generated image-caption dataset ("synthetic shapes").

Every sample is one coloured shape on a mostly plain grey background, drawn with numpy from a
seeded generator, so the dataset needs no download and is unlimited:

- 7 colours (`COLORS`), 6 shapes (`SHAPES`), 3 sizes (`SIZES`) and 9 positions on a 3x3 grid
  (`POSITIONS`), each drawn uniformly at random, with a small random jitter of the position and
  size inside its cell, a background grey from a small dark/light palette (sometimes a soft
  gradient) and a little per-pixel noise.
- The caption names the attributes (colour, shape, size, position) in one of
  `len(CAPTION_TEMPLATES)` sentence templates. Eval captions name all four, so two captions that
  differ in one attribute are always distinguishable (`parse_caption` recovers the attributes
  from any caption). Training captions leave out the size, and independently the position, with
  probability `omit_prob` each (default TRAIN_OMIT_PROB = 0.5): real captions vary in how much
  they say, and the short ones speak the zero-shot prompts' language ("a red circle.").
- The zero-shot classification task is colour + shape: `len(CLASS_NAMES)` = 42 classes such as
  "red circle", prompted with `TEMPLATES` (see `zeroshot_prompts`). Chance level is
  1/42 = 2.38% top-1. Size and position are only in the captions; they make image<->text
  retrieval non-trivial (see `hard_negative_captions`).

`SyntheticShapes(split, image_size, seed)` is a grain-compatible random-access source. Sample
`idx` of a split is a pure function of (seed, split, idx): its generator is
`np.random.default_rng([seed, split_id, idx])`, and the train and eval splits use different
`split_id`s, so the eval samples are held out from training.
"""
from __future__ import annotations

import functools
import os
import textwrap
from typing import Any

import numpy as np

from qtx.data import registry
# the vocabulary and the captions live in synthetic_captions; they are this dataset's names too
from qtx.data.synthetic_captions import (  # noqa: F401
    _VALUES, ATTRIBUTES, CAPTION_TEMPLATES, CHANCE_TOP1, CLASS_NAMES, COLORS, NUM_CLASSES,
    FILLER_WORDS, OPTIONAL_ATTRIBUTES, POSITIONS, SHAPES, SIZES, TEMPLATES, TRAIN_OMIT_PROB, add_filler, caption,
    check_attributes, hard_negative_captions, label_of, one_attribute_variants, parse_caption,
    sample_attributes, zeroshot_prompts)

# Background greys (R = G = B, so never equal to a saturated shape colour).
BACKGROUNDS: dict[str, int] = {"black": 18, "dark grey": 60, "light grey": 195, "white": 238}

SPLITS: dict[str, int] = {"train": 0, "eval": 1}
TRAIN_SIZE = 2**31 - 1
MIN_IMAGE_SIZE = 16

POSITION_JITTER = 0.04  # of the image side, uniform in [-j, j] per axis
SIZE_JITTER = 0.08  # relative, uniform in [1 - j, 1 + j]
GRADIENT_PROB = 0.25  # probability of a soft grey gradient instead of a flat background
GRADIENT_AMPLITUDE = 18.0  # the gradient spans grey +- this
NOISE_AMPLITUDE = 6  # per-pixel integer noise, uniform in [-a, a]
_EXTENT = 1.15  # every shape lies within 1.15 radii of its centre (the triangle's apex)
# Multiplier of every shape's size (the attributes keep their names): < 1 leaves more of the
# image, and so more patch tokens, plain background. The largest shape must still fit.
MAX_SHAPE_SCALE = 1.5

# ---------------------------------------------------------------------------------------------
# Validation


def check_image_size(image_size: Any) -> int:
  """Returns `image_size` as int; raises ValueError unless it is an int >= MIN_IMAGE_SIZE."""
  if isinstance(image_size, (bool, np.bool_)) or not isinstance(image_size, (int, np.integer)):
    raise ValueError(f"image_size must be an int >= {MIN_IMAGE_SIZE}; got {image_size!r}")
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f"image_size must be an int >= {MIN_IMAGE_SIZE}; got {image_size!r}")
  return int(image_size)


# ---------------------------------------------------------------------------------------------
# Rendering


@functools.lru_cache(maxsize=16)
def _grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates in [0, 1]: y as [H, 1] and x as [1, W] (they broadcast)."""
  c = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
  return c[:, None], c[None, :]


def shape_mask(shape: str, center_xy: tuple[float, float], radius: float,
               image_size: int) -> np.ndarray:
  """Boolean [H, W] mask of `shape` centred at `center_xy` (fractions of the image side).

  `radius` is half the nominal diameter, as a fraction of the image side. Shapes are centred on
  their area centroid (the triangle too) and lie within 1.15 radii of the centre.
  """
  if shape not in SHAPES:
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
  y_Hx1, x_1xW = _grid(check_image_size(image_size))
  u = (x_1xW - np.float32(center_xy[0])) / np.float32(radius)
  v = (y_Hx1 - np.float32(center_xy[1])) / np.float32(radius)
  if shape == "circle":
    return u * u + v * v <= 1.0
  if shape == "ring":
    d2 = u * u + v * v
    return (d2 <= 1.0) & (d2 >= 0.25)
  if shape == "square":
    return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
  if shape == "diamond":
    return np.abs(u) + np.abs(v) <= 1.0
  if shape == "cross":
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.38) & (av <= 1.0)) | ((av <= 0.38) & (au <= 1.0))
  # Upward equilateral triangle inscribed in a circle of 1.15 radii (centroid at the centre):
  # apex at v = -1.15, base at v = 0.575, half-width at the base 0.996.
  return (v <= 0.575) & (np.abs(u) * np.sqrt(np.float32(3.0)) <= v + 1.15)


def check_shape_scale(shape_scale: Any) -> float:
  if isinstance(shape_scale, bool) or not isinstance(shape_scale, (int, float, np.floating)) or (
      not 0.0 < shape_scale <= MAX_SHAPE_SCALE):
    raise ValueError(f"shape_scale must be a number in (0, {MAX_SHAPE_SCALE}]; got {shape_scale!r}")
  return float(shape_scale)


def layout(attrs: dict, rng: np.random.Generator,
           shape_scale: float = 1.0) -> tuple[tuple[float, float], float]:
  """Jittered centre (x, y) and radius of the shape, as fractions of the image side.

  `shape_scale` multiplies the radius; it draws the same random numbers for every value, so
  only the size changes (not the position jitter, background or noise).
  """
  row, col = POSITIONS[attrs["position"]]
  radius = 0.5 * SIZES[attrs["size"]] * rng.uniform(1.0 - SIZE_JITTER, 1.0 + SIZE_JITTER)
  radius *= check_shape_scale(shape_scale)
  jx, jy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
  lo, hi = _EXTENT * radius, 1.0 - _EXTENT * radius  # keep the whole shape inside the image
  cx = min(max((col + 0.5) / 3.0 + jx, lo), hi)
  cy = min(max((row + 0.5) / 3.0 + jy, lo), hi)
  return (float(cx), float(cy)), float(radius)


def _background(rng: np.random.Generator, image_size: int) -> np.ndarray:
  """Grey background [H, W] (float32): flat, or with prob. GRADIENT_PROB a soft gradient."""
  grey = float(list(BACKGROUNDS.values())[rng.integers(len(BACKGROUNDS))])
  grey += rng.uniform(-8.0, 8.0)
  if rng.uniform() >= GRADIENT_PROB:
    return np.full((image_size, image_size), grey, np.float32)
  y_Hx1, x_1xW = _grid(image_size)
  angle = rng.uniform(0.0, 2.0 * np.pi)
  c, s = np.cos(angle), np.sin(angle)
  ramp_HxW = (c * (x_1xW - 0.5) + s * (y_Hx1 - 0.5)) / (abs(c) + abs(s))  # in [-0.5, 0.5]
  return grey + np.float32(2.0 * GRADIENT_AMPLITUDE) * ramp_HxW.astype(np.float32)


def render(attrs: dict, image_size: int, rng: np.random.Generator,
           noise: int = NOISE_AMPLITUDE, shape_scale: float = 1.0) -> np.ndarray:
  """uint8 [H, W, 3] image of the shape described by `attrs` on a grey background.

  Draws (in this order) the layout jitter, the background and then the noise from `rng`, so
  `noise=0` with an identically seeded `rng` gives the same picture without noise. Shape pixels
  are exactly COLORS[colour] before noise; background pixels are grey (R = G = B).
  `shape_scale` multiplies the shape's size (see `layout`).
  """
  check_attributes(attrs)
  image_size = check_image_size(image_size)
  if not isinstance(noise, (int, np.integer)) or noise < 0 or noise > 64:
    raise ValueError(f"noise must be an int in [0, 64]; got {noise!r}")
  center_xy, radius = layout(attrs, rng, shape_scale)
  mask_HxW = shape_mask(attrs["shape"], center_xy, radius, image_size)
  grey_HxW = np.clip(np.rint(_background(rng, image_size)), 0, 255).astype(np.uint8)
  image_HxWx3 = np.repeat(grey_HxW[:, :, None], 3, axis=2)
  image_HxWx3[mask_HxW] = COLORS[attrs["color"]]
  if noise:
    n_HxWx3 = rng.integers(-noise, noise + 1, size=image_HxWx3.shape, dtype=np.int16)
    image_HxWx3 = np.clip(image_HxWx3.astype(np.int16) + n_HxWx3, 0, 255).astype(np.uint8)
  return image_HxWx3


# ---------------------------------------------------------------------------------------------
# Random-access source


def _check_split(split: Any) -> int:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose one of {tuple(SPLITS)}")
  return SPLITS[split]


class SyntheticShapes:
  """Grain-compatible random-access source of {'image', 'caption', 'label'} records.

  split: 'train' (TRAIN_SIZE = 2**31 - 1 samples unless `size` is given) or 'eval' (`size`
  samples, default 1000). Record `idx` is a pure function of (seed, split, idx).
  omit_prob: probability that a caption leaves out its size, and independently its position
  (default TRAIN_OMIT_PROB for 'train', 0 for 'eval'); images do not depend on it.
  shape_scale: multiplier of every shape's size (default 1); < 1 leaves more of each image
  plain background. Captions do not depend on it.
  filler: number of FILLER_WORDS inserted into every caption (train and eval; default 0), words
  that say nothing about the image, so most text positions have nothing to contribute (the
  text-tower version of the no-op setting; zero-shot prompts stay as they are).
  """

  def __init__(self, split: str = "train", image_size: int = 32, seed: int = 0,
               size: int | None = None, omit_prob: float | None = None,
               shape_scale: float = 1.0, filler: int = 0):
    self.split_id = _check_split(split)
    self.split = split
    self.image_size = check_image_size(image_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    self.seed = int(seed)
    if size is None:
      size = TRAIN_SIZE if split == "train" else 1000
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= TRAIN_SIZE:
      raise ValueError(f"size must be an int in [1, {TRAIN_SIZE}]; got {size!r}")
    self.size = int(size)
    if omit_prob is None:
      omit_prob = TRAIN_OMIT_PROB if split == "train" else 0.0
    if isinstance(omit_prob, bool) or not isinstance(omit_prob, (int, float)) or not (
        0.0 <= omit_prob <= 1.0):
      raise ValueError(f"omit_prob must be a number in [0, 1]; got {omit_prob!r}")
    self.omit_prob = float(omit_prob)
    self.shape_scale = check_shape_scale(shape_scale)
    if isinstance(filler, bool) or not isinstance(filler, (int, np.integer)) or filler < 0:
      raise ValueError(f"filler must be a non-negative int; got {filler!r}")
    self.filler = int(filler)

  def __len__(self) -> int:
    return self.size

  def __repr__(self) -> str:
    return (f"SyntheticShapes(split={self.split!r}, image_size={self.image_size}, "
            f"seed={self.seed}, size={self.size}, omit_prob={self.omit_prob}, "
            f"shape_scale={self.shape_scale}, filler={self.filler})")

  def rng(self, idx: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, self.split_id, idx])

  def attributes(self, idx: int) -> dict[str, str]:
    """The attributes of record `idx` (without rendering it)."""
    return sample_attributes(self.rng(self._check_index(idx)))

  def _check_index(self, idx: Any) -> int:
    if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)):
      raise TypeError(f"index must be an int; got {idx!r}")
    if not 0 <= idx < self.size:
      raise IndexError(f"index {idx} out of range [0, {self.size}) for {self!r}")
    return int(idx)

  def __getitem__(self, idx: int) -> dict[str, Any]:
    rng = self.rng(self._check_index(idx))
    attrs = sample_attributes(rng)
    image = render(attrs, self.image_size, rng, shape_scale=self.shape_scale)
    omit = ()
    if self.omit_prob > 0.0:  # no draws at 0, so eval captions do not depend on this option
      omit = tuple(a for a in OPTIONAL_ATTRIBUTES if rng.uniform() < self.omit_prob)
    text = caption(attrs, rng, omit=omit)
    if self.filler:  # drawn last: without filler the records are what they always were
      text = add_filler(text, self.filler, rng)
    return {"image": image, "caption": text, "label": np.int32(label_of(attrs))}


# ---------------------------------------------------------------------------------------------
# Description and figure


def describe() -> str:
  """One paragraph describing the dataset and its zero-shot task."""
  return (
      f"Synthetic shapes: one coloured shape per image on a mostly plain grey background, "
      f"procedurally generated and seeded (no download, unlimited train split, held-out eval "
      f"split). {len(COLORS)} colours ({', '.join(COLORS)}), {len(SHAPES)} shapes "
      f"({', '.join(SHAPES)}), {len(SIZES)} sizes ({', '.join(SIZES)}) and {len(POSITIONS)} "
      f"positions on a 3x3 grid; captions name colour and shape, and size and position "
      f"(each left out of training captions with probability {TRAIN_OMIT_PROB}), in "
      f"{len(CAPTION_TEMPLATES)} templates; eval captions name all four. "
      f"Zero-shot classification: {NUM_CLASSES} colour+shape "
      f"classes prompted with {len(TEMPLATES)} templates, chance level 1/{NUM_CLASSES} = "
      f"{100 * CHANCE_TOP1:.2f}% top-1.")


def save_sample_grid(path: str, n: int = 16, image_size: int = 64, seed: int = 0,
                     split: str = "eval", shape_scale: float = 1.0) -> str:
  """Saves a PNG grid of the first `n` records of a split with their captions; returns path."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"n must be a positive int; got {n!r}")
  source = SyntheticShapes(split, image_size=image_size, seed=seed, size=max(n, 1),
                           shape_scale=shape_scale)
  cols = int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.25 * rows), squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i >= n:
      continue
    record = source[i]
    ax.imshow(record["image"], interpolation="nearest")
    title = "\n".join(textwrap.wrap(record["caption"], 30))
    ax.set_title(f"{title}\n[{CLASS_NAMES[record['label']]}]", fontsize=7)
  scale = f", shape_scale={shape_scale:g}" if shape_scale != 1.0 else ""
  fig.suptitle(f"SyntheticShapes({split!r}, image_size={image_size}, seed={seed}{scale})",
               fontsize=9)
  fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.97))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def options():
  """The synthetic source's config block, data.synthetic."""
  import ml_collections
  c = ml_collections.ConfigDict()
  c.eval_size = 1024  # samples of the eval split
  # probability that a training caption leaves out the size, and independently the position
  # (eval captions always name all four attributes)
  c.omit_prob = TRAIN_OMIT_PROB
  c.shape_scale = 1.0  # multiplier of every shape's size (< 1: more plain-background patches)
  c.filler = 0  # filler words inserted into every caption (FILLER_WORDS; they say nothing)
  return c


def check_options(block) -> None:
  if not 0.0 <= block.omit_prob <= 1.0:
    raise ValueError(f"data.synthetic.omit_prob must be in [0, 1], got {block.omit_prob}")
  if not 0.0 < block.shape_scale <= MAX_SHAPE_SCALE:
    raise ValueError(f"data.synthetic.shape_scale must be in (0, {MAX_SHAPE_SCALE}], got "
                     f"{block.shape_scale}")
  if int(block.get("filler", 0)) < 0:
    raise ValueError(f"data.synthetic.filler must be >= 0 (filler words per caption), got "
                     f"{block.filler}")
  if block.eval_size < 1:
    raise ValueError(f"data.synthetic.eval_size must be >= 1, got {block.eval_size}")


def _synthetic_factory(config, split):
  src = SyntheticShapes(split=split, image_size=config.model.image.image_size, seed=config.seed,
                        size=config.data.synthetic.eval_size if split == "eval" else None,
                        omit_prob=config.data.synthetic.omit_prob if split == "train" else 0.0,
                        shape_scale=config.data.synthetic.shape_scale,
                        filler=int(config.data.synthetic.get("filler", 0)))
  src.class_names = tuple(CLASS_NAMES)
  src.templates = tuple(TEMPLATES)
  src.prompts = zeroshot_prompts()  # with the right article ("an orange circle")
  src.filler_words = FILLER_WORDS if src.filler else ()
  return src


registry.register_source("synthetic", _synthetic_factory, options, check_options)
