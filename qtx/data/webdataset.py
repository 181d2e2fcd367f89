"""`webdataset` source: image-text pairs in tar shards, as img2dataset writes them.

  data.name = webdataset
  data.path = /data/cc3m/{00000..00331}.tar     a brace pattern (ranges keep zero padding,
                                                {a,b,c} lists), or
            = /data/cc3m/                       a directory of .tar shards, or
            = /data/cc3m/shards.txt             a text file listing shard paths, one per line
  data.eval_path = (optional) held-out shards in the same forms

Paths may be local or remote (`gs://...`: read through etils.epath, which needs
`pip install gcsfs` for buckets). A shard holds members `KEY.<ext>`; members with the same KEY
(the member path up to the first dot of its file name) form one sample: the image
(`jpg`, `jpeg`, `png` or `webp`), the caption (`txt`) and optionally `json` metadata.

Design: a random-access index over shard members. At start every process reads the tar headers
of all shards (512 bytes per member; the data is skipped) into (shard, offset, size) entries, so
the source is an ordinary random-access sequence and the grain pipeline gives it everything the
other sources have: a global shuffle that mixes samples of all shards (reshuffled every
epoch), multiple epochs, every process reading a disjoint 1/N of each epoch, and an iterator
position saved with the checkpoint, so a run killed anywhere resumes at the exact next sample.
(A streaming reader with a shuffle buffer mixes only nearby samples and needs its buffer in the
checkpoint to resume exactly; random access costs one seek per sample, cheap on local disks and
NFS, a ranged read per sample on a bucket.)

Bad data never crashes a run; it is skipped and counted (`data/skipped`, first offenders
logged): a missing or unreadable shard, a truncated tar (the samples before the break are
kept), a stray member without a sample key, a sample without an image or without a caption
(found while indexing), and at read time a corrupt image or an empty caption. A dataset that is
mostly bad stops with an error naming it.

Several captions per image (COCO / Flickr30k-style eval sets): a `KEY.json` with a
"captions" list gives every caption to retrieval in the eval split.

Splits: `train` reads data.path; `eval` reads data.eval_path when set, else a deterministic
2% of data.path's samples held out by a hash of their key (and excluded from `train`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from typing import Optional

from qtx.data import registry, sources
from qtx.data.folder import DEFAULT_EVAL_FRACTION, split_hash

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
  """'/d/{00000..00002}.tar' -> ['/d/00000.tar', '/d/00001.tar', '/d/00002.tar']; '{a,b}'
  lists; several groups multiply. Ranges keep the width of their zero-padded bounds."""
  m = _BRACE.search(pattern)
  if not m:
    return [pattern]
  body = m.group(1)
  rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if rng:
    lo, hi = rng.group(1), rng.group(2)
    if int(hi) < int(lo):
      raise ValueError(f"brace range {{{body}}} in {pattern!r} runs backwards")
    width = len(lo) if lo.startswith("0") else 0
    options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
  elif "," in body:
    options = body.split(",")
  else:
    raise ValueError(f"cannot expand {{{body}}} in {pattern!r}: use {{000..123}} or {{a,b}}")
  head, tail = pattern[:m.start()], pattern[m.end():]
  return [p for o in options for p in expand_braces(head + o + tail)]


def _path(p: str):
  from etils import epath
  return epath.Path(p)


def _open(path: str, attempts: int = 3):
  """A binary file object for ranged reads. Remote paths go through fsspec without its
  read-ahead cache (a default block cache would fetch megabytes around every small read);
  opening is retried, so a transient failure does not drop a shard."""
  import time
  for attempt in range(attempts):
    try:
      if "://" in path:
        import fsspec
        fs, p = fsspec.core.url_to_fs(path)
        return fs.open(p, "rb", cache_type="none")
      return open(path, "rb")
    except FileNotFoundError:
      raise
    except Exception:  # noqa: BLE001 - remote hiccups: retry, then let the caller count it
      if attempt == attempts - 1:
        raise
      time.sleep(0.5 * 2 ** attempt)


def shard_paths(spec: str) -> list[str]:
  """Shard paths from a brace pattern, a directory of .tar files or a list file."""
  spec = spec.strip()
  if not spec:
    raise ValueError("data.name=webdataset needs data.path: a brace pattern "
                     "(/data/cc3m/{00000..00331}.tar), a directory of .tar shards or a text "
                     "file listing them")
  if "{" in spec:
    return expand_braces(spec)
  p = _path(spec)
  if p.is_dir():
    shards = sorted(str(q) for q in p.iterdir() if q.name.endswith(".tar"))
    if not shards:
      raise ValueError(f"data.path {spec!r} is a directory without .tar shards")
    return shards
  if spec.endswith(".tar"):
    return [spec]
  if p.exists():
    base = os.path.dirname(spec)
    lines = [ln.strip() for ln in p.read_text().splitlines()]
    out = [ln if (os.path.isabs(ln) or "://" in ln) else os.path.join(base, ln)
           for ln in lines if ln and not ln.startswith("#")]
    if not out:
      raise ValueError(f"shard list {spec!r} names no shards")
    return out
  raise FileNotFoundError(f"data.path {spec!r}: no such shard, directory or list file")


def split_key(name: str) -> tuple[Optional[str], str]:
  """(sample key, extension) of a member name; key None for a member without one."""
  d, base = os.path.split(name)
  if "." not in base or base.startswith("."):
    return None, ""
  stem, ext = base.split(".", 1)
  if not stem:
    return None, ""
  return (f"{d}/{stem}" if d else stem), ext.lower()


def index_shard(path: str, counter: sources.SkipCounter) -> list[dict]:
  """[{key, image: (offset, size, ext), txt: (offset, size), json?}] of one shard, in order.

  Reads only the tar headers. A missing/unreadable shard gives [] (counted); a truncated one
  gives the samples whose members are complete."""
  try:
    f = _open(path)
  except Exception as e:  # noqa: BLE001 - any failure to open marks only this shard bad
    counter.record(path, f"missing or unreadable shard: {type(e).__name__}: {e}")
    return []
  samples: dict[str, dict] = {}
  order: list[str] = []
  with f:
    try:
      f.seek(0, 2)
      file_size = f.tell()
      f.seek(0)
    except Exception:  # noqa: BLE001 - not seekable: no truncation check
      file_size = None
    try:
      with tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
          if not m.isfile():
            continue
          key, ext = split_key(m.name)
          if key is None:
            counter.record(f"{path}:{m.name}", "stray member without a sample key")
            continue
          if file_size is not None and m.offset_data + m.size > file_size:
            counter.record(f"{path}:{m.name}", "truncated member")
            continue
          if key not in samples:
            samples[key] = {"key": key}
            order.append(key)
          samples[key][ext] = (m.offset_data, m.size)
    except (tarfile.TarError, EOFError, OSError) as e:
      counter.record(path, f"truncated or corrupt tar: {type(e).__name__}: {e}")
  out = []
  for key in order:
    s = samples[key]
    image_ext = next((e for e in IMAGE_EXTS if e in s), None)
    where = f"{path}:{key}"
    if image_ext is None:
      counter.record(where, "sample without an image")
      continue
    if CAPTION_EXT not in s:
      counter.record(where, "sample without a caption")
      continue
    out.append({"key": key, "image": s[image_ext], "txt": s[CAPTION_EXT],
                "json": s.get("json")})
  return out


class WebDatasetSource:
  """Random-access records {'image', 'caption'} over tar shards (see the module docstring)."""

  def __init__(self, spec: str, split: str, image_size: int, fit: str = "crop",
               held_out: bool = True, eval_fraction: float = DEFAULT_EVAL_FRACTION,
               counter: Optional[sources.SkipCounter] = None):
    self.spec, self.split, self.image_size, self.fit = spec, split, int(image_size), fit
    self.counter = counter or sources.SkipCounter(f"webdataset:{split}", parent=sources.SKIPPED)
    self.shards = shard_paths(spec)
    entries = []
    for si, shard in enumerate(self.shards):
      for s in index_shard(shard, self.counter):
        entries.append((si, s))
    if held_out:  # hold out a hash-chosen eval part of one shard set (at least one sample)
      h = [split_hash(f"{os.path.basename(self.shards[si])}:{s['key']}") for si, s in entries]
      is_eval = [x < eval_fraction for x in h]
      if len(entries) > 1 and not any(is_eval):
        is_eval[min(range(len(h)), key=h.__getitem__)] = True
      want_eval = split == "eval"
      entries = [e for e, ev in zip(entries, is_eval) if ev == want_eval]
    if not entries:
      raise ValueError(f"webdataset {spec!r} ({split}): no usable samples in "
                       f"{len(self.shards)} shard(s); skipped: {self.counter.reasons}")
    self._entries = entries

  def __len__(self) -> int:
    return len(self._entries)

  def fingerprint(self) -> str:
    """A hash of the index (each sample's shard file name, key and member offsets and sizes,
    in order): what the checkpointed position and the per-process split mean. Processes of one
    run must agree on it, and a resumed run must find the one it started with. Shard file
    names, not full paths, so hosts may mount the shards at different places."""
    h = hashlib.sha256(f"{self.split}:{len(self._entries)}".encode())
    for si, s in self._entries:
      members = tuple(s.get(k) for k in ("image", "txt", "json"))
      h.update(f"|{os.path.basename(self.shards[si])}:{s['key']}:{members}".encode())
    return h.hexdigest()[:16]

  def describe(self) -> str:
    """One line for messages: how many samples in how many shards."""
    return f"{len(self)} {self.split} samples in {len(self.shards)} shard(s) of {self.spec!r}"

  def _read(self, shard: str, where: tuple[int, int]) -> bytes:
    offset, size = where
    with _open(shard) as f:
      f.seek(offset)
      data = f.read(size)
    if len(data) != size:
      raise OSError(f"read {len(data)} of {size} bytes")
    return data

  def metadata(self, idx: int) -> dict:
    """The sample's json member (img2dataset writes url, width, height, ...), or {}."""
    si, s = self._entries[int(idx) % len(self)]
    return {} if s.get("json") is None else json.loads(self._read(self.shards[si], s["json"]))

  def key(self, idx: int) -> str:
    si, s = self._entries[int(idx) % len(self)]
    return f"{self.shards[si]}:{s['key']}"

  def __getitem__(self, idx):
    idx = int(idx) % len(self)
    si, s = self._entries[idx]
    shard = self.shards[si]
    where = self.key(idx)
    try:
      caption = sources.clean_caption(self._read(shard, s["txt"]).decode("utf-8", "replace"))
    except Exception as e:  # noqa: BLE001
      self.counter.record(where, f"unreadable caption: {type(e).__name__}: {e}")
      return None
    if not caption:
      self.counter.record(where, "empty caption")
      return None
    try:
      rgb = sources.decode_image(self._read(shard, s["image"]), draft_size=self.image_size)
      image = sources.fit_image(rgb, self.image_size, self.fit)
    except Exception as e:  # noqa: BLE001 - any decoder failure marks only this sample bad
      self.counter.record(where, f"unreadable image: {type(e).__name__}: {e}")
      return None
    rec = {"image": image, "caption": caption}
    if self.split == "eval":  # COCO-style eval sets: a json "captions" list
      try:
        caps = self.metadata(idx).get("captions")
      except Exception:  # noqa: BLE001 - metadata is optional
        caps = None
      if isinstance(caps, list):
        caps = [x for x in (sources.clean_caption(v) for v in caps) if x]
        if caps:
          rec["captions"] = caps
    return rec


def _webdataset_factory(config, split):
  eval_path = config.data.eval_path
  if split == "eval" and eval_path:
    return WebDatasetSource(eval_path, "eval", config.model.image.image_size,
                                       held_out=False)
  return WebDatasetSource(config.data.path, split, config.model.image.image_size,
                                     held_out=not eval_path)


registry.register_source("webdataset", _webdataset_factory)
