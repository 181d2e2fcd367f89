"""Data sources: image decoding, bad-record skipping, folder / Fashion-MNIST / TFDS sources."""
import gzip
import io
import json
import logging as pylogging
import os
import threading

import grain
import numpy as np
import PIL.Image
import pytest

from qtx.data import fashion_mnist, folder, pipeline, sources, templates
from qtx import evaluate as evaluate_lib
from conftest import micro_config

S = 16  # image size of the micro config


def _png(a, **kw):
  b = io.BytesIO()
  PIL.Image.fromarray(a).save(b, format="PNG", **kw)
  return b.getvalue()


# ---------------------------------------------------------------------------------------------
# Templates


def test_templates_sets_are_valid_and_distinct():
  for name in templates.TEMPLATE_SETS:
    ts = templates.get(name)
    assert templates.check_templates(ts) == ts
    assert len(set(ts)) == len(ts)
  assert 10 <= len(templates.PHOTO_TEMPLATES) <= 20
  assert templates.for_dataset("fashion_mnist") == templates.GRAYSCALE_TEMPLATES
  assert templates.for_dataset("fashion_mnist:pad") == templates.GRAYSCALE_TEMPLATES
  assert templates.for_dataset("tfds:mnist/3.0.1") == templates.GRAYSCALE_TEMPLATES
  assert templates.for_dataset("tfds:cifar10") == templates.PHOTO_TEMPLATES
  with pytest.raises(ValueError, match="unknown template set 'fotos'.*photo"):
    templates.get("fotos")
  for bad in ([], ["no slot"], ["{} and {}"], ["a {0}"]):
    with pytest.raises(ValueError):
      templates.check_templates(bad)


def test_openai_imagenet_protocol_data():
  """The 1000 curated class names (ImageNet-1k index order) and the 80 templates, shipped with
  their licence notice; spot checks at known indices of the standard list."""
  names, ts = templates.IMAGENET_CLASSNAMES, templates.OPENAI_IMAGENET_TEMPLATES
  assert len(names) == 1000 and len(ts) == 80 and len(set(ts)) == 80
  assert len(set(names)) == 999  # the original list names classes 657 and 744 both 'missile'
  assert [i for i, n in enumerate(names) if n == "missile"] == [657, 744]
  assert (names[0], names[1], names[207], names[281], names[409], names[999]) == (
      "tench", "goldfish", "Golden Retriever", "tabby cat", "analog clock", "toilet paper")
  assert all(n == n.strip() and n for n in names)
  assert templates.check_templates(ts) == ts
  assert ts[0] == "a bad photo of a {}." and ts[-1] == "a tattoo of the {}."
  assert templates.get("openai_imagenet") == ts
  # tfds:imagenet2012 (labels are the sorted WordNet ids) gets the same names and templates
  from qtx.data import tfds_source
  wnids = [f"n{10000000 + i:08d}" for i in range(1000)]
  assert tfds_source.default_class_names("imagenet2012", wnids) == names
  assert templates.for_dataset("tfds:imagenet2012/5.1.0") == ts
  assert templates.for_dataset("tfds:imagenet_v2") == ts
  import os
  import qtx.data
  lic = open(os.path.join(os.path.dirname(qtx.data.__file__),
                          "LICENSE_openai_imagenet_prompts.txt")).read()
  assert "MIT License" in lic and "Copyright (c) 2021 OpenAI" in lic


def test_caption_choice_is_deterministic_and_spread():
  ts = templates.PHOTO_TEMPLATES
  a = [templates.caption("cat", ts, seed=0, index=i) for i in range(400)]
  assert a == [templates.caption("cat", ts, seed=0, index=i) for i in range(400)]
  assert a != [templates.caption("cat", ts, seed=1, index=i) for i in range(400)]
  assert set(a) == {t.format("cat") for t in ts}  # every template is used
  assert templates.clean_class_name(b"apple_pie ") == "apple pie"


# ---------------------------------------------------------------------------------------------
# Decoding


