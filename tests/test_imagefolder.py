"""imagefolder zero-shot evaluation: class-per-folder trees (any names, or ImageNet's WordNet
ids mapped to the 1000 curated names), streamed, equal to a hand computation."""
import os

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import micro_config
from qtx.data import imagefolder, sources, templates
from qtx.data import tokenizer as tok
from qtx import evaluate as evaluate_lib
from qtx.data import pipeline
from qtx import run as run_lib


def _tree(root, classes, per_class=3, size=16, seed=0):
  rng = np.random.default_rng(seed)
  arrays = []
  for c in classes:
    os.makedirs(os.path.join(root, c), exist_ok=True)
    for i in range(per_class):
      a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
      Image.fromarray(a).save(os.path.join(root, c, f"{i}.png"))
      arrays.append(a)
  return arrays


def test_imagefolder_zeroshot_equals_hand_computation(tmp_path):
  root = str(tmp_path / "val")
  classes = ["blue_circle", "red square", "zebra"]
  arrays = _tree(root, classes)
  with open(os.path.join(root, "red square", "broken.jpg"), "wb") as f:
    f.write(b"not a jpeg")  # skipped and counted, never a crash
  c = micro_config(**{"eval.zeroshot": f"imagefolder@{root}", "eval.batch_size": 4})
  s = run_lib.build(c, train=True)
  params = run_lib.init_state(s, 0).params
  enc_i, enc_t = run_lib.make_encoders(s)
  before = sources.SKIPPED.count
  tasks = evaluate_lib.zeroshot_tasks(c)
  got = evaluate_lib.evaluate_all(enc_i, enc_t, params, pipeline.eval_task(c, 8), tasks, c)
  assert sources.SKIPPED.count - before == 1
  assert got["eval/imagefolder/num_samples"] == 9  # the whole folder, minus the broken file
  # by hand: embed every image, every class name in every photo template, average, argmax
  zi = np.asarray(enc_i(params, np.stack(arrays)))
  names = ["blue circle", "red square", "zebra"]
  prompts = [t.format(n) for n in names for t in templates.PHOTO_TEMPLATES]
  zt = np.asarray(enc_t(params, tok.tokenize(prompts, 16).astype(np.int32)))
  zc = zt.reshape(3, len(templates.PHOTO_TEMPLATES), -1).mean(1)
  zc /= np.linalg.norm(zc, axis=1, keepdims=True)
  pred = np.argmax(zi @ zc.T, axis=1)
  labels = np.repeat(np.arange(3), 3)
  assert got["eval/imagefolder/zeroshot_top1"] == pytest.approx(np.mean(pred == labels),
                                                                abs=1e-9)
  assert got["eval/imagefolder/zeroshot_top5"] == 1.0  # 3 classes


def test_wordnet_folders_get_the_imagenet_names_and_80_templates(tmp_path):
  root = str(tmp_path / "imagenet_val")
  wnids = [f"n{10000000 + 37 * i:08d}" for i in range(1000)]  # sorted order = class index
  for w in wnids:
    os.makedirs(os.path.join(root, w))
  _tree(root, [wnids[0], wnids[207], wnids[999]], per_class=1, size=20)
  src = imagefolder.ImageFolderSource(root, 16)
  assert src.class_names == templates.IMAGENET_CLASSNAMES
  assert src.templates == templates.OPENAI_IMAGENET_TEMPLATES
  assert src.labels == (0, 207, 999)
  r = src[1]
  assert r["label"] == 207 and r["image"].shape == (16, 16, 3)
  assert r["caption"] == "a bad photo of a Golden Retriever."
  # a partial WordNet tree cannot be mapped to class indices: say so
  part = str(tmp_path / "part")
  _tree(part, wnids[:3], per_class=1)
  with pytest.raises(ValueError, match="has 3 WordNet-id folders.*all 1000"):
    imagefolder.ImageFolderSource(part, 16)
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    imagefolder.ImageFolderSource(str(tmp_path / "nope"), 16)
