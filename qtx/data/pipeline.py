"""Input pipeline: random-access sources -> grain -> per-host uint8 batches.

A *source* is a random-access sequence of records {'image': uint8 HxWxC, 'caption': str,
optional 'label': int}. `make_source(config, split)` picks it by `config.data.name`; sources
register themselves with `register_source`. Images stay uint8 until they are on device.

An *eval task* bundles a held-out set for zero-shot classification (class names + prompt
templates) and image<->text retrieval.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import grain
import numpy as np

from qtx.data import augment as augment_lib
from qtx.data import sources
from qtx.data import tokenizer as tokenizer_lib
from qtx.data.registry import make_source, register_source  # noqa: F401 (public here too)

@dataclasses.dataclass
class Encode(grain.transforms.Map):
  """Record -> {'image': uint8 HxWxC, 'tokens': int32 [context_length]}."""
  context_length: int
  image_size: int
  channels: int = 3

  def map(self, record):
    image = np.asarray(record["image"])
    if image.shape != (self.image_size, self.image_size, self.channels) or image.dtype != np.uint8:
      raise ValueError(
          f"data source gave an image of shape {image.shape} and dtype {image.dtype}; the "
          f"model expects uint8 ({self.image_size}, {self.image_size}, {self.channels})")
    tokens = tokenizer_lib.tokenize([record["caption"]], self.context_length)[0]
    return {"image": image, "tokens": tokens.astype(np.int32)}


class RandomResizedCrop(grain.transforms.RandomMap):
  """data.augment='random_resized_crop' as a grain transform: the crop's rng is the one grain
  derives from the run's seed and the sample's position (qtx.data.augment)."""

  def __init__(self, size: int, scale=(0.9, 1.0)):
    self.size, self.scale = int(size), tuple(scale)

  def random_map(self, record, rng: np.random.Generator):
    return {**record, "image": augment_lib.random_resized_crop(record["image"], self.size, rng,
                                                               self.scale)}


def train_dataset(config, process_index: int = 0, process_count: int = 1,
                  source=None) -> grain.IterDataset:
  """Per-host batches of the training split; each host reads a disjoint 1/process_count slice."""
  global_batch = config.train.batch_size
  if global_batch % process_count:
    raise ValueError(f"train.batch_size {global_batch} is not divisible by the number of "
                     f"processes {process_count}")
  src = source if source is not None else make_source(config, "train")
  aug = config.data.augment
  scale = augment_lib.check(aug, config.data.augment_scale)
  if aug != "none":
    if not hasattr(src, "fit"):
      raise ValueError(f"data.augment={aug!r} needs a source that decodes images itself "
                       f"(folder, webdataset); data.name={config.data.name!r} does not")
    src.fit = "keep"  # decoded as is; the crop below makes it image_size x image_size
  ds = grain.MapDataset.source(src)
  if len(src) < 2**30:  # finite sources: reshuffle every epoch and repeat forever
    ds = ds.shuffle(seed=config.seed).repeat()
  ds = ds[process_index::process_count]
  # Sources return None for a record they cannot decode (counted in sources.SKIPPED).
  ds = ds.filter(lambda r: r is not None)
  if aug == "random_resized_crop":
    ds = ds.random_map(RandomResizedCrop(config.model.image.image_size, scale),
                       seed=config.seed)
  ds = ds.map(Encode(config.model.text.context_length, config.model.image.image_size,
                     config.model.image.channels))
  workers = int(config.data.num_workers)
  if workers < 0:
    raise ValueError(f"data.num_workers must be >= 0, got {workers}")
  opts = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(1, config.data.prefetch))
  ds = ds.to_iter_dataset(opts)
  # A source whose records are mostly bad raises instead of looping forever.
  ds = grain.experimental.WithOptionsIterDataset(
      ds, grain.experimental.DatasetOptions(filter_raise_threshold_ratio=0.5))
  ds = ds.batch(global_batch // process_count, drop_remainder=True)
  if workers:
    # Decoding and augmentation in `workers` processes, each running the pipeline above on its
    # share of the samples: deterministic and checkpointable (the position includes every
    # worker's), though its batches differ from those of 0 workers.
    # Bad records are counted in the worker that reads them; each batch carries its worker's
    # new ones to this process, where data/skipped is read.
    ds = ds.map(sources.SkipReport())
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    ds = ds.map(sources.absorb_skips)
  return ds


@dataclasses.dataclass
class EvalTask:
  """Held-out images with their captions (retrieval) and labels (zero-shot)."""
  name: str
  images: np.ndarray  # N x H x W x C uint8
  tokens: np.ndarray  # N x T int32 (captions, for retrieval)
  labels: Optional[np.ndarray]  # N int32 (zero-shot), or None
  class_names: Sequence[str] = ()
  templates: Sequence[str] = ()
  prompts: Sequence[Sequence[str]] = ()  # C x M ready-made prompts (overrides templates)
  # M: the image each caption belongs to, for several captions per image (COCO / Flickr30k
  # style: tokens is then M x T); None means caption i belongs to image i.
  caption_image: Optional[np.ndarray] = None
  # words of the captions that say nothing about the image (a source's `filler_words`, e.g.
  # data.synthetic.filler); attention statistics report their queries apart
  filler_words: Sequence[str] = ()

  def prompt_tokens(self, context_length: int) -> np.ndarray:
    """C x M x T tokens: every class name in every template."""
    return prompt_tokens(self.class_names, self.templates, self.prompts, context_length)

  def filler_token_ids(self) -> tuple[int, ...]:
    """The token id of each filler word (each must be one token)."""
    ids = []
    for w in self.filler_words:
      toks = tokenizer_lib.tokenize([w], 4)[0]
      if np.count_nonzero(toks) != 3:  # start, the word, end
        raise ValueError(f"filler word {w!r} is not one token")
      ids.append(int(toks[1]))
    return tuple(ids)


def prompt_tokens(class_names, templates, prompts, context_length: int) -> np.ndarray:
  """C x M x T tokens of the zero-shot prompts: `prompts` (C x M) when given, else every class
  name in every template."""
  prompts = prompts or [[t.format(c) for t in templates] for c in class_names]
  if len({len(row) for row in prompts}) != 1:
    raise ValueError("every class needs the same number of prompts")
  flat = tokenizer_lib.tokenize([p for row in prompts for p in row], context_length)
  return flat.reshape(len(prompts), len(prompts[0]), context_length)


@dataclasses.dataclass
class ClassificationStream:
  """A zero-shot classification split read record by record (never held in memory whole): the
  source, its class names and prompt templates, and how to encode a record."""
  name: str
  source: Any
  class_names: Sequence[str]
  templates: Sequence[str]
  encode: "Encode"
  num_samples: Optional[int] = None  # None: the whole split

  def batches(self, batch_size: int):
    """(images B x H x W x C uint8, labels B) over the split in order; unreadable records are
    skipped (and counted by the source)."""
    n = len(self.source) if self.num_samples is None else min(self.num_samples, len(self.source))
    imgs, labels = [], []
    for i in range(n):
      r = self.source[i]
      if r is None:
        continue
      imgs.append(self.encode.map(r)["image"])
      labels.append(int(r["label"]))
      if len(imgs) == batch_size:
        yield np.stack(imgs), np.asarray(labels, np.int32)
        imgs, labels = [], []
    if imgs:
      yield np.stack(imgs), np.asarray(labels, np.int32)

  def prompt_tokens(self, context_length: int) -> np.ndarray:
    return prompt_tokens(self.class_names, self.templates, (), context_length)


def eval_task(config, num_samples: Optional[int] = None, source=None) -> EvalTask:
  """The eval split as an in-memory EvalTask (first `num_samples` records)."""
  src = source if source is not None else make_source(config, "eval")
  n = min(len(src), num_samples or config.eval.num_samples)
  recs = sources.first_records(src, n)  # skips records the source could not decode
  if not recs:
    raise ValueError(f"the eval split of data.name={config.data.name!r} has no readable records")
  enc = Encode(config.model.text.context_length, config.model.image.image_size,
               config.model.image.channels)
  images = np.stack([enc.map(r)["image"] for r in recs])
  # several captions per image (r["captions"]): every one is a retrieval query/target
  caps = [list(r.get("captions") or [r["caption"]]) for r in recs]
  caption_image = None
  if any(len(c) > 1 for c in caps):
    caption_image = np.repeat(np.arange(len(recs)), [len(c) for c in caps]).astype(np.int64)
  tokens = tokenizer_lib.tokenize([c for cs in caps for c in cs],
                                  config.model.text.context_length).astype(np.int32)
  labels = None
  if all("label" in r for r in recs):
    labels = np.asarray([r["label"] for r in recs], np.int32)
  return EvalTask(name=config.data.name, images=images, tokens=tokens, labels=labels,
                  caption_image=caption_image,
                  class_names=tuple(getattr(src, "class_names", ())),
                  templates=tuple(getattr(src, "templates", ())),
                  prompts=tuple(tuple(p) for p in getattr(src, "prompts", ())),
                  filler_words=tuple(getattr(src, "filler_words", ())))


# Sources evaluated as whole classification splits, streamed (never held in memory whole):
# imagefolder, and a TFDS dataset with class labels (e.g. tfds:imagenet2012).
STREAMED_CLASSIFICATION = ("imagefolder", "tfds:")


def is_streamed_classification(name: str) -> bool:
  return any(name == k or (k.endswith(":") and name.startswith(k))
             for k in STREAMED_CLASSIFICATION)


def make_classification_stream(config, name: str, path: Optional[str] = None,
                               num_samples: Optional[int] = None):
  """A `ClassificationStream` over the whole split of a classification source, or None
  when the source has no class labels (a captioned set: evaluate it with make_eval_task)."""
  cfg = config.copy_and_resolve_references()
  cfg.data.name = name
  if path is not None:
    cfg.data.path = path
  src = make_source(cfg, "eval")
  if not getattr(src, "class_names", ()):
    return None
  enc = Encode(cfg.model.text.context_length, cfg.model.image.image_size,
                        cfg.model.image.channels)
  return ClassificationStream(name, src, tuple(src.class_names), tuple(src.templates),
                                       enc, num_samples)


def make_eval_task(config, name: Optional[str] = None, path: Optional[str] = None,
                   num_samples: Optional[int] = None, split: str = "eval"):
  """An EvalTask (zero-shot + retrieval) from any registered data source, independent of the
  training data: e.g. make_eval_task(config, 'fashion_mnist') or (config, 'tfds:cifar10',
  path=tfds_data_dir). Bad records are skipped (and counted)."""
  cfg = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") \
      else config
  if name is not None:
    cfg.data.name = name
  if path is not None:
    cfg.data.path = path
  src = make_source(cfg, split)
  n = num_samples or cfg.eval.num_samples
  recs = sources.first_records(src, n)
  if not recs:
    raise ValueError(f"data source {cfg.data.name!r} ({split}) has no usable records")
  task = eval_task(cfg, num_samples=len(recs), source=sources.Prefix(recs, src))
  task.name = cfg.data.name
  return task
