"""webdataset source on tar shards the tests write (PIL-made JPEGs, img2dataset layout): shard
specs, every bad-member kind counted, each sample once per epoch across 2 hosts, shuffling
across shards, exact resume of the iterator position, and SIGKILL + resume of a training run."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import micro_config
from qtx.data import pipeline, sources, webdataset

pytest.importorskip("grain")


def _jpeg(rng, size=(20, 24)):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def _add(tar, name, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _caption(s, i):
  return f"shard {s} item {'abcdefghijklmnop'[i]}"  # single digits: the tokenizer splits 10


def make_shards(root, n_shards=4, per_shard=12, seed=0, bad=False):
  """Shards root/{00000..}.tar; captions 'shard S item I' name their sample. With bad=True,
  shard 0 also holds one of every bad-member kind."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  paths = []
  for s in range(n_shards):
    path = os.path.join(root, f"{s:05d}.tar")
    with tarfile.open(path, "w") as tar:
      for i in range(per_shard):
        key = f"{s:05d}{i:04d}"
        _add(tar, f"{key}.jpg", _jpeg(rng))
        _add(tar, f"{key}.txt", _caption(s, i).encode())
        _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
      if bad and s == 0:
        _add(tar, "bad0001.jpg", b"\xff\xd8 not really a jpeg")
        _add(tar, "bad0001.txt", b"a corrupt image")
        _add(tar, "bad0002.jpg", _jpeg(rng))  # no caption
        _add(tar, "bad0003.jpg", _jpeg(rng))
        _add(tar, "bad0003.txt", b"   ")  # empty caption
        _add(tar, "README", b"stray file without a sample key")
        _add(tar, "bad0004.txt", b"caption without an image")
    paths.append(path)
  return paths


def test_shard_specs(tmp_path):
  paths = make_shards(str(tmp_path / "d"), n_shards=3, per_shard=2)
  assert webdataset.expand_braces("/x/{00008..00011}.tar") == [
      "/x/00008.tar", "/x/00009.tar", "/x/00010.tar", "/x/00011.tar"]
  assert webdataset.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
  assert webdataset.shard_paths(str(tmp_path / "d" / "{00000..00002}.tar")) == paths
  assert webdataset.shard_paths(str(tmp_path / "d")) == paths
  lst = tmp_path / "d" / "shards.txt"
  lst.write_text("# my shards\n00002.tar\n" + paths[0] + "\n")
  assert webdataset.shard_paths(str(lst)) == [paths[2], paths[0]]
  assert webdataset.split_key("dir/000123.seg.jpg") == ("dir/000123", "seg.jpg")
  assert webdataset.split_key("README") == (None, "")
  with pytest.raises(ValueError, match="needs data.path"):
    webdataset.shard_paths("")
  with pytest.raises(FileNotFoundError, match="no such shard"):
    webdataset.shard_paths(str(tmp_path / "nothing"))


