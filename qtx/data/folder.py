"""`folder` source: a local directory of images plus a captions file (bring your own data).

Layout of `data.path`:

  captions.jsonl   one JSON object per line: {"image": "<path>", "caption": "<text>"}
  captions.csv     or a CSV file with (at least) the columns `image` and `caption`
  <images>         any layout; paths in the captions file are relative to data.path
                   (absolute paths are used as given)

Optional keys/columns: `label` (a class name; the split then also serves zero-shot
classification with the sorted distinct labels as classes). In JSONL, `caption` may be a list
of captions; one is picked per image, fixed by (seed, index).

Splits: if `captions_train.{jsonl,csv}` / `captions_eval.{jsonl,csv}` exist, each split reads
its own file. Otherwise the single captions file is split by a hash of the image path: a record
is in `eval` when blake2b(path) / 2^64 < eval_fraction (default 2%), so the split is
deterministic and stable when records are added or reordered. A non-empty list with no eval
record under that rule gets the record with the smallest hash as its one eval record.

Bad data: lines that are not valid JSON / rows without an image path are skipped and counted
when the file is read; at access time a missing file, an unreadable or corrupt image, or an
empty caption makes `__getitem__` return None and count the record (`SkipCounter`).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from typing import Optional

import numpy as np

from qtx.data import registry, sources, templates as templates_lib

CAPTION_FILES = ("captions.jsonl", "captions.csv")
SPLITS = ("train", "eval")
DEFAULT_EVAL_FRACTION = 0.02


def split_hash(path: str) -> float:
  """Position of an image path in [0, 1) for the hash split."""
  digest = hashlib.blake2b(path.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0**64


def caption_file(root: str, split: str) -> tuple[str, bool]:
  """(path of the captions file for `split`, whether it is split-specific)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
  for ext in ("jsonl", "csv"):
    p = os.path.join(root, f"captions_{split}.{ext}")
    if os.path.isfile(p):
      return p, True
  for name in CAPTION_FILES:
    p = os.path.join(root, name)
    if os.path.isfile(p):
      return p, False
  raise FileNotFoundError(
      f"no captions file in {root!r}: expected one of {list(CAPTION_FILES)} or "
      f"captions_{split}.jsonl / captions_{split}.csv")


def _read_jsonl(path: str, counter: sources.SkipCounter) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        counter.record(f"{path}:{lineno}", f"bad captions line: {e.msg}")
        continue
      if not isinstance(row, dict):
        counter.record(f"{path}:{lineno}", "bad captions line: not a JSON object")
        continue
      rows.append(row)
  return rows


def _read_csv(path: str) -> list[dict]:
  with open(path, encoding="utf-8", errors="replace", newline="") as f:
    reader = csv.DictReader(f)
    fields = [c.strip() for c in (reader.fieldnames or [])]
    if "image" not in fields or "caption" not in fields:
      raise ValueError(f"{path}: CSV header must have the columns 'image' and 'caption'; found "
                       f"{fields}")
    return [{(k or "").strip(): v for k, v in row.items()} for row in reader]


def read_captions(path: str, counter: sources.SkipCounter) -> list[tuple[str, object, object]]:
  """[(image path as written, caption (str | list | None), label or None)] in file order."""
  rows = _read_jsonl(path, counter) if path.endswith(".jsonl") else _read_csv(path)
  out = []
  for i, row in enumerate(rows):
    image = row.get("image")
    if not isinstance(image, str) or not image.strip():
      counter.record(f"{path}:row {i}", "bad captions line: no image path")
      continue
    out.append((image.strip(), row.get("caption"), row.get("label")))
  return out


def hash_split(records: list, split: str, eval_fraction: float) -> list:
  """The records of `split` under the path-hash rule (see the module docstring)."""
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
  h = [split_hash(r[0]) for r in records]
  is_eval = [x < eval_fraction for x in h]
  if records and len(records) > 1 and eval_fraction > 0 and not any(is_eval):
    is_eval[int(np.argmin(h))] = True
  want = split == "eval"
  return [r for r, e in zip(records, is_eval) if e == want]


