"""Prompt templates for zero-shot classification and class-name captions.

A template is a string with exactly one `{}` where the class name goes. Zero-shot evaluation
embeds every class name in every template of a set and averages the normalised text
embeddings per class (CLIP's prompt ensembling, see `qtx.evaluate.class_embeddings`).
Classification datasets used for training get one caption per image: a template of the set
filled with the image's class name, chosen deterministically from (seed, index).
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Sequence


def _read_lines(name: str) -> tuple[str, ...]:
  with open(os.path.join(os.path.dirname(__file__), name), encoding="utf-8") as f:
    return tuple(line.rstrip("\n") for line in f if line.strip())


# OpenAI CLIP's zero-shot ImageNet protocol (MIT License, see LICENSE_openai_imagenet_prompts.txt):
# the 1000 curated class names, in the order of the ImageNet-1k class indices (they differ from
# the WordNet synset names; 'missile' appears twice, as in the original list), and the 80
# prompt templates of the prompt ensemble.
IMAGENET_CLASSNAMES: tuple[str, ...] = _read_lines("imagenet_classnames.txt")
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = _read_lines("openai_imagenet_templates.txt")

# Generic phrasings for natural photographs.
PHOTO_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a cropped photo of a {}.",
    "a low resolution photo of a {}.",
    "a good photo of a {}.",
    "a photo of one {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "an image of a {}.",
    "a picture of a {}.",
    "a snapshot of a {}.",
    "a black and white photo of a {}.",
)

# Small grayscale product pictures (Fashion-MNIST and similar).
GRAYSCALE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a grayscale image of a {}.",
    "a low resolution photo of a {}.",
    "a small photo of a {}.",
    "a product photo of a {}.",
    "an image of a {}.",
    "a picture of a {}.",
)

SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "photo": PHOTO_TEMPLATES,
    "grayscale": GRAYSCALE_TEMPLATES,
    "single": SINGLE_TEMPLATE,
    "openai_imagenet": OPENAI_IMAGENET_TEMPLATES,
}

# Datasets whose images are not colour photographs get the grayscale set.
_DATASET_SETS: dict[str, str] = {
    "fashion_mnist": "grayscale",
    "mnist": "grayscale",
    "kmnist": "grayscale",
    "emnist": "grayscale",
    "imagenet2012": "openai_imagenet",
    "imagenet2012_subset": "openai_imagenet",
    "imagenet_v2": "openai_imagenet",
    "imagenet_sketch": "openai_imagenet",
}


def get(name: str) -> tuple[str, ...]:
  """Template set by name: 'photo', 'grayscale', 'single' or 'openai_imagenet' (the 80)."""
  if name not in TEMPLATE_SETS:
    raise ValueError(f"unknown template set {name!r}; choose one of {tuple(TEMPLATE_SETS)}")
  return TEMPLATE_SETS[name]


def for_dataset(dataset: str) -> tuple[str, ...]:
  """The template set suited to a dataset name (e.g. 'fashion_mnist', 'cifar10',
  'tfds:imagenet2012', 'mnist/3.0.1'): grayscale for the MNIST family, photo otherwise."""
  base = dataset.split(":")[-1] if dataset.startswith("tfds:") else dataset.split(":")[0]
  base = re.split(r"[/:?]", base)[0]
  return get(_DATASET_SETS.get(base, "photo"))


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
  """Returns the templates as a tuple; raises ValueError unless each has exactly one '{}'."""
  out = tuple(templates)
  if not out:
    raise ValueError("template list is empty; give at least one template such as "
                     "'a photo of a {}.'")
  for t in out:
    if not isinstance(t, str) or t.count("{}") != 1 or re.search(r"\{[^}]", t):
      raise ValueError(f"bad prompt template {t!r}: it must contain exactly one '{{}}' and no "
                       "other braces")
  return out


def clean_class_name(name) -> str:
  """Readable class name: bytes decoded, underscores to spaces, whitespace collapsed."""
  if isinstance(name, bytes):
    name = name.decode("utf-8", "replace")
  return " ".join(str(name).replace("_", " ").split())


def pick_index(n: int, seed: int, index: int, salt: str = "") -> int:
  """Deterministic pseudo-random choice in [0, n) from (seed, index, salt); stable across
  processes and Python versions (unlike hash())."""
  if n <= 0:
    raise ValueError(f"cannot pick from an empty list (n={n})")
  digest = hashlib.blake2b(f"{seed}:{index}:{salt}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") % n


def caption(class_name: str, templates: Sequence[str], seed: int, index: int) -> str:
  """One caption for an image of class `class_name`: a template picked by (seed, index)."""
  return templates[pick_index(len(templates), seed, index, "template")].format(class_name)