def test_every_bad_member_kind_is_skipped_and_counted(tmp_path):
  root = str(tmp_path / "d")
  paths = make_shards(root, n_shards=3, per_shard=4, bad=True)
  # a truncated tar at the end of a shard: cut shard 2 inside its last sample's image
  with tarfile.open(paths[2]) as tar:
    last_jpg = tar.getmembers()[-3]
  data = open(paths[2], "rb").read()
  with open(paths[2], "wb") as f:
    f.write(data[:last_jpg.offset_data + last_jpg.size // 2])
  spec = os.path.join(root, "{00000..00003}.tar")  # 00003 does not exist: a missing shard
  src = webdataset.WebDatasetSource(spec, "train", 16, held_out=False)
  reasons = src.counter.reasons
  assert reasons["missing or unreadable shard"] == 1
  assert reasons["stray member without a sample key"] == 1
  assert reasons["sample without a caption"] == 1
  assert reasons["sample without an image"] == 1
  assert reasons.get("truncated member", 0) + reasons.get("truncated or corrupt tar", 0) >= 1
  good = [src[i] for i in range(len(src))]
  r = src.counter.reasons
  assert r["unreadable image"] == 1 and r["empty caption"] == 1
  captions = sorted(x["caption"] for x in good if x is not None)
  # shards 0 and 1 whole; shard 2 up to the cut (its last sample lost); no crash anywhere
  assert captions[:8] == sorted(_caption(s, i) for s in (0, 1) for i in range(4))
  assert len([c for c in captions if c.startswith("shard 2")]) == 3
  assert all(x["image"].shape == (16, 16, 3) for x in good if x is not None)
  assert src.metadata(0) == {"key": "000000000"}


def _epoch_captions(c, host, hosts, batches):
  import grain  # noqa: F401
  from qtx.data import tokenizer
  it = iter(pipeline.train_dataset(c, host, hosts))
  tok = tokenizer.default_tokenizer()
  out = []
  for _ in range(batches):
    b = next(it)
    out += [tok.decode(t) for t in np.asarray(b["tokens"])]
  return out


def test_each_sample_once_per_epoch_across_two_hosts_and_shards_mix(tmp_path):
  root = str(tmp_path / "d")
  make_shards(root, n_shards=4, per_shard=12)
  make_shards(str(tmp_path / "ev"), n_shards=1, per_shard=4, seed=1)
  c = micro_config(**{"data.name": "webdataset", "data.path": os.path.join(root, "{00000..00003}.tar"),
                      "data.eval_path": str(tmp_path / "ev"), "train.batch_size": 8})
  per_host_batches = 48 // 8  # one epoch: 48 samples, 4 per host and batch
  a = _epoch_captions(c, 0, 2, per_host_batches)
  b = _epoch_captions(c, 1, 2, per_host_batches)
  assert len(a) == len(b) == 24
  assert sorted(a + b) == sorted(_caption(s, i) for s in range(4) for i in range(12))
  # the shuffle mixes shards: the first 8 samples of host 0 come from at least 3 shards
  assert len({x.split()[1] for x in a[:8]}) >= 3
  # eval reads data.eval_path
  ev = pipeline.make_source(c, "eval")
  assert sorted(ev[i]["caption"] for i in range(len(ev))) == [_caption(0, i) for i in range(4)]


def test_iterator_position_restores_exactly(tmp_path):
  root = str(tmp_path / "d")
  make_shards(root, n_shards=3, per_shard=8)
  c = micro_config(**{"data.name": "webdataset", "data.path": root, "train.batch_size": 4})
  it = iter(pipeline.train_dataset(c))
  for _ in range(5):  # past the first epoch's end (24 samples, some held out for eval)
    next(it)
  state = it.get_state()
  want = [np.asarray(next(it)["tokens"]) for _ in range(4)]
  it2 = iter(pipeline.train_dataset(c))
  it2.set_state(state)
  got = [np.asarray(next(it2)["tokens"]) for _ in range(4)]
  for w, g in zip(want, got):
    np.testing.assert_array_equal(w, g)
  # the held-out eval part and the train part are disjoint and cover every sample
  tr, ev = pipeline.make_source(c, "train"), pipeline.make_source(c, "eval")
  keys_tr = {tr.key(i) for i in range(len(tr))}
  keys_ev = {ev.key(i) for i in range(len(ev))}
  assert not keys_tr & keys_ev and len(keys_tr | keys_ev) == 24 and len(keys_ev) >= 1


def test_mostly_bad_dataset_stops_with_a_message(tmp_path):
  root = str(tmp_path / "d")
  os.makedirs(root)
  with tarfile.open(os.path.join(root, "00000.tar"), "w") as tar:
    for i in range(20):
      _add(tar, f"{i:04d}.jpg", b"broken")
      _add(tar, f"{i:04d}.txt", b"a caption")
  c = micro_config(**{"data.name": "webdataset", "data.path": root, "train.batch_size": 4})
  with pytest.raises(Exception, match="filter"):
    next(iter(pipeline.train_dataset(c)))
  with pytest.raises(ValueError, match="no usable samples"):
    webdataset.WebDatasetSource(str(tmp_path / "nothing.tar"), "train", 16)
  assert sources.SKIPPED.count > 0


def test_random_resized_crop_draws_and_is_exact_on_resume(tmp_path):
  from qtx.data import augment
  rng = np.random.default_rng(0)
  for _ in range(200):
    H, W = int(rng.integers(20, 60)), int(rng.integers(20, 60))
    top, left, h, w = augment.crop_box(H, W, rng, (0.5, 1.0))
    assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
    if (h, w) != (H, W):
      assert 0.5 * H * W * 0.9 <= h * w <= H * W and 0.7 <= w / h <= 1.4
  # the area fraction follows the scale range (rounding of h and w aside)
  fracs = []
  for _ in range(200):
    top, left, h, w = augment.crop_box(64, 64, rng, (0.3, 0.4))
    fracs.append(h * w / 64 ** 2)
  assert 0.27 <= min(fracs) and max(fracs) <= 0.44 and 0.32 < np.mean(fracs) < 0.38
  with pytest.raises(ValueError, match="unknown data.augment 'flip'"):
    augment.check("flip", (0.9, 1.0))
  with pytest.raises(ValueError, match="augment_scale"):
    augment.check("random_resized_crop", (0.0, 1.0))
  root = str(tmp_path / "d")
  make_shards(root, n_shards=2, per_shard=4)
  c = micro_config(**{"data.name": "webdataset", "data.path": root, "train.batch_size": 2,
                      "data.augment": "random_resized_crop", "data.augment_scale": (0.3, 0.6)})
  it = iter(pipeline.train_dataset(c))
  batches = [next(it) for _ in range(14)]  # 7 train samples: two epochs
  assert all(b["image"].shape == (2, 16, 16, 3) and b["image"].dtype == np.uint8
             for b in batches)
  state = it.get_state()
  want = [np.asarray(next(it)["image"]) for _ in range(3)]
  it2 = iter(pipeline.train_dataset(c))
  it2.set_state(state)
  for w in want:
    np.testing.assert_array_equal(np.asarray(next(it2)["image"]), w)
  # without augmentation the same sample gives the same pixels every epoch; with it, not
  plain = micro_config(**{"data.name": "webdataset", "data.path": root, "train.batch_size": 7})
  e = iter(pipeline.train_dataset(plain))
  a, b = next(e), next(e)
  key = lambda x: {tuple(t): i for i, t in enumerate(np.asarray(x["tokens"]))}
  ka, kb = key(a), key(b)
  t = next(iter(ka))
  np.testing.assert_array_equal(a["image"][ka[t]], b["image"][kb[t]])
  c.train.batch_size = 7
  e = iter(pipeline.train_dataset(c))
  a, b = next(e), next(e)
  ka, kb = key(a), key(b)
  assert not np.array_equal(a["image"][ka[t]], b["image"][kb[t]])


def test_five_caption_eval_sets_from_webdataset_and_folder(tmp_path):
  """Eval samples with several captions: every caption enters retrieval, mapped to its image."""
  rng = np.random.default_rng(3)
  ev = tmp_path / "ev"
  os.makedirs(ev)
  with tarfile.open(ev / "00000.tar", "w") as tar:
    for i in range(4):
      _add(tar, f"{i:04d}.jpg", _jpeg(rng))
      _add(tar, f"{i:04d}.txt", f"image {'abcd'[i]}".encode())
      caps = [f"image {'abcd'[i]} caption {'vwxyz'[j]}" for j in range(5)]
      _add(tar, f"{i:04d}.json", json.dumps({"captions": caps}).encode())
  make_shards(str(tmp_path / "tr"), n_shards=1, per_shard=4)
  c = micro_config(**{"data.name": "webdataset", "data.path": str(tmp_path / "tr"),
                      "data.eval_path": str(ev)})
  task = pipeline.eval_task(c, num_samples=4)
  assert task.tokens.shape == (20, 16)
  np.testing.assert_array_equal(task.caption_image, np.repeat(np.arange(4), 5))
  # folder: a JSONL caption list
  fd = tmp_path / "folder"
  os.makedirs(fd)
  lines = []
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(fd / f"{i}.png")
    lines.append(json.dumps({"image": f"{i}.png", "caption": [f"one {i}", f"two {i}", ""]}))
  (fd / "captions_eval.jsonl").write_text("\n".join(lines) + "\n")
  (fd / "captions_train.jsonl").write_text("\n".join(lines) + "\n")
  c = micro_config(**{"data.name": "folder", "data.path": str(fd)})
  task = pipeline.eval_task(c, num_samples=3)
  assert task.tokens.shape[0] == 6  # two non-empty captions each
  np.testing.assert_array_equal(task.caption_image, [0, 0, 1, 1, 2, 2])
  from qtx import evaluate
  z = np.eye(3)
  m = evaluate.evaluate(lambda x: z[:len(x)], lambda t: z[task.caption_image[:len(t)]], task, 6)
  assert m["eval/i2t_r1"] == 1.0 and m["eval/t2i_r1"] == 1.0


def test_worker_processes_are_deterministic_and_resume_exactly(tmp_path):
  """data.num_workers=2: decoding and augmentation in worker processes; every sample once per
  epoch, the same batches on every run, and the saved iterator position restores exactly.
  (Workers split the samples among themselves, so batches differ from 0 workers'.)"""
  root = str(tmp_path / "d")
  make_shards(root, n_shards=2, per_shard=8)
  c = micro_config(**{"data.name": "webdataset", "data.path": root, "train.batch_size": 4,
                      "data.augment": "random_resized_crop", "data.num_workers": 2})

  def take(it, n):
    return [np.asarray(next(it)["image"]) for _ in range(n)]

  a = iter(pipeline.train_dataset(c))
  want = take(a, 6)
  a.close()
  b = iter(pipeline.train_dataset(c))
  got = take(b, 3)
  state = b.get_state()
  b.close()
  r = iter(pipeline.train_dataset(c))
  r.set_state(state)
  got += take(r, 3)
  r.close()
  for w, g in zip(want, got):
    np.testing.assert_array_equal(w, g)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_records_read_in_worker_processes_reach_the_main_count(tmp_path, workers):
  """Records found bad while decoding (a corrupt image, an empty caption) are counted in the
  process that decodes them; with data.num_workers > 0 that is a worker, and each batch carries
  its worker's new ones to the main process, whose count data/skipped reports."""
  root = str(tmp_path / "d")
  make_shards(root, n_shards=2, per_shard=6, bad=True)
  c = micro_config(**{"data.name": "webdataset", "data.path": root, "train.batch_size": 4,
                      "data.num_workers": workers})
  src = webdataset.WebDatasetSource(root, "train", c.model.image.image_size, held_out=False)
  assert src.counter.reasons.get("unreadable image", 0) == 0  # found only when decoded
  counter = sources.SkipCounter("test")
  before = sources.SKIPPED.count
  sources.SKIPPED.parent = counter  # the main process's total, seen from this test
  try:
    it = iter(pipeline.train_dataset(c))
    for _ in range(8):  # 32 samples: every one of the 14 records at least twice
      batch = next(it)
      assert sources.SKIP_FIELD not in batch
    if workers:
      it.close()
  finally:
    sources.SKIPPED.parent = None
  r = counter.reasons
  assert (r.get("unreadable image"), r.get("empty caption")) == (1, 1), r
  assert sources.SKIPPED.count - before >= 2


def test_index_fingerprint_guards_resume_against_changed_shards(tmp_path):
  """The index fingerprint: the same shards give the same one wherever they are mounted; a
  removed or added shard changes it, and a resumed run that finds another index stops with a
  message instead of reading other samples at its saved position."""
  from qtx.modes import train
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  make_shards(a, n_shards=3, per_shard=4)
  make_shards(b, n_shards=3, per_shard=4)  # the same bytes elsewhere
  src = lambda spec: webdataset.WebDatasetSource(spec, "train", 16, held_out=False)
  fa = src(a).fingerprint()
  assert fa == src(b).fingerprint() and len(fa) == 16
  assert fa != src(os.path.join(a, "{00000..00001}.tar")).fingerprint()
  c = str(tmp_path / "c")
  make_shards(c, n_shards=3, per_shard=4, seed=1)  # as many samples, other images
  assert len(src(c)) == len(src(a)) and src(c).fingerprint() != fa
  wd = str(tmp_path / "run")
  train.check_data_index(src(a), wd, resuming=False)
  saved = json.load(open(os.path.join(wd, train.DATA_INDEX_FILE)))
  assert saved == {"fingerprint": fa, "describe": f"12 train samples in 3 shard(s) of {a!r}"}
  train.check_data_index(src(b), wd, resuming=True)  # same index: resumes
  make_shards(os.path.join(a, "more"), n_shards=1, per_shard=2)
  with open(os.path.join(tmp_path, "list.txt"), "w") as f:
    f.write("\n".join([os.path.join(a, f"{i:05d}.tar") for i in range(3)]
                      + [os.path.join(a, "more", "00000.tar")]))
  with pytest.raises(ValueError, match=r"the training data changed since the run started \(it "
                     r"had 12 train samples in 3 shard\(s\).*now 14 train samples in 4 shard"):
    train.check_data_index(src(os.path.join(tmp_path, "list.txt")), wd, resuming=True)