def test_array_to_rgb_exact_conversions():
  g = np.arange(12, dtype=np.uint8).reshape(3, 4)
  np.testing.assert_array_equal(sources.array_to_rgb(g), np.repeat(g[..., None], 3, -1))
  np.testing.assert_array_equal(sources.array_to_rgb(g[..., None]), np.repeat(g[..., None], 3, -1))
  g16 = (np.arange(12).reshape(3, 4) * 257 * 20).astype(np.uint16)  # k * 257 -> k exactly
  np.testing.assert_array_equal(sources.array_to_rgb(g16)[..., 0], np.arange(12).reshape(3, 4) * 20)
  rgba = np.zeros((1, 3, 4), np.uint8)
  rgba[0, 0] = (10, 20, 30, 0)  # transparent -> white
  rgba[0, 1] = (10, 20, 30, 255)  # opaque -> itself
  rgba[0, 2] = (0, 0, 0, 51)  # 20% black over white -> 204
  np.testing.assert_array_equal(sources.array_to_rgb(rgba)[0],
                                [[255, 255, 255], [10, 20, 30], [204, 204, 204]])
  f = np.array([[0.0, 0.5, 1.0, np.nan]], np.float32)
  np.testing.assert_array_equal(sources.array_to_rgb(f)[0, :, 0], [0, 128, 255, 0])
  with pytest.raises(ValueError, match="shape"):
    sources.array_to_rgb(np.zeros((2, 2, 5), np.uint8))


def test_decode_image_modes():
  cmyk = PIL.Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
  b = io.BytesIO()
  cmyk.save(b, format="TIFF")
  np.testing.assert_array_equal(sources.decode_image(b.getvalue())[0, 0], [255, 0, 0])
  pal = PIL.Image.new("P", (2, 2))
  pal.putpalette([0, 0, 0, 9, 99, 199] + [0] * 762)
  pal.putpixel((1, 0), 1)
  out = sources.decode_image(_png_from(pal))
  np.testing.assert_array_equal(out[0], [[0, 0, 0], [9, 99, 199]])
  one = PIL.Image.new("1", (2, 1))
  one.putpixel((1, 0), 1)
  np.testing.assert_array_equal(sources.decode_image(_png_from(one))[0, :, 0], [0, 255])
  with pytest.raises(PIL.UnidentifiedImageError):
    sources.decode_image(b"definitely not an image")


def _png_from(img):
  b = io.BytesIO()
  img.save(b, format="PNG")
  return b.getvalue()


def test_fit_image_crop_pad_stretch():
  a = np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3)
  # Shorter side already 4: no resampling, the centre 4 columns.
  np.testing.assert_array_equal(sources.fit_image(a, 4, "crop"), a[:, 2:6])
  p = sources.fit_image(a, 10, "pad", fill=7)
  np.testing.assert_array_equal(p[3:7, 1:9], a)
  assert (p[:3] == 7).all() and (p[7:] == 7).all() and (p[:, 0] == 7).all()
  assert sources.fit_image(a, 6, "stretch").shape == (6, 6, 3)
  big = np.full((40, 20, 3), 90, np.uint8)
  out = sources.fit_image(big, S, "crop")
  assert out.shape == (S, S, 3) and out.dtype == np.uint8 and (out == 90).all()
  with pytest.raises(ValueError, match="unknown fit mode 'zoom'"):
    sources.fit_image(a, 4, "zoom")


# ---------------------------------------------------------------------------------------------
# SkipCounter


def test_skip_counter_threads_parent_and_logging(caplog):
  parent = sources.SkipCounter("parent")
  child = sources.SkipCounter("child", log_first=3, parent=parent)

  def work(t):
    for i in range(200):
      child.record(f"t{t}/img{i}.jpg", "missing file")
      child.record(f"t{t}/img{i}.jpg", "missing file")  # same record again (next epoch)

  with caplog.at_level(pylogging.WARNING):
    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
      th.start()
    for th in threads:
      th.join()
  assert child.count == 1600 and child.events == 3200
  assert parent.count == 1600 and parent.events == 3200
  assert child.metrics() == {"data/skipped": 1600}
  assert child.reasons == {"missing file": 1600}
  assert len(child.examples) == 3
  logged = [r for r in caplog.records if "child]: skipped t" in r.getMessage()]
  assert len(logged) == 3 and all("missing file" in r.getMessage() for r in logged)
  child.reset()
  assert child.count == 0 and child.examples == []


# ---------------------------------------------------------------------------------------------
# Folder source with every kind of bad record


