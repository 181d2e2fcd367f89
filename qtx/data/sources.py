"""What every data source shares: the record contract, image decoding, bad-record accounting.

`config.data.name` picks the source (`qtx.data.registry`; each source module registers itself):

  synthetic                                  the embedded shapes (`qtx.data.synthetic`)
  tfds:<name>[?train=<split>&eval=<split>]   any TFDS dataset prepared as array_record
                                             (`qtx.data.tfds_source`); data.path = data_dir
  folder                                     images + captions.jsonl / captions.csv under
                                             data.path (`qtx.data.folder`)
  webdataset                                 tar shards (img2dataset layout): data.path a
                                             brace pattern, directory or list file, local or
                                             gs:// (`qtx.data.webdataset`); data.eval_path
  imagefolder                                class-per-folder images, for zero-shot
                                             evaluation (`qtx.data.imagefolder`)
  fashion_mnist[:pad]                        Fashion-MNIST idx files under data.path or
                                             /usr/share/datasets/fashion-mnist
                                             (`qtx.data.fashion_mnist`)

Every source is random access (`__len__`, `__getitem__`) and returns
{'image': uint8 (S, S, 3), 'caption': str, optional 'label': int} with S =
config.model.image.image_size, or **None for a record that cannot be used** (unreadable or missing
image, empty caption). Such records are counted in a `SkipCounter` (the module-level `SKIPPED`
aggregates all sources: `SKIPPED.metrics() == {'data/skipped': n}`) and the first few are
logged with their path and reason; the pipeline drops the Nones. Images that can be decoded
are converted, never dropped: grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit
and float images all become 8-bit RGB.
"""
from __future__ import annotations

import collections
import io
import itertools
import threading
from typing import Any, Optional, Sequence, Union

import numpy as np
from absl import logging

# ---------------------------------------------------------------------------------------------
# Bad-record accounting


class SkipCounter:
  """Thread-safe count of skipped records, with the first `log_first` logged (path + reason).

  `count` is the number of distinct bad records (by key), `events` the number of skips
  (a bad record is skipped again in every epoch). Counters may form a chain: a source's own
  counter forwards every skip to its `parent` (by default the module-level `SKIPPED`), so the
  training loop reads one total: `SKIPPED.metrics() == {'data/skipped': n}`.
  """

  def __init__(self, name: str = "data", log_first: int = 5,
               parent: Optional["SkipCounter"] = None):
    self.name = name
    self.log_first = int(log_first)
    self.parent = parent
    self._lock = threading.Lock()
    self._seen: dict[str, tuple[str, str]] = {}  # key -> (path, reason), in first-seen order
    self._events = 0
    self._reasons: collections.Counter = collections.Counter()
    self._examples: list[tuple[str, str]] = []

  def _add(self, path: str, reason: str, key: str) -> tuple[bool, int, bool]:
    """Counts one skip; returns (log it?, distinct count, first time seen?)."""
    with self._lock:
      self._events += 1
      new = key not in self._seen
      if new:
        self._seen[key] = (path, reason)
        self._reasons[reason.split(":")[0]] += 1
      log = new and len(self._examples) < self.log_first
      if log:
        self._examples.append((path, reason))
      return log, len(self._seen), new

  def record(self, path, reason: str, key=None) -> None:
    """Counts one skipped record; logs it while fewer than `log_first` records were logged.

    `key` identifies the record for the distinct count (default: `path`; sources pass their
    record's position when one file may appear in several records)."""
    path = str(path)
    key = path if key is None else str(key)
    log, n, new = self._add(path, reason, key)
    if log:
      logging.warning("data[%s]: skipped %s (%s); %d bad record(s) so far", self.name, path,
                      reason, n)
    elif new and n in (10, 100, 1000, 10_000, 100_000, 1_000_000):
      logging.warning("data[%s]: %d bad records skipped so far %s", self.name, n, self.reasons)
    node = self.parent
    while node is not None:  # ancestors count without logging again
      node._add(path, reason, key)
      node = node.parent

  @property
  def count(self) -> int:
    """Distinct bad records seen."""
    with self._lock:
      return len(self._seen)

  def since(self, n: int) -> list[tuple[str, str, str]]:
    """(key, path, reason) of the distinct bad records after the first `n` seen: what a worker
    process has found since it last reported (`SkipReport`)."""
    with self._lock:
      return [(k, *v) for k, v in itertools.islice(self._seen.items(), n, None)]

  @property
  def events(self) -> int:
    """Skips, counting a bad record again each time it is read."""
    with self._lock:
      return self._events

  @property
  def reasons(self) -> dict[str, int]:
    """Distinct bad records per kind of reason ('missing file', 'unreadable image', ...)."""
    with self._lock:
      return dict(self._reasons)

  @property
  def examples(self) -> list[tuple[str, str]]:
    """The first `log_first` (path, reason) pairs."""
    with self._lock:
      return list(self._examples)

  def __getstate__(self):
    # Picklable for multiprocessing data loaders; counts made in a worker stay in that worker.
    state = dict(self.__dict__)
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def metrics(self, prefix: str = "data/") -> dict[str, int]:
    return {f"{prefix}skipped": self.count}

  def reset(self) -> None:
    with self._lock:
      self._seen.clear()
      self._events = 0
      self._reasons.clear()
      self._examples.clear()


