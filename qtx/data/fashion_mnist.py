"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) from its standard idx files.

The directory (data.path, default `/usr/share/datasets/fashion-mnist`, where Debian's
`dataset-fashion-mnist` package installs it) holds

  train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]   60000 images  (split 'train')
  t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]    10000 images  (split 'eval')

Images are 28 x 28 grayscale (white object on black), returned as RGB at the configured size:
fit='crop' resizes (bicubic) to S x S, fit='pad' centres the 28 x 28 image on a black S x S
canvas (S >= 28; a large plain background, as in the exploratory outlier runs). Captions are
one of `templates` (default: the grayscale set) filled with the class name, picked by
(seed, index); `class_names` and `templates` make the eval split a 10-way zero-shot task
(chance 10%).
"""
from __future__ import annotations

import functools
import gzip
import os
from typing import Optional, Sequence

import numpy as np

from qtx.data import registry, sources, templates as templates_lib

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES: tuple[str, ...] = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal",
                                "shirt", "sneaker", "bag", "ankle boot")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "eval": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SIZES = {"train": 60000, "eval": 10000}
IMAGE_SHAPE = (28, 28)
# idx magic: two zero bytes, the element type (0x08 = uint8) and the number of dimensions.
_IDX_UINT8 = 0x08


def read_idx(path: str) -> np.ndarray:
  """An idx file (optionally gzipped) as a uint8 array; validates the header and size."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path}: not an idx file (bad magic {data[:4]!r})")
  if data[2] != _IDX_UINT8:
    raise ValueError(f"{path}: idx element type 0x{data[2]:02x} is not uint8 (0x08)")
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"{path}: truncated idx header")
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  expected = int(np.prod(shape)) if shape else 1
  if len(data) - header != expected:
    raise ValueError(f"{path}: idx header says shape {shape} ({expected} bytes) but the file has "
                     f"{len(data) - header} bytes of data")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def find_file(directory: str, stem: str) -> str:
  """`stem` or `stem.gz` in `directory` (also spelled with '.idx' for '-idx', as some mirrors
  name the files)."""
  names = [stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"]
  for n in names:
    p = os.path.join(directory, n)
    if os.path.isfile(p):
      return p
  raise FileNotFoundError(
      f"Fashion-MNIST file {stem}[.gz] not found in {directory!r}; install the Debian package "
      "`dataset-fashion-mnist` (files under /usr/share/datasets/fashion-mnist) or set "
      "data.path to a directory with the four idx files")


@functools.lru_cache(maxsize=4)
def load_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images N x 28 x 28 uint8, labels N uint8) of 'train' or 'eval'; cached per process."""
  if split not in FILES:
    raise ValueError(f"unknown split {split!r}; choose one of {tuple(FILES)}")
  img_stem, lbl_stem = FILES[split]
  images = read_idx(find_file(directory, img_stem))
  labels = read_idx(find_file(directory, lbl_stem))
  if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f"{directory}: {img_stem} has shape {images.shape}, expected "
                     f"(N, 28, 28)")
  if labels.shape != (images.shape[0],):
    raise ValueError(f"{directory}: {lbl_stem} has shape {labels.shape}, expected "
                     f"({images.shape[0]},)")
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise ValueError(f"{directory}: label {int(labels.max())} out of range for "
                     f"{len(CLASS_NAMES)} classes")
  return images, labels


class FashionMNIST:
  """Random-access Fashion-MNIST records {'image', 'caption', 'label'} (see module docstring)."""

  def __init__(self, split: str, image_size: int, path: Optional[str] = None, fit: str = "crop",
               seed: int = 0, templates: Optional[Sequence[str]] = None):
    if fit not in ("crop", "pad"):
      raise ValueError(f"unknown Fashion-MNIST fit {fit!r}; choose one of ('crop', 'pad') "
                       "(data.name 'fashion_mnist' or 'fashion_mnist:pad')")
    if fit == "pad" and image_size < IMAGE_SHAPE[0]:
      raise ValueError(f"fit='pad' needs image_size >= 28, got {image_size}")
    self.directory = os.path.abspath(os.path.expanduser(path or DEFAULT_DIR))
    self.split = split
    self.image_size = int(image_size)
    self.fit = fit
    self.seed = int(seed)
    self.images, self.labels = load_split(self.directory, split)
    self.class_names = CLASS_NAMES
    self.templates = templates_lib.check_templates(
        templates if templates is not None else templates_lib.GRAYSCALE_TEMPLATES)

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def image(self, idx: int) -> np.ndarray:
    """uint8 S x S x 3 image of record `idx`."""
    rgb = np.repeat(self.images[idx][..., None], 3, axis=-1)
    return sources.fit_image(rgb, self.image_size, self.fit, fill=0)

  def __getitem__(self, idx):
    idx = int(idx)
    if not -len(self) <= idx < len(self):
      raise IndexError(f"index {idx} out of range for {len(self)} records")
    idx %= len(self)
    label = int(self.labels[idx])
    return {"image": self.image(idx),
            "caption": templates_lib.caption(self.class_names[label], self.templates, self.seed,
                                             idx),
            "label": label}


def _fashion_mnist_factory(config, split):
  name = config.data.name
  fit = name.split(":", 1)[1] if ":" in name else "crop"
  if fit == "resize":
    fit = "crop"
  return FashionMNIST(split, config.model.image.image_size, path=registry.data_dir(config),
                                    fit=fit, seed=config.seed)


registry.register_source("fashion_mnist", _fashion_mnist_factory)
registry.register_source("fashion_mnist:", _fashion_mnist_factory)
