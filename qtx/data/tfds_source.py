"""`tfds:<name>` source: any TFDS dataset prepared in the array_record format, read with
`tfds.data_source`-style random access and decoded with PIL/numpy (no TensorFlow needed).

Spec (the part of data.name after 'tfds:'):

  <name>[/<config>][:<version>][?key=value&...]
  keys: train=<split>       split used for 'train' (default 'train')
        eval=<split>        split used for 'eval' (default: the first of validation, val, test
                            that the dataset has)
        class_names=<file>  one class name per line, overriding the dataset's label names
                            (e.g. readable ImageNet names instead of WordNet ids)
        templates=<set>     prompt template set: photo | grayscale | single
                            (default: grayscale for the MNIST family, photo otherwise)

  e.g. data.name='tfds:cifar10', 'tfds:coco_captions/2017?eval=val', data.path=<data_dir>.

Records:
- image-caption datasets (a `captions` sequence with a `text` field, as coco_captions, or a
  `caption`/`text` string): the caption is one of the image's captions, picked by
  (seed, index) for 'train' and the first one for 'eval';
- classification datasets (a ClassLabel `label`): the caption is a prompt template filled with
  the class name; `class_names` and `templates` make the split a zero-shot task.
Images are converted to RGB (grayscale, alpha, 16-bit handled) and fitted to the configured
size (`sources.fit_image`, centre crop by default). A record whose image cannot be decoded or
whose caption is empty is returned as None and counted (`sources.SkipCounter`).

When the dataset's builder code needs TensorFlow (e.g. coco_captions), the prepared files are
read through TFDS's read-only builder instead (data.path must point at the data_dir).
Datasets are not downloaded or prepared here: prepare them once (`tfds build <name>
--file_format=array_record`, which needs TensorFlow) and point data.path at the data_dir.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import urllib.parse
from typing import Any, Optional, Sequence

import numpy as np
from absl import logging

from qtx.data import registry, sources, templates as templates_lib

EVAL_SPLIT_CANDIDATES = ("validation", "val", "test")
SPEC_KEYS = ("train", "eval", "class_names", "templates")
CAPTION_TEXT_KEYS = ("caption", "text")
_WORDNET_ID = re.compile(r"^n\d{8}$")


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
  """'name?train=a&eval=b' -> ('name', {'train': 'a', 'eval': 'b'}); rejects unknown keys."""
  name, _, query = spec.partition("?")
  if not name:
    raise ValueError(f"empty TFDS dataset name in data.name 'tfds:{spec}'")
  opts = dict(urllib.parse.parse_qsl(query, keep_blank_values=True)) if query else {}
  unknown = sorted(set(opts) - set(SPEC_KEYS))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} in data.name 'tfds:{spec}'; accepted: "
                     f"{list(SPEC_KEYS)}")
  return name, opts


def base_name(name: str) -> str:
  """'coco_captions/2017:1.1.0' -> 'coco_captions'."""
  return re.split(r"[/:]", name)[0]


def _builder(name: str, data_dir: Optional[str]):
  import tensorflow_datasets as tfds
  try:
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except ImportError:
    # The dataset's builder code imports TensorFlow; read the prepared files instead.
    from tensorflow_datasets.core import read_only_builder
    try:
      return read_only_builder.builder_from_files(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001
      raise RuntimeError(
          f"TFDS dataset {name!r}: its builder needs TensorFlow and no prepared copy was found "
          f"under data_dir={data_dir!r} ({e}); prepare it with `tfds build {name} "
          "--file_format=array_record` and set data.path to that data_dir") from e


def _undecoded_images(builder, split: str, decoded):
  """The same split with image features left as encoded bytes (decoded here with PIL, which
  handles palette, CMYK and 16-bit images that TFDS's numpy decoder casts wrongly), or
  `decoded` where raw access is unavailable (mocked datasets without TensorFlow)."""
  import tensorflow_datasets as tfds
  Image = _feature_types()[0]
  features = decoded.dataset_info.features
  keys = [k for k in features.keys() if isinstance(features[k], Image)]
  if not keys or len(decoded) == 0:
    return decoded
  try:
    raw = builder.as_data_source(split=split,
                                 decoders={k: tfds.decode.SkipDecoding() for k in keys})
  except Exception:  # noqa: BLE001
    return decoded
  try:
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints a banner when TF is missing
      probe = raw[0]
  except ImportError:
    return decoded
  except Exception:  # a bad first record says nothing about raw access  # noqa: BLE001
    return raw
  return raw if isinstance(probe[keys[0]], bytes) else decoded


def resolve_split(split: str, known: Sequence[str], opts: dict[str, str]) -> str:
  """qtx split ('train' | 'eval') -> TFDS split name."""
  if split not in ("train", "eval"):
    raise ValueError(f"unknown split {split!r}; choose one of ('train', 'eval')")
  if split in opts:
    return opts[split]
  if split == "train":
    return "train"
  for c in EVAL_SPLIT_CANDIDATES:
    if c in known:
      return c
  if known:
    raise ValueError(f"dataset has no split among {EVAL_SPLIT_CANDIDATES} (it has "
                     f"{sorted(known)}); choose one with data.name='tfds:<name>?eval=<split>'")
  return "test"


def _feature_types():
  import tensorflow_datasets as tfds
  f = tfds.features
  return f.Image, f.ClassLabel, f.Text, f.Sequence


def describe_features(features) -> dict[str, Any]:
  """Which keys hold the image, the label and the captions of a FeaturesDict.

  Returns {'image': key, 'label': key | None, 'label_names': [...] | None,
           'caption': (key, subkey | None) | None}.
  """
  Image, ClassLabel, Text, Sequence_ = _feature_types()
  keys = list(features.keys())
  image = "image" if "image" in keys and isinstance(features["image"], Image) else next(
      (k for k in keys if isinstance(features[k], Image)), None)
  if image is None:
    raise ValueError(f"dataset has no image feature (features: {keys})")
  label = "label" if "label" in keys and isinstance(features["label"], ClassLabel) else next(
      (k for k in keys if isinstance(features[k], ClassLabel)), None)
  caption = None
  for k in keys:
    f = features[k]
    if isinstance(f, Sequence_):
      inner = f.feature
      if isinstance(inner, Text):
        caption = (k, None)
        break
      sub = getattr(inner, "keys", lambda: [])()
      if "text" in sub and isinstance(inner["text"], Text):
        caption = (k, "text")
        break
  if caption is None:
    for k in CAPTION_TEXT_KEYS:
      if k in keys and isinstance(features[k], Text):
        caption = (k, None)
        break
  if caption is None and label is None:
    raise ValueError(f"dataset has neither captions nor a class label (features: {keys})")
  return {"image": image, "label": label, "caption": caption,
          "label_names": list(features[label].names) if label else None}


def read_class_names(path: str) -> tuple[str, ...]:
  with open(os.path.expanduser(path), encoding="utf-8") as f:
    names = tuple(line.strip() for line in f if line.strip())
  if not names:
    raise ValueError(f"class names file {path!r} is empty")
  return names


def default_class_names(dataset: str, label_names: Sequence[str]) -> tuple[str, ...]:
  names = tuple(templates_lib.clean_class_name(n) for n in label_names)
  if dataset == "fashion_mnist" and len(names) == 10:
    from qtx.data import fashion_mnist
    return fashion_mnist.CLASS_NAMES
  if len(names) == len(templates_lib.IMAGENET_CLASSNAMES) and all(
      _WORDNET_ID.match(n) for n in names):
    # ImageNet-1k (imagenet2012 and its variants label by sorted WordNet id): OpenAI's names
    return templates_lib.IMAGENET_CLASSNAMES
  if names and all(_WORDNET_ID.match(n) for n in names):
    logging.warning("TFDS %s: class names are WordNet ids (e.g. %r); zero-shot prompts need "
                    "readable names: pass data.name='tfds:%s?class_names=<file>'", dataset,
                    names[0], dataset)
  return names


class TfdsSource:
  """Random-access records of one TFDS split (see the module docstring)."""

  def __init__(self, name: str, split: str, image_size: int, data_dir: Optional[str] = None,
               seed: int = 0, opts: Optional[dict[str, str]] = None, fit: str = "crop",
               data_source=None, counter: Optional[sources.SkipCounter] = None):
    opts = dict(opts or {})
    self.name = name
    self.split = split
    self.image_size = int(image_size)
    self.seed = int(seed)
    self.fit = fit
    self.counter = counter or sources.SkipCounter(f"tfds:{name}:{split}", parent=sources.SKIPPED)
    if data_source is None:
      builder = _builder(name, data_dir)
      self.tfds_split = resolve_split(split, list(builder.info.splits.keys()), opts)
      try:
        data_source = builder.as_data_source(split=self.tfds_split)
      except Exception as e:  # noqa: BLE001
        raise RuntimeError(
            f"cannot open TFDS {name!r} split {self.tfds_split!r} as array_record under "
            f"data_dir={data_dir or '~/tensorflow_datasets'!r}: {e}. Prepare it with `tfds build "
            f"{name} --file_format=array_record` (needs TensorFlow) or set data.path to the "
            "data_dir that holds it") from e
      data_source = _undecoded_images(builder, self.tfds_split, data_source)
    else:
      self.tfds_split = resolve_split(split, [], opts)
    self._ds = data_source
    info = describe_features(data_source.dataset_info.features)
    self._image_key = info["image"]
    self._label_key = info["label"]
    self._caption_key = info["caption"]
    self.class_names: tuple[str, ...] = ()
    self.templates: tuple[str, ...] = ()
    if self._label_key is not None:
      names = (read_class_names(opts["class_names"]) if opts.get("class_names")
               else default_class_names(base_name(name), info["label_names"]))
      if len(names) != len(info["label_names"]):
        raise ValueError(f"{len(names)} class names given for {len(info['label_names'])} "
                         f"classes of TFDS {name!r}")
      self.class_names = names
      self.templates = (templates_lib.get(opts["templates"]) if opts.get("templates")
                        else templates_lib.for_dataset(base_name(name)))

  @classmethod
  def from_spec(cls, spec: str, split: str, image_size: int, data_dir: Optional[str] = None,
                seed: int = 0, **kw) -> "TfdsSource":
    name, opts = parse_spec(spec)
    return cls(name, split, image_size, data_dir=data_dir, seed=seed, opts=opts, **kw)

  def __len__(self) -> int:
    return len(self._ds)

  def _where(self, idx: int) -> str:
    return f"tfds:{self.name}/{self.tfds_split}[{idx}]"

  def _caption_options(self, example) -> list[str]:
    key, sub = self._caption_key
    value = example[key]
    if sub is not None:
      value = value[sub] if isinstance(value, dict) else value
    if isinstance(value, (list, tuple, np.ndarray)):
      return [c for c in (sources.clean_caption(v) for v in list(value)) if c]
    c = sources.clean_caption(value)
    return [c] if c else []

  def _pick_caption(self, example, idx: int) -> str:
    options = self._caption_options(example)
    if not options:
      return ""
    if self.split == "eval":
      return options[0]
    return options[templates_lib.pick_index(len(options), self.seed, idx, "caption")]

  def __getitem__(self, idx):
    idx = int(idx)
    if not -len(self) <= idx < len(self):
      raise IndexError(f"index {idx} out of range for {len(self)} records")
    idx %= len(self)
    try:
      example = self._ds[idx]
      rgb = sources.decode_image(example[self._image_key], draft_size=self.image_size)
      image = sources.fit_image(rgb, self.image_size, self.fit)
    except Exception as e:  # a corrupt record must not stop training  # noqa: BLE001
      self.counter.record(self._where(idx), f"unreadable image: {type(e).__name__}: {e}")
      return None
    rec = {"image": image}
    if self._label_key is not None:
      rec["label"] = int(example[self._label_key])
    if self._caption_key is not None:
      caption = self._pick_caption(example, idx)
      if self.split == "eval":  # every caption, for multi-caption retrieval (COCO: 5)
        rec["captions"] = self._caption_options(example)
    else:
      caption = templates_lib.caption(self.class_names[rec["label"]], self.templates, self.seed,
                                      idx)
    if not caption:
      self.counter.record(self._where(idx), "empty caption")
      return None
    rec["caption"] = caption
    return rec


def _tfds_factory(config, split):
  return TfdsSource.from_spec(
      config.data.name[len("tfds:"):], split, config.model.image.image_size,
      data_dir=registry.data_dir(config), seed=config.seed)


registry.register_source("tfds:", _tfds_factory)