class FolderSource:
  """Random-access image-caption records from a directory (see the module docstring)."""

  def __init__(self, root: str, split: str, image_size: int, seed: int = 0,
               eval_fraction: float = DEFAULT_EVAL_FRACTION, fit: str = "crop",
               counter: Optional[sources.SkipCounter] = None):
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
      raise FileNotFoundError(f"data.path {root!r} is not a directory")
    self.root = root
    self.split = split
    self.image_size = int(image_size)
    self.seed = int(seed)
    self.fit = fit
    if fit not in sources.FIT_MODES:
      raise ValueError(f"unknown fit mode {fit!r}; choose one of {sources.FIT_MODES}")
    self.counter = counter or sources.SkipCounter(f"folder:{split}", parent=sources.SKIPPED)
    path, specific = caption_file(root, split)
    self.captions_path = path
    records = read_captions(path, self.counter)
    if not specific:
      records = hash_split(records, split, eval_fraction)
    if not records:
      raise ValueError(f"{path}: no usable records for split {split!r}")
    self._images = [r[0] for r in records]
    self._captions = [r[1] for r in records]
    labels = [r[2] for r in records]
    self.class_names: tuple[str, ...] = ()
    self.templates: tuple[str, ...] = ()
    self._labels = None
    if all(isinstance(v, str) and v.strip() for v in labels):
      names = sorted({templates_lib.clean_class_name(v) for v in labels})
      index = {n: i for i, n in enumerate(names)}
      self._labels = [index[templates_lib.clean_class_name(v)] for v in labels]
      self.class_names = tuple(names)
      self.templates = templates_lib.PHOTO_TEMPLATES

  def __len__(self) -> int:
    return len(self._images)

  def _key(self, idx: int) -> str:
    return f"{self.captions_path}#{idx}"

  def image_path(self, idx: int) -> str:
    return os.path.join(self.root, self._images[idx])

  def _caption(self, idx: int) -> str:
    c = self._captions[idx]
    if isinstance(c, (list, tuple)):
      options = [x for x in (sources.clean_caption(v) for v in c) if x]
      if not options:
        return ""
      return options[templates_lib.pick_index(len(options), self.seed, idx, "caption")]
    return sources.clean_caption(c)

  def __getitem__(self, idx):
    idx = int(idx)
    if not -len(self) <= idx < len(self):
      raise IndexError(f"index {idx} out of range for {len(self)} records")
    idx %= len(self)
    path = self.image_path(idx)
    caption = self._caption(idx)
    if not caption:
      self.counter.record(path, "empty caption", key=self._key(idx))
      return None
    if not os.path.isfile(path):
      self.counter.record(path, "missing file", key=self._key(idx))
      return None
    try:
      rgb = sources.decode_image(path, draft_size=self.image_size)
      image = sources.fit_image(rgb, self.image_size, self.fit)
    except Exception as e:  # any decoder failure marks only this record bad  # noqa: BLE001
      self.counter.record(path, f"unreadable image: {type(e).__name__}: {e}", key=self._key(idx))
      return None
    rec = {"image": image, "caption": caption}
    c = self._captions[idx]
    if self.split == "eval" and isinstance(c, (list, tuple)):  # multi-caption retrieval
      rec["captions"] = [x for x in (sources.clean_caption(v) for v in c) if x]
    if self._labels is not None:
      rec["label"] = self._labels[idx]
    return rec


def _folder_factory(config, split):
  if not config.data.path:
    raise ValueError("data.name='folder' needs data.path: a directory with images and a "
                     "captions.jsonl or captions.csv file")
  return FolderSource(registry.data_dir(config), split, config.model.image.image_size, seed=config.seed)


registry.register_source("folder", _folder_factory)