SKIPPED = SkipCounter("all")


SKIP_FIELD = "_skipped"  # batch field carrying a worker's new bad records to the main process


class SkipReport:
  """Grain map run at the end of a worker process's pipeline: adds to each batch the bad
  records (key, path, reason) the worker's counter found since its previous batch, so the main
  process can count them (`absorb_skips`). Without it, skips counted in data.num_workers > 0
  worker processes would stay there and data/skipped would read 0."""

  def __init__(self, counter: Optional["SkipCounter"] = None):
    # The counter travels to the worker with the sources (one pickle), so it is the very
    # counter the worker's sources forward their skips to.
    self.counter = SKIPPED if counter is None else counter
    # What the counter holds now, the main process knows already; the worker reports the rest.
    self.sent = self.counter.count

  def __call__(self, batch):
    new = self.counter.since(self.sent)
    self.sent += len(new)
    return {**batch, SKIP_FIELD: np.asarray([list(r) for r in new], dtype=np.str_).reshape(-1, 3)}


def absorb_skips(batch, counter: Optional["SkipCounter"] = None):
  """Main-process side of SkipReport: records the batch's reported bad records in `counter`
  (default SKIPPED; by key, so a record reported by two workers or again after a resume counts
  once) and returns the batch without the field."""
  counter = SKIPPED if counter is None else counter
  batch = dict(batch)
  for key, path, reason in np.asarray(batch.pop(SKIP_FIELD, np.zeros((0, 3), np.str_))):
    counter.record(str(path), str(reason), key=str(key))
  return batch


# ---------------------------------------------------------------------------------------------
# Image decoding and resizing (PIL; no TensorFlow)

FIT_MODES = ("crop", "pad", "stretch", "keep")  # keep: as decoded (training augmentation)
ImageInput = Union[str, bytes, np.ndarray, Any]