def _make_folder(root):
  """Writes images and captions_train.jsonl; returns {name: expected outcome}."""
  os.makedirs(os.path.join(root, "img"), exist_ok=True)

  def put(name, data):
    with open(os.path.join(root, "img", name), "wb") as f:
      f.write(data)

  rgb = np.zeros((S, S, 3), np.uint8)
  rgb[:, :, 0] = 200
  put("rgb.png", _png(rgb))
  put("gray.png", _png(np.full((S, S), 77, np.uint8)))
  rgba = np.zeros((S, S, 4), np.uint8)
  rgba[:, S // 2:] = (0, 0, 255, 255)  # left half transparent
  put("rgba.png", _png(rgba))
  la = PIL.Image.new("LA", (S, S), (50, 255))
  put("la.png", _png_from(la))
  b = io.BytesIO()
  PIL.Image.new("CMYK", (S, S), (0, 255, 255, 0)).save(b, format="JPEG", quality=95)
  put("cmyk.jpg", b.getvalue())
  put("gray16.png", _png(np.full((S, S), 257 * 100, np.uint16)))
  pal = PIL.Image.new("P", (S, S), 1)
  pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
  put("palette.png", _png_from(pal))
  put("big.png", _png(np.full((40, 24, 3), 123, np.uint8)))
  rot = np.zeros((S, S), np.uint8)
  rot[:, S // 2:] = 255  # right half white, stored rotated by 180 degrees via EXIF
  exif = PIL.Image.Exif()
  exif[0x0112] = 3
  put("exif.png", _png_from_img(PIL.Image.fromarray(rot), exif=exif))
  rng = np.random.default_rng(0)
  put("corrupt.jpg", rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
  b = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(b, format="JPEG")
  put("truncated.jpg", b.getvalue()[:len(b.getvalue()) // 2])
  put("empty.png", b"")
  put("text.png", b"hello, I am not a PNG\n")
  rows = [
      ("img/rgb.png", "a red square", "ok"),
      ("img/gray.png", "a grey square", "ok"),
      ("img/rgba.png", "half blue", "ok"),
      ("img/la.png", "dark grey with alpha", "ok"),
      ("img/cmyk.jpg", "a red cmyk square", "ok"),
      ("img/gray16.png", "sixteen bit grey", "ok"),
      ("img/palette.png", "a palette image", "ok"),
      ("img/big.png", "a big image", "ok"),
      ("img/exif.png", "rotated", "ok"),
      ("img/corrupt.jpg", "random bytes", "unreadable image"),
      ("img/truncated.jpg", "half a jpeg", "unreadable image"),
      ("img/empty.png", "zero bytes", "unreadable image"),
      ("img/text.png", "a text file", "unreadable image"),
      ("img/missing.png", "not there", "missing file"),
      ("img/rgb.png", "", "empty caption"),
      ("img/gray.png", "   \n ", "empty caption"),
      ("img/gray.png", None, "empty caption"),
      ("img/rgb.png", ["", "first real caption", "second real caption"], "ok"),
  ]
  with open(os.path.join(root, "captions_train.jsonl"), "w") as f:
    for image, caption, _ in rows:
      f.write(json.dumps({"image": image, "caption": caption}) + "\n")
      if image == "img/missing.png":
        f.write("{this is not json\n")
        f.write(json.dumps({"caption": "no image key"}) + "\n")
        f.write("\n")
  return rows


def _png_from_img(img, **kw):
  b = io.BytesIO()
  img.save(b, format="PNG", **kw)
  return b.getvalue()


def test_folder_source_decodes_converts_and_skips(tmp_path):
  rows = _make_folder(str(tmp_path))
  before = sources.SKIPPED.count
  src = folder.FolderSource(str(tmp_path), "train", S)
  # Two bad caption-file lines are counted when the file is read.
  assert src.counter.count == 2 and src.counter.reasons == {"bad captions line": 2}
  assert len(src) == len(rows)
  recs = [src[i] for i in range(len(src))]
  for (image, _, outcome), rec in zip(rows, recs):
    if outcome == "ok":
      assert rec is not None, image
      assert rec["image"].shape == (S, S, 3) and rec["image"].dtype == np.uint8
      assert isinstance(rec["caption"], str) and rec["caption"]
    else:
      assert rec is None, image
  by = dict(zip([r[0] for r in rows[:9]], recs[:9]))
  assert (by["img/rgb.png"]["image"] == [200, 0, 0]).all()
  assert (by["img/gray.png"]["image"] == 77).all()
  np.testing.assert_array_equal(by["img/rgba.png"]["image"][:, :S // 2], 255)  # white
  np.testing.assert_array_equal(by["img/rgba.png"]["image"][:, S // 2:], np.broadcast_to(
      np.array([0, 0, 255], np.uint8), (S, S // 2, 3)))
  assert (by["img/la.png"]["image"] == 50).all()
  cm = by["img/cmyk.jpg"]["image"].astype(int)
  assert (cm[..., 0] > 240).all() and (cm[..., 1:] < 15).all()  # red, up to JPEG error
  assert (by["img/gray16.png"]["image"] == 100).all()  # 16-bit scaled, not wrapped
  assert (by["img/palette.png"]["image"] == [10, 200, 30]).all()
  assert (by["img/big.png"]["image"] == 123).all()
  ex = by["img/exif.png"]["image"][..., 0]
  assert (ex[:, :S // 2] == 255).all() and (ex[:, S // 2:] == 0).all()  # EXIF applied
  assert recs[-1]["caption"] in ("first real caption", "second real caption")
  # 4 unreadable + 1 missing + 3 empty captions + 2 bad lines, each logged at most once.
  assert src.counter.reasons == {"bad captions line": 2, "unreadable image": 4,
                                 "missing file": 1, "empty caption": 3}
  assert src.counter.count == 10
  assert sources.SKIPPED.count - before == 10
  # Reading again (a second epoch) does not count the same records twice.
  _ = [src[i] for i in range(len(src))]
  assert src.counter.count == 10 and src.counter.events == 18


def test_folder_pipeline_filters_bad_records(tmp_path):
  """The grain structure the training pipeline needs: filter Nones, encode, then batch."""
  rows = _make_folder(str(tmp_path))
  src = folder.FolderSource(str(tmp_path), "train", S)
  c = micro_config()
  n_ok = sum(r[2] == "ok" for r in rows)
  ds = (grain.MapDataset.source(src).repeat(2).filter(lambda r: r is not None)
        .map(pipeline.Encode(c.model.text.context_length, S))
        .to_iter_dataset(grain.ReadOptions(num_threads=2)).batch(n_ok, drop_remainder=True))
  batches = list(ds)
  assert len(batches) == 2
  for b in batches:
    assert b["image"].shape == (n_ok, S, S, 3) and b["tokens"].shape == (n_ok, 16)
    assert (b["tokens"][:, 0] == 49406).all()
  assert src.counter.count == 10


def test_folder_hash_split_csv_and_labels(tmp_path):
  root = str(tmp_path)
  img = _png(np.full((S, S, 3), 5, np.uint8))
  names = []
  with open(os.path.join(root, "captions.csv"), "w") as f:
    f.write("image,caption,label\n")
    for i in range(300):
      name = f"im{i:03d}.png"
      names.append(name)
      with open(os.path.join(root, name), "wb") as g:
        g.write(img)
      f.write(f'{name},"photo {i}, a thing",{"cat" if i % 3 else "dog_breed"}\n')
  train = folder.FolderSource(root, "train", S)
  ev = folder.FolderSource(root, "eval", S)
  tr_set, ev_set = set(train._images), set(ev._images)
  assert not tr_set & ev_set and tr_set | ev_set == set(names)
  expected_eval = {n for n in names if folder.split_hash(n) < folder.DEFAULT_EVAL_FRACTION}
  assert ev_set == expected_eval and 1 <= len(ev_set) <= 20
  assert train.class_names == ("cat", "dog breed")
  r = train[0]
  assert r["caption"].startswith("photo ") and r["caption"].endswith(", a thing")
  assert r["label"] == (0 if int(r["caption"].split()[1].rstrip(",")) % 3 else 1)
  # The pipeline's eval task reads the eval split, with labels for zero-shot.
  c = micro_config(**{"data.name": "folder", "data.path": root})
  task = pipeline.eval_task(c)
  assert task.images.shape == (len(ev_set), S, S, 3) and task.labels is not None
  assert task.class_names == ("cat", "dog breed") and len(task.templates) >= 10


def test_folder_small_list_gets_one_eval_record_and_split_files(tmp_path):
  root = str(tmp_path)
  with open(os.path.join(root, "a.png"), "wb") as f:
    f.write(_png(np.zeros((S, S, 3), np.uint8)))
  with open(os.path.join(root, "captions.jsonl"), "w") as f:
    for i in range(3):
      f.write(json.dumps({"image": "a.png" if i else "./a.png", "caption": f"c{i}"}) + "\n")
  assert len(folder.FolderSource(root, "eval", S)) == 1
  assert len(folder.FolderSource(root, "train", S)) == 2
  with open(os.path.join(root, "captions_eval.csv"), "w") as f:
    f.write("caption,image\nonly eval,a.png\n")
  ev = folder.FolderSource(root, "eval", S)
  assert len(ev) == 1 and ev[0]["caption"] == "only eval"
  assert len(folder.FolderSource(root, "train", S)) == 2  # train still hash-split


def test_folder_errors_name_the_problem(tmp_path):
  root = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="captions.jsonl"):
    folder.FolderSource(root, "train", S)
  with open(os.path.join(root, "captions.csv"), "w") as f:
    f.write("file,text\na.png,hello\n")
  with pytest.raises(ValueError, match="'image' and 'caption'.*\\['file', 'text'\\]"):
    folder.FolderSource(root, "train", S)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    folder.FolderSource(os.path.join(root, "nope"), "train", S)
  with pytest.raises(ValueError, match="unknown split 'test'"):
    folder.caption_file(root, "test")
  c = micro_config(**{"data.name": "folder"})
  with pytest.raises(ValueError, match="needs data.path"):
    pipeline.make_source(c, "train")


def test_make_eval_task_skips_bad_records(tmp_path):
  root = str(tmp_path)
  _make_folder(root)
  os.rename(os.path.join(root, "captions_train.jsonl"), os.path.join(root, "captions_eval.jsonl"))
  c = micro_config()
  task = pipeline.make_eval_task(c, "folder", path=root, num_samples=5)
  assert task.images.shape == (5, S, S, 3) and task.name == "folder"
  assert c.data.name == "synthetic"  # the run config is not modified
  task = pipeline.make_eval_task(c, "folder", path=root)
  assert task.images.shape[0] == 10  # every usable record


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


def _write_idx(path, arr, gz):
  header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
  data = header + arr.astype(np.uint8).tobytes()
  if gz:
    with gzip.open(path + ".gz", "wb") as f:
      f.write(data)
  else:
    with open(path, "wb") as f:
      f.write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_reader_on_generated_files(tmp_path, gz):
  d = str(tmp_path)
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
  labels = np.arange(12) % 10
  for split, (fi, fl) in fashion_mnist.FILES.items():
    _write_idx(os.path.join(d, fi), imgs, gz)
    _write_idx(os.path.join(d, fl), labels, gz)
  fashion_mnist.load_split.cache_clear()
  src = fashion_mnist.FashionMNIST("eval", 32, path=d, fit="pad")
  assert len(src) == 12
  r = src[3]
  np.testing.assert_array_equal(r["image"][2:30, 2:30], np.repeat(imgs[3][..., None], 3, -1))
  assert (r["image"][:2] == 0).all() and r["label"] == 3
  assert fashion_mnist.CLASS_NAMES[3] in r["caption"]
  crop = fashion_mnist.FashionMNIST("train", S, path=d)[3]["image"]
  assert crop.shape == (S, S, 3) and (crop[..., 0] == crop[..., 2]).all()
  bad = os.path.join(d, "bad-idx")
  with open(bad, "wb") as f:
    f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"abc")
  with pytest.raises(ValueError, match="says shape \\(5,\\)"):
    fashion_mnist.read_idx(bad)
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    fashion_mnist.load_split(str(tmp_path / "empty"), "train")
  with pytest.raises(ValueError, match="fit='pad' needs image_size >= 28"):
    fashion_mnist.FashionMNIST("train", S, path=d, fit="pad")
  fashion_mnist.load_split.cache_clear()


HAVE_FMNIST = os.path.isdir(fashion_mnist.DEFAULT_DIR)


@pytest.mark.skipif(not HAVE_FMNIST, reason=(
    "Fashion-MNIST idx files not found under /usr/share/datasets/fashion-mnist; install them "
    "with `apt-get install dataset-fashion-mnist`"))
def test_fashion_mnist_real_files():
  c = micro_config(**{"data.name": "fashion_mnist", "model.image.image_size": 32})
  train = pipeline.make_source(c, "train")
  ev = pipeline.make_source(c, "eval")
  assert (len(train), len(ev)) == (60000, 10000)
  # Published facts: 6000 / 1000 images per class, first labels 9 (ankle boot).
  np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ev.labels), [1000] * 10)
  assert train[0]["label"] == 9 and ev[0]["label"] == 9 and ev[1]["label"] == 2
  assert train[0]["caption"] in {t.format("ankle boot") for t in train.templates}
  assert train.class_names == fashion_mnist.CLASS_NAMES
  c.data.name = "fashion_mnist:pad"
  padded = pipeline.make_source(c, "eval")[0]["image"]
  np.testing.assert_array_equal(padded[2:30, 2:30, 1], ev.images[0])
  c.data.name = "fashion_mnist"
  task = pipeline.eval_task(c, num_samples=200)
  assert task.images.shape == (200, 32, 32, 3) and task.labels.shape == (200,)
  assert task.prompt_tokens(16).shape == (10, len(templates.GRAYSCALE_TEMPLATES), 16)
  c.data.name = "fashion_mnist:zoom"
  with pytest.raises(ValueError, match="unknown Fashion-MNIST fit 'zoom'"):
    pipeline.make_source(c, "train")


# ---------------------------------------------------------------------------------------------
# TFDS


tfds = pytest.importorskip("tensorflow_datasets")


def test_tfds_mock_classification_datasets():
  c = micro_config(**{"data.name": "tfds:fashion_mnist"})
  with tfds.testing.mock_data(num_examples=12):
    src = pipeline.make_source(c, "train")
    assert len(src) == 12 and src.class_names == fashion_mnist.CLASS_NAMES
    assert src.templates == templates.GRAYSCALE_TEMPLATES
    for i in range(len(src)):
      r = src[i]
      assert r["image"].shape == (S, S, 3) and r["image"].dtype == np.uint8
      # 28x28x1 grayscale: the three channels are identical after conversion and resizing.
      assert (r["image"][..., 0] == r["image"][..., 1]).all()
      assert r["caption"] in {t.format(src.class_names[r["label"]]) for t in src.templates}
    c.data.name = "tfds:cifar10?eval=test&templates=single"
    ev = pipeline.make_source(c, "eval")
    assert ev.tfds_split == "test" and ev.templates == templates.SINGLE_TEMPLATE
    task = pipeline.eval_task(c, num_samples=8)
    assert task.images.shape == (8, S, S, 3) and task.labels.shape == (8,)
    assert len(task.class_names) == 10


def test_tfds_spec_parsing_and_split_resolution():
  from qtx.data import tfds_source
  assert tfds_source.parse_spec("coco_captions/2017:1.1.0?eval=val") == (
      "coco_captions/2017:1.1.0", {"eval": "val"})
  assert tfds_source.base_name("coco_captions/2017:1.1.0") == "coco_captions"
  with pytest.raises(ValueError, match="unknown option.*'evall'"):
    tfds_source.parse_spec("cifar10?evall=test")
  assert tfds_source.resolve_split("eval", ["train", "test"], {}) == "test"
  assert tfds_source.resolve_split("eval", ["train", "validation", "test"], {}) == "validation"
  assert tfds_source.resolve_split("eval", ["train", "val"], {}) == "val"
  assert tfds_source.resolve_split("train", ["train"], {"train": "train[:90%]"}) == "train[:90%]"
  with pytest.raises(ValueError, match="no split among.*'extra'"):
    tfds_source.resolve_split("eval", ["train", "extra"], {})


class QtxTestCaptions(tfds.core.GeneratorBasedBuilder):
  """A tiny image-caption dataset written as array_record without TensorFlow (images are
  given as encoded bytes)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        "name": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples("train"), "val": self._generate_examples("val")}

  def _generate_examples(self, split):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 1] = 180
    yield "rgb", {"image": _png(rgb), "captions": {"text": ["green one", "green two"]},
                  "name": "rgb"}
    yield "gray", {"image": _png(np.full((S, S), 9, np.uint8)), "captions": {"text": ["grey"]},
                   "name": "gray"}
    yield "gray16", {"image": _png(np.full((S, S), 1000, np.uint16)),
                     "captions": {"text": ["deep"]}, "name": "gray16"}
    if split == "train":
      yield "corrupt", {"image": b"\x89PNG but not really", "captions": {"text": ["bad"]},
                        "name": "corrupt"}
      yield "nocap", {"image": _png(rgb), "captions": {"text": ["", " "]}, "name": "nocap"}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  QtxTestCaptions(data_dir=d, file_format="array_record").download_and_prepare()
  return d


def test_tfds_classification_zeroshot_is_streamed_over_the_whole_split(tfds_dir):
  """eval.zeroshot=tfds:<classification set>: the whole split, streamed, not eval.num_samples
  (which bounds only the training data's own eval split); a captioned TFDS set stays a
  retrieval task."""
  c = micro_config(**{"eval.zeroshot": "tfds:cifar10?eval=test", "eval.num_samples": 4})
  with tfds.testing.mock_data(num_examples=12):
    task = evaluate_lib.zeroshot_tasks(c)["tfds:cifar10?eval=test"]
    assert isinstance(task, pipeline.ClassificationStream) and len(task.class_names) == 10
    seen = sum(len(y) for _, y in task.batches(5))
    assert seen == 12
  c = micro_config(**{"eval.zeroshot": f"tfds:qtx_test_captions@{tfds_dir}"})
  task = evaluate_lib.zeroshot_tasks(c)["tfds:qtx_test_captions"]
  assert isinstance(task, pipeline.EvalTask)


def test_tfds_array_record_captions_and_bad_records(tfds_dir):
  c = micro_config(**{"data.name": "tfds:qtx_test_captions", "data.path": tfds_dir})
  src = pipeline.make_source(c, "train")
  assert len(src) == 5 and src.class_names == ()
  by = {}
  for i in range(len(src)):
    name = src._ds[i]["name"].decode()
    by[name] = src[i]
  assert by["corrupt"] is None and by["nocap"] is None
  assert src.counter.reasons == {"unreadable image": 1, "empty caption": 1}
  assert by["rgb"]["caption"] in ("green one", "green two")
  assert (by["rgb"]["image"] == [0, 180, 0]).all()  # 20x30 -> crop 16x16 of a flat image
  assert (by["gray"]["image"] == 9).all()
  assert (by["gray16"]["image"] == round(1000 * 255 / 65535)).all()  # scaled, not wrapped
  ev = pipeline.make_source(c, "eval")
  assert ev.tfds_split == "val" and len(ev) == 3
  caps = sorted(ev[i]["caption"] for i in range(3))
  assert caps == ["deep", "green one", "grey"]  # eval takes the first caption


def test_tfds_read_only_fallback_when_builder_needs_tensorflow(tfds_dir, monkeypatch):
  from qtx.data import tfds_source

  def needs_tf(*a, **k):
    raise ModuleNotFoundError("No module named 'tensorflow'")

  monkeypatch.setattr(tfds, "builder", needs_tf)
  src = tfds_source.TfdsSource("qtx_test_captions", "eval", S, data_dir=tfds_dir)
  assert len(src) == 3 and src.tfds_split == "val"
  with pytest.raises(RuntimeError, match="(?s)needs TensorFlow.*tfds build"):
    tfds_source.TfdsSource("qtx_no_such_dataset", "eval", S, data_dir=tfds_dir)


def test_sources_are_picklable_for_worker_processes(tmp_path):
  import pickle
  _make_folder(str(tmp_path))
  src = folder.FolderSource(str(tmp_path), "train", S)
  clone = pickle.loads(pickle.dumps(src))
  assert len(clone) == len(src)
  np.testing.assert_array_equal(clone[0]["image"], src[0]["image"])
  assert clone[9] is None and clone.counter.count >= 3


def test_a_source_module_missing_a_package_is_left_out_and_named(monkeypatch):
  """Where a third-party package is absent, the data modules that need it are left out of the
  registry scan (so configs still build: a bare accelerator machine compiles the step); an
  unknown data.name then names what is missing. A missing qtx module is still an error."""
  from qtx.data import registry
  real = registry.importlib.import_module

  def fake(name):
    if name == "qtx.data.needs_pkg":
      raise ModuleNotFoundError("No module named 'somepkg'", name="somepkg")
    if name == "qtx.data.broken":
      raise ModuleNotFoundError("No module named 'qtx.gone'", name="qtx.gone")
    return real(name)

  monkeypatch.setattr(registry.importlib, "import_module", fake)
  monkeypatch.setattr(registry, "_UNAVAILABLE", {})
  registry._import_quietly("qtx.data.needs_pkg")
  assert registry._UNAVAILABLE == {"qtx.data.needs_pkg": "somepkg"}
  with pytest.raises(ValueError, match=r"unknown data.name 'nope'.*qtx.data.needs_pkg was not "
                                       r"imported, it needs the package 'somepkg'"):
    registry.get_factory("nope")
  with pytest.raises(ModuleNotFoundError, match="qtx.gone"):
    registry._import_quietly("qtx.data.broken")
