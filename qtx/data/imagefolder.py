"""Class-per-folder image classification data, for zero-shot evaluation.

  ROOT/<class folder>/<image files>      e.g. ImageNet val in the standard layout:
  ROOT/n01440764/ILSVRC2012_val_00000293.JPEG ...

Class names:
- ImageNet layout (every folder a WordNet id, n + 8 digits, 1000 of them): the folders in sorted
  order are the ImageNet-1k class indices, named by `templates.IMAGENET_CLASSNAMES` (OpenAI's
  curated names) and prompted with `templates.OPENAI_IMAGENET_TEMPLATES` (the 80).
- Any other tree: the folder names are the class names (underscores become spaces), prompted
  with the generic photo templates.
Use as `--config.eval.zeroshot=imagefolder@/path/to/val`: the whole folder is evaluated (its
size is logged as eval/<name>/num_samples). Unreadable images are skipped and counted
(data/skipped).
"""
from __future__ import annotations

import os
import re
from typing import Optional

from qtx.data import registry, sources
from qtx.data import templates as templates_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_WNID = re.compile(r"^n\d{8}$")
NUM_IMAGENET_CLASSES = 1000


class ImageFolderSource:
  """Random-access {'image', 'caption', 'label'} records from ROOT/<class>/<image>."""

  def __init__(self, root: str, image_size: int, fit: str = "crop",
               counter: Optional[sources.SkipCounter] = None):
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
      raise FileNotFoundError(f"imagefolder: {root!r} is not a directory (expected one folder "
                              "of images per class)")
    self.root, self.image_size, self.fit = root, int(image_size), fit
    self.counter = counter or sources.SkipCounter("imagefolder", parent=sources.SKIPPED)
    folders = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not folders:
      raise ValueError(f"imagefolder: {root!r} has no class folders (expected "
                       "ROOT/<class>/<image files>)")
    wnids = [d for d in folders if _WNID.match(d)]
    if wnids and len(wnids) == len(folders):
      if len(folders) != NUM_IMAGENET_CLASSES:
        raise ValueError(
            f"imagefolder: {root!r} has {len(folders)} WordNet-id folders; the standard names "
            f"cover the {NUM_IMAGENET_CLASSES} ImageNet-1k classes, whose sorted ids are the "
            "class indices. Give all 1000 folders, or rename the folders to class names")
      self.class_names = templates_lib.IMAGENET_CLASSNAMES
      self.templates = templates_lib.OPENAI_IMAGENET_TEMPLATES
    else:
      self.class_names = tuple(templates_lib.clean_class_name(d) for d in folders)
      if len(set(self.class_names)) != len(folders):
        raise ValueError(f"imagefolder: folder names of {root!r} give duplicate class names")
      self.templates = templates_lib.PHOTO_TEMPLATES
    self._files: list[str] = []
    self._labels: list[int] = []
    for label, d in enumerate(folders):
      for f in sorted(os.listdir(os.path.join(root, d))):
        if f.lower().endswith(IMAGE_EXTENSIONS):
          self._files.append(os.path.join(d, f))
          self._labels.append(label)
        elif not f.startswith("."):
          self.counter.record(os.path.join(root, d, f), "not an image file")
    if not self._files:
      raise ValueError(f"imagefolder: no image files under {root!r} (extensions "
                       f"{', '.join(IMAGE_EXTENSIONS)})")

  def __len__(self) -> int:
    return len(self._files)

  @property
  def labels(self) -> tuple[int, ...]:
    return tuple(self._labels)

  def __getitem__(self, idx):
    idx = int(idx) % len(self)
    path = os.path.join(self.root, self._files[idx])
    try:
      rgb = sources.decode_image(path, draft_size=self.image_size)
      image = sources.fit_image(rgb, self.image_size, self.fit)
    except Exception as e:  # any decoder failure marks only this record bad  # noqa: BLE001
      self.counter.record(path, f"unreadable image: {type(e).__name__}: {e}", key=path)
      return None
    label = self._labels[idx]
    return {"image": image, "label": label,
            "caption": self.templates[0].format(self.class_names[label])}


def _imagefolder_factory(config, split):
  if not config.data.path:
    raise ValueError("data.name='imagefolder' needs a path: ROOT/<class>/<images>, e.g. "
                     "--config.eval.zeroshot=imagefolder@/data/imagenet/val")
  return ImageFolderSource(registry.data_dir(config), config.model.image.image_size)


registry.register_source("imagefolder", _imagefolder_factory)