def _pil():
  import PIL.Image
  import PIL.ImageOps
  return PIL


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
  """Integer or float pixels -> uint8: 16-bit / 32-bit ints by their range, floats in [0, 1]
  (or [0, 255] when larger values occur)."""
  if a.dtype == np.uint8:
    return a
  if a.dtype == np.bool_:
    return a.astype(np.uint8) * 255
  if np.issubdtype(a.dtype, np.floating):
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if a.size and a.max() <= 1.0:
      a = a * 255.0
    return np.clip(np.round(a), 0, 255).astype(np.uint8)
  peak = int(a.max()) if a.size else 0
  if a.dtype.itemsize == 1:
    top = 255
  elif a.dtype.itemsize == 2:  # 16-bit images use their full range
    top = 65535
  else:  # 32/64-bit integers (PIL mode 'I'): 8-bit, 16-bit or wider content by its peak
    top = 255 if peak <= 255 else (65535 if peak <= 65535 else peak)
  return np.clip(np.round(a.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def array_to_rgb(a: np.ndarray) -> np.ndarray:
  """H x W, H x W x 1, x 2 (gray + alpha), x 3 or x 4 (RGBA) array of any numeric dtype ->
  uint8 H x W x 3. Alpha is composited over white."""
  a = np.asarray(a)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim == 2:
    g = _scale_to_uint8(a)
    return np.repeat(g[..., None], 3, axis=-1)
  if a.ndim != 3 or a.shape[-1] not in (2, 3, 4):
    raise ValueError(f"cannot interpret an array of shape {a.shape} as an image; expected "
                     "H x W, or H x W x C with C in (1, 2, 3, 4)")
  if a.shape[-1] == 2:
    a = np.concatenate([np.repeat(a[..., :1], 3, axis=-1), a[..., 1:]], axis=-1)
  rgb = _scale_to_uint8(a[..., :3]) if a.shape[-1] == 3 else None
  if a.shape[-1] == 4:
    color = _scale_to_uint8(a[..., :3]).astype(np.float32)
    alpha = _scale_to_uint8(a[..., 3]).astype(np.float32)[..., None] / 255.0
    rgb = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
  return rgb


def pil_to_rgb(img) -> np.ndarray:
  """Any PIL image mode -> uint8 H x W x 3 (see `array_to_rgb` for alpha and bit depth)."""
  mode = img.mode
  if mode == "RGB":
    return np.asarray(img, dtype=np.uint8)
  if mode in ("RGBA", "LA", "RGBa", "La", "PA") or (mode == "P" and "transparency" in img.info):
    return array_to_rgb(np.asarray(img.convert("RGBA")))
  if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grayscale
    return array_to_rgb(np.asarray(img))
  if mode == "1":
    return array_to_rgb(np.asarray(img.convert("L")))
  return np.asarray(img.convert("RGB"), dtype=np.uint8)  # L, P, CMYK, YCbCr, LAB, HSV


def decode_image(data: ImageInput, draft_size: Optional[int] = None) -> np.ndarray:
  """File path, encoded bytes, PIL image or array -> uint8 H x W x 3.

  Applies the EXIF orientation. Raises (OSError, ValueError, ...) for unreadable data; the
  sources turn that into a skipped record.
  """
  if isinstance(data, np.ndarray):
    return array_to_rgb(data)
  PIL = _pil()
  if isinstance(data, PIL.Image.Image):
    return pil_to_rgb(data)
  fobj = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
  with PIL.Image.open(fobj) as img:
    if draft_size and img.format == "JPEG":  # decode a large JPEG at a reduced scale
      img.draft("RGB", (draft_size, draft_size))
    img.load()
    try:
      oriented = PIL.ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF: keep the pixels as stored  # noqa: BLE001
      oriented = img
    return pil_to_rgb(oriented)


def fit_image(rgb_HxWx3: np.ndarray, size: int, mode: str = "crop",
              fill: int = 0) -> np.ndarray:
  """uint8 H x W x 3 -> uint8 size x size x 3.

  crop:    scale the shorter side to `size` (bicubic; box-filtered when shrinking a lot), then
           take the centre square (CLIP's evaluation transform);
  pad:     centre the image on a size x size canvas of grey level `fill` (shrinking it first,
           keeping its aspect ratio, only if it does not fit);
  stretch: resize to size x size ignoring the aspect ratio;
  keep:    unchanged (a later augmentation crops and resizes it).
  """
  if mode not in FIT_MODES:
    raise ValueError(f"unknown fit mode {mode!r}; choose one of {FIT_MODES}")
  if size < 1:
    raise ValueError(f"image size must be >= 1, got {size}")
  h, w = rgb_HxWx3.shape[:2]
  if mode == "keep" or (h, w) == (size, size):
    return np.ascontiguousarray(rgb_HxWx3, dtype=np.uint8)
  PIL = _pil()
  img = PIL.Image.fromarray(np.ascontiguousarray(rgb_HxWx3, dtype=np.uint8))
  bicubic = PIL.Image.Resampling.BICUBIC
  if mode == "stretch":
    return np.asarray(img.resize((size, size), bicubic, reducing_gap=3.0))
  if mode == "pad":
    if h > size or w > size:
      s = size / max(h, w)
      nh, nw = max(1, round(h * s)), max(1, round(w * s))
      img = img.resize((nw, nh), bicubic, reducing_gap=3.0)
      h, w = nh, nw
    out = np.full((size, size, 3), fill, np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top:top + h, left:left + w] = np.asarray(img)
    return out
  s = size / min(h, w)
  nh, nw = max(size, round(h * s)), max(size, round(w * s))
  img = img.resize((nw, nh), bicubic, reducing_gap=3.0)
  top, left = (nh - size) // 2, (nw - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)))


def clean_caption(caption) -> str:
  """Caption as a stripped str ('' for None, NaN or non-text values)."""
  if isinstance(caption, bytes):
    caption = caption.decode("utf-8", "replace")
  if not isinstance(caption, str):
    return ""
  return " ".join(caption.split())


# ---------------------------------------------------------------------------------------------
# Helpers for consumers of sources


def skip_none(source, indices: Sequence[int]) -> list[dict]:
  """The usable records among `indices` (Nones dropped)."""
  out = []
  for i in indices:
    r = source[i]
    if r is not None:
      out.append(r)
  return out


def first_records(source, n: int) -> list[dict]:
  """The first `n` usable records of a source, in order (skipping Nones)."""
  out = []
  for i in range(len(source)):
    if len(out) >= n:
      break
    r = source[i]
    if r is not None:
      out.append(r)
  return out


class Prefix:
  """A view of the first records of a source (what `pipeline.eval_task` reads)."""

  def __init__(self, records, like):
    self._records = records
    self.class_names = tuple(getattr(like, "class_names", ()))
    self.templates = tuple(getattr(like, "templates", ()))
    self.prompts = tuple(getattr(like, "prompts", ()))

  def __len__(self):
    return len(self._records)

  def __getitem__(self, i):
    return self._records[i]
