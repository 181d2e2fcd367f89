"""Tests of the embedded synthetic shapes dataset (qtx/data/synthetic.py)."""
import re
import time

import chex
import numpy as np
import pytest

from qtx.data import synthetic as syn


def _grey(image_HxWx3):
  """True where a pixel is grey (R = G = B), i.e. background before noise."""
  return (image_HxWx3[..., 0] == image_HxWx3[..., 1]) & (image_HxWx3[..., 1] == image_HxWx3[..., 2])


def _clean(idx, image_size=32, seed=0, split="train"):
  """Attributes and the noise-free image of record idx (same layout as the record itself)."""
  rng = syn.SyntheticShapes(split, image_size, seed).rng(idx)
  attrs = syn.sample_attributes(rng)
  return attrs, syn.render(attrs, image_size, rng, noise=0)


# ---------------------------------------------------------------------------------------------
# Constants and the zero-shot task


def test_palettes_are_distinct():
  colors = np.array(list(syn.COLORS.values()), np.int32)
  assert 6 <= len(colors) <= 8 and 5 <= len(syn.SHAPES) <= 6
  d = np.abs(colors[:, None, :] - colors[None, :, :]).sum(-1)
  assert d[~np.eye(len(colors), dtype=bool)].min() >= 90  # clearly different colours
  # No shape colour is grey, so it can never coincide with a (grey) background pixel.
  assert all(len(set(c)) > 1 for c in syn.COLORS.values())
  assert list(syn.SIZES.values()) == sorted(syn.SIZES.values())
  assert sorted(syn.POSITIONS.values()) == [(r, c) for r in range(3) for c in range(3)]


def test_class_names_templates_and_prompts():
  assert syn.NUM_CLASSES == len(syn.COLORS) * len(syn.SHAPES) == 42
  assert len(set(syn.CLASS_NAMES)) == syn.NUM_CLASSES
  assert syn.CHANCE_TOP1 == pytest.approx(1 / 42)
  assert all(t.count("{}") == 1 for t in syn.TEMPLATES) and len(syn.TEMPLATES) >= 5
  prompts = syn.zeroshot_prompts()
  assert len(prompts) == syn.NUM_CLASSES
  for name, ps in zip(syn.CLASS_NAMES, prompts):
    assert len(ps) == len(syn.TEMPLATES)
    assert all(name in p for p in ps)
  assert prompts[syn.CLASS_NAMES.index("orange circle")][0] == "a photo of an orange circle."
  assert prompts[syn.CLASS_NAMES.index("red ring")][0] == "a photo of a red ring."
  assert "1/42" in syn.describe() and "2.38%" in syn.describe()
  assert "42" in syn.__doc__ and "2.38%" in syn.__doc__


def test_label_of_matches_class_names():
  for c in syn.COLORS:
    for s in syn.SHAPES:
      attrs = {"color": c, "shape": s, "size": "small", "position": "top"}
      assert syn.CLASS_NAMES[syn.label_of(attrs)] == f"{c} {s}"


# ---------------------------------------------------------------------------------------------
# Captions


def test_every_caption_names_its_attributes_and_parses_back():
  rng = np.random.default_rng(0)
  for _ in range(60):
    attrs = syn.sample_attributes(rng)
    for t in range(len(syn.CAPTION_TEMPLATES)):
      for text in (syn.caption(attrs, template=t), syn.caption(attrs, rng, template=t)):
        words = re.findall(r"[a-z]+", text.lower())
        assert attrs["color"] in words and attrs["shape"] in words and attrs["size"] in words
        assert attrs["position"] in text.lower()
        assert syn.parse_caption(text) == attrs, text
        assert len(text.split()) <= 16  # fits a short text context
        assert " a orange" not in text and not text.lower().startswith("a orange")


def test_caption_templates_vary():
  attrs = {"color": "red", "shape": "circle", "size": "small", "position": "top left"}
  rng = np.random.default_rng(1)
  texts = {syn.caption(attrs, rng) for _ in range(300)}
  assert len(syn.CAPTION_TEMPLATES) >= 8
  assert len(texts) >= 16  # templates x location wordings
  assert syn.caption(attrs) == "a small red circle in the top left corner."
  assert syn.caption(attrs, template=3) == "In the top left corner, a small red circle."


@pytest.mark.parametrize("omit", [("size",), ("position",), ("size", "position")])
def test_captions_can_leave_out_size_and_position(omit):
  rng = np.random.default_rng(2)
  for _ in range(20):
    attrs = syn.sample_attributes(rng)
    kept = {k: v for k, v in attrs.items() if k not in omit}
    for t in range(len(syn.CAPTION_TEMPLATES)):
      text = syn.caption(attrs, rng, template=t, omit=omit)
      assert "[" not in text and "  " not in text and ", ," not in text and " ." not in text
      assert not text.startswith(",") and text.endswith("."), text
      assert syn.parse_caption(text, partial=True) == kept, text
      if "size" in omit:
        assert not set(re.findall(r"[a-z]+", text.lower())) & set(syn.SIZES), text
  attrs = {"color": "orange", "shape": "circle", "size": "small", "position": "top left"}
  assert syn.caption(attrs, template=3, omit=("position",)) == "a small orange circle."
  assert syn.caption(attrs, template=10, omit=("size",)) == (
      "the circle is orange, in the top left corner.")
  assert syn.caption(attrs, template=5, omit=omit) == {
      ("size",): "an orange circle, in the top left corner.",
      ("position",): "an orange circle, small.",
      ("size", "position"): "an orange circle."}[omit]
  with pytest.raises(ValueError, match=omit[0]):
    syn.parse_caption(syn.caption(attrs, omit=omit))  # strict parsing needs all four
  with pytest.raises(ValueError, match="omit"):
    syn.caption(attrs, omit=("color",))


def test_train_captions_leave_out_attributes_at_omit_prob_and_eval_captions_never():
  n = 1200
  train = syn.SyntheticShapes("train", seed=5)
  counts = {"size": 0, "position": 0}
  for idx in range(n):
    parsed = syn.parse_caption(train[idx]["caption"], partial=True)
    attrs = train.attributes(idx)
    assert all(attrs[k] == v for k, v in parsed.items())
    for k in counts:
      counts[k] += k not in parsed
  for k, c in counts.items():  # binomial(1200, 0.5): std 17
    assert abs(c - n * syn.TRAIN_OMIT_PROB) < 80, (k, c)
  full = syn.SyntheticShapes("train", seed=5, omit_prob=0.0)
  for idx in range(50):  # the images do not depend on omit_prob
    np.testing.assert_array_equal(full[idx]["image"], train[idx]["image"])
    assert syn.parse_caption(full[idx]["caption"]) == full.attributes(idx)
  assert syn.SyntheticShapes("eval").omit_prob == 0.0
  with pytest.raises(ValueError, match="omit_prob"):
    syn.SyntheticShapes("train", omit_prob=1.5)


def test_shape_scale_shrinks_only_the_shape():
  """Same draws, smaller shape: the background, noise and caption stay; the radius is scaled
  exactly and the shape's area by about shape_scale**2."""
  base = syn.SyntheticShapes("eval", image_size=64, seed=2, size=60)
  half = syn.SyntheticShapes("eval", image_size=64, seed=2, size=60, shape_scale=0.5)
  assert half.shape_scale == 0.5 and "shape_scale=0.5" in repr(half)
  ratios = []
  for idx in range(60):
    a, b = base[idx], half[idx]
    assert a["caption"] == b["caption"] and a["label"] == b["label"]
    clean = []
    for src in (base, half):
      rng = src.rng(idx)
      clean.append(syn.render(syn.sample_attributes(rng), 64, rng, noise=0,
                              shape_scale=src.shape_scale))
    shape_a, shape_b = ~_grey(clean[0]), ~_grey(clean[1])
    both_bg = ~shape_a & ~shape_b
    np.testing.assert_array_equal(a["image"][both_bg], b["image"][both_bg])
    ratios.append(shape_b.sum() / shape_a.sum())
  # area ratio 0.25 up to pixelation at 64 px (the small shapes are 7-15 px across)
  assert 0.2 < np.mean(ratios) < 0.3, np.mean(ratios)
  for idx in range(60):  # exactly half the radius, from the same random draws
    r1, r2 = base.rng(idx), half.rng(idx)
    (_, rad1), (_, rad2) = (syn.layout(syn.sample_attributes(r), r, sc)
                            for r, sc in ((r1, 1.0), (r2, 0.5)))
    assert rad2 == pytest.approx(0.5 * rad1, rel=1e-12)
    assert r1.uniform() == r2.uniform()  # and the generators are in the same state after it
  rng = base.rng(0)
  np.testing.assert_array_equal(  # the default is shape_scale = 1
      syn.render(syn.sample_attributes(rng), 64, rng, shape_scale=1.0), base[0]["image"])
  for bad in (0, -1.0, 1.6, True, "0.5"):
    with pytest.raises(ValueError, match="shape_scale must be a number in"):
      syn.SyntheticShapes("eval", shape_scale=bad)


def test_hard_negatives_differ_in_exactly_one_attribute():
  attrs = {"color": "blue", "shape": "ring", "size": "large", "position": "center"}
  variants = syn.one_attribute_variants(attrs)
  expected = sum(len(v) - 1 for v in syn._VALUES.values())
  assert len(variants) == expected == 6 + 5 + 2 + 8
  negatives = syn.hard_negative_captions(attrs, template=1)
  positive = syn.caption(attrs, template=1)
  assert len(set(negatives)) == len(negatives) and positive not in negatives
  for text in negatives:
    parsed = syn.parse_caption(text)
    assert sum(parsed[k] != attrs[k] for k in syn.ATTRIBUTES) == 1


def test_parse_caption_rejects_ambiguous_text():
  with pytest.raises(ValueError, match="color"):
    syn.parse_caption("a small red blue circle at the top.")
  with pytest.raises(ValueError, match="position"):
    syn.parse_caption("a small red circle.")


# ---------------------------------------------------------------------------------------------
# Records: determinism, splits, types


@pytest.mark.parametrize("image_size", [32, 64])
def test_record_dtype_and_shape(image_size):
  ds = syn.SyntheticShapes("train", image_size=image_size)
  for idx in (0, 1, 12345, len(ds) - 1):
    r = ds[idx]
    chex.assert_shape(r["image"], (image_size, image_size, 3))
    assert r["image"].dtype == np.uint8
    assert isinstance(r["caption"], str) and r["caption"]
    assert r["label"].dtype == np.int32 and 0 <= int(r["label"]) < syn.NUM_CLASSES


def test_determinism():
  a, b = syn.SyntheticShapes("train", seed=3), syn.SyntheticShapes("train", seed=3)
  for idx in (0, 7, 999):
    ra, rb = a[idx], b[idx]
    np.testing.assert_array_equal(ra["image"], rb["image"])
    assert ra["caption"] == rb["caption"] and ra["label"] == rb["label"]
  assert not np.array_equal(a[0]["image"], a[1]["image"])
  assert not np.array_equal(a[0]["image"], syn.SyntheticShapes("train", seed=4)[0]["image"])
  assert len({a[i]["caption"] for i in range(50)}) > 40


def test_train_and_eval_use_disjoint_randomness():
  train, ev = syn.SyntheticShapes("train"), syn.SyntheticShapes("eval")
  assert len(train) == 2**31 - 1 and len(ev) == 1000
  assert len(syn.SyntheticShapes("eval", size=10)) == 10
  # The generators' seed sequences never coincide across splits.
  train_keys = {tuple(train.rng(i).bit_generator.seed_seq.entropy) for i in range(200)}
  eval_keys = {tuple(ev.rng(i).bit_generator.seed_seq.entropy) for i in range(200)}
  assert not train_keys & eval_keys
  train_images = {train[i]["image"].tobytes() for i in range(300)}
  assert not any(ev[i]["image"].tobytes() in train_images for i in range(300))
  train_draws = {train.rng(i).integers(2**62) for i in range(300)}
  assert not any(ev.rng(i).integers(2**62) in train_draws for i in range(300))


def test_label_consistent_with_attributes():
  ds = syn.SyntheticShapes("eval", size=200)
  labels = []
  for idx in range(200):
    r, attrs = ds[idx], ds.attributes(idx)
    assert int(r["label"]) == syn.label_of(attrs)
    assert syn.parse_caption(r["caption"]) == attrs
    labels.append(int(r["label"]))
  assert len(set(labels)) >= 35  # classes are spread over the eval split


def test_attribute_distribution_is_roughly_uniform():
  ds = syn.SyntheticShapes("train", seed=1)
  attrs = [ds.attributes(i) for i in range(3000)]
  for name in syn.ATTRIBUTES:
    values = syn._VALUES[name]
    counts = np.array([sum(a[name] == v for a in attrs) for v in values])
    expected = 3000 / len(values)
    assert np.all(np.abs(counts - expected) < 0.25 * expected), (name, counts)


def test_grain_map_dataset_reads_the_source():
  grain = pytest.importorskip("grain")
  source = syn.SyntheticShapes("eval", size=8)
  batches = list(grain.MapDataset.source(source).batch(4))
  assert len(batches) == 2
  chex.assert_shape(batches[0]["image"], (4, 32, 32, 3))
  np.testing.assert_array_equal(batches[1]["image"][0], source[4]["image"])


# ---------------------------------------------------------------------------------------------
# Rendering: colour, position, size, background, noise


def test_shape_is_drawn_in_its_colour():
  for idx in range(150):
    attrs, image = _clean(idx)
    colour = np.array(syn.COLORS[attrs["color"]], np.uint8)
    fg = image[~_grey(image)]
    values, counts = np.unique(fg, axis=0, return_counts=True)
    assert len(values) == 1  # every non-grey pixel has exactly the shape colour
    np.testing.assert_array_equal(values[0], colour)
    assert counts[0] >= 9


def test_noise_is_small_and_keeps_the_layout():
  ds = syn.SyntheticShapes("train")
  shape_diffs = []
  for idx in range(30):
    attrs, clean = _clean(idx)
    noisy = ds[idx]["image"]
    diff = noisy.astype(np.int16) - clean.astype(np.int16)
    assert np.abs(diff).max() <= syn.NOISE_AMPLITUDE
    assert np.abs(diff).mean() > 1.0  # the noise is really there
    mask = np.all(clean == syn.COLORS[attrs["color"]], axis=-1)
    shape_diffs.append(diff[mask])
  # Shape pixels stay close to their colour: the noise is unbiased.
  assert abs(np.concatenate(shape_diffs).mean()) < 0.3


def test_background_is_grey_and_mostly_plain():
  spreads = []
  for idx in range(200):
    _, image = _clean(idx)
    bg = image[_grey(image)][:, 0].astype(np.int32)
    assert bg.size > 0.5 * image.shape[0] * image.shape[1]
    spreads.append(bg.max() - bg.min())
  spreads = np.array(spreads)
  assert 0.6 < np.mean(spreads == 0) < 0.9  # ~75% flat, the rest soft gradients
  assert spreads.max() <= 2 * syn.GRADIENT_AMPLITUDE + 1


@pytest.mark.parametrize("image_size", [32, 64])
def test_shape_centroid_lies_in_the_stated_cell(image_size):
  for idx in range(150):
    attrs, image = _clean(idx, image_size)
    mask = np.all(image == syn.COLORS[attrs["color"]], axis=-1)
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.mean() + 0.5) / image_size, (xs.mean() + 0.5) / image_size
    row, col = syn.POSITIONS[attrs["position"]]
    assert row / 3 < cy < (row + 1) / 3, (attrs, cy)
    assert col / 3 < cx < (col + 1) / 3, (attrs, cx)
    # The whole shape is inside the image: nothing is cut off at the border.
    assert mask.sum() > 0


def test_sizes_are_ordered_by_area():
  areas = {s: [] for s in syn.SIZES}
  for idx in range(400):
    attrs, image = _clean(idx)
    areas[attrs["size"]].append(np.all(image == syn.COLORS[attrs["color"]], axis=-1).sum())
  small, medium, large = (np.mean(areas[s]) for s in ("small", "medium", "large"))
  assert small < medium < large
  assert medium > 1.5 * small and large > 1.5 * medium
  # Per shape the size classes never overlap (jitter is small).
  rng = np.random.default_rng(0)
  for shape in syn.SHAPES:
    per_size = []
    for size in syn.SIZES:
      attrs = {"color": "red", "shape": shape, "size": size, "position": "center"}
      per_size.append([(syn.render(attrs, 64, rng, noise=0) == syn.COLORS["red"]).all(-1).sum()
                       for _ in range(20)])
    assert max(per_size[0]) < min(per_size[1]) and max(per_size[1]) < min(per_size[2]), shape


def test_shape_masks_have_their_geometry():
  center = (0.5, 0.5)
  masks = {s: syn.shape_mask(s, center, 0.4, 101) for s in syn.SHAPES}
  mid = 50  # the centre pixel
  assert masks["circle"][mid, mid] and not masks["ring"][mid, mid]
  assert masks["cross"][mid, mid] and masks["diamond"][mid, mid]
  # Square corner inside, circle/diamond corner outside.
  corner = mid + int(0.3 * 101)
  assert masks["square"][corner, corner] and not masks["diamond"][corner, corner]
  assert not masks["cross"][corner, corner]
  # Triangle: wide at the bottom, narrow at the top (apex up).
  tri = masks["triangle"]
  rows = np.nonzero(tri.any(1))[0]
  assert tri[rows[-1]].sum() > 5 * tri[rows[0]].sum()
  # Area relations of the unit shapes (pixel counts).
  area = {s: m.sum() for s, m in masks.items()}
  assert area["circle"] > area["square"] > area["ring"] > area["diamond"]
  np.testing.assert_allclose(area["circle"] / (np.pi * 40.4**2), 1.0, atol=0.02)
  # Area centroid at the requested centre for all shapes.
  for s, m in masks.items():
    ys, xs = np.nonzero(m)
    np.testing.assert_allclose([ys.mean(), xs.mean()], [mid, mid], atol=1.0, err_msg=s)


def test_rendering_speed():
  ds = syn.SyntheticShapes("train", image_size=32)
  ds[0]
  t0 = time.perf_counter()
  for idx in range(1000):
    ds[idx]
  assert time.perf_counter() - t0 < 2.0


# ---------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize("bad", [8, 15, 0, -32, 32.0, "32", None, True])
def test_bad_image_size_raises(bad):
  with pytest.raises(ValueError, match=re.escape(repr(bad))):
    syn.SyntheticShapes("train", image_size=bad)
  attrs = {"color": "red", "shape": "circle", "size": "small", "position": "top"}
  with pytest.raises(ValueError, match="image_size"):
    syn.render(attrs, bad, np.random.default_rng(0))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match=r"'test'.*'train', 'eval'"):
    syn.SyntheticShapes("test")
  with pytest.raises(ValueError, match="seed"):
    syn.SyntheticShapes("train", seed=-1)
  with pytest.raises(ValueError, match="size"):
    syn.SyntheticShapes("eval", size=0)
  ds = syn.SyntheticShapes("eval", size=5)
  with pytest.raises(IndexError, match="5"):
    ds[5]
  with pytest.raises(IndexError):
    ds[-1]
  with pytest.raises(ValueError, match=r"'pink'.*'red'"):
    syn.caption({"color": "pink", "shape": "circle", "size": "small", "position": "top"})
  with pytest.raises(ValueError, match="position"):
    syn.caption({"color": "red", "shape": "circle", "size": "small"})
  with pytest.raises(ValueError, match="template"):
    syn.caption({"color": "red", "shape": "circle", "size": "small", "position": "top"},
                template=99)
  with pytest.raises(ValueError, match=r"'star'"):
    syn.shape_mask("star", (0.5, 0.5), 0.2, 32)


def test_save_sample_grid(tmp_path):
  path = syn.save_sample_grid(str(tmp_path / "sub" / "grid.png"), n=4, image_size=32)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  path = syn.save_sample_grid(str(tmp_path / "half.png"), n=2, image_size=32, shape_scale=0.5)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_filler_words_are_inserted_and_change_nothing_else():
  plain = syn.SyntheticShapes("train", 32, seed=3)
  fill = syn.SyntheticShapes("train", 32, seed=3, filler=5)
  for i in range(20):
    a, b = plain[i], fill[i]
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["label"] == b["label"]
    words = b["caption"].split()
    assert len(words) == len(a["caption"].split()) + 5
    assert sum(w in syn.FILLER_WORDS for w in words) == 5
    # the caption's own words in their order once the fillers are removed
    assert " ".join(w for w in words if w not in syn.FILLER_WORDS) == a["caption"]
  assert fill[4]["caption"] == syn.SyntheticShapes("train", 32, seed=3, filler=5)[4]["caption"]
  with pytest.raises(ValueError, match="filler must be a non-negative int"):
    syn.SyntheticShapes("train", 32, filler=-1)


def test_the_eval_task_knows_the_filler_words_token_ids():
  from qtx import config_lib
  from qtx.data import pipeline, tokenizer
  c = config_lib.tiny_config()
  c.data.synthetic.eval_size = 4
  assert pipeline.eval_task(c).filler_token_ids() == ()
  c.data.synthetic.filler = 3
  task = pipeline.eval_task(c)
  ids = task.filler_token_ids()
  assert task.filler_words == syn.FILLER_WORDS and len(ids) == len(syn.FILLER_WORDS)
  for w, i in zip(syn.FILLER_WORDS, ids):  # each word is exactly that one token
    np.testing.assert_array_equal(tokenizer.tokenize([w], 4)[0], [49406, i, 49407, 0])
  # the eval captions carry the fillers: their tokens include them
  assert np.isin(task.tokens, ids).sum(-1).min() >= 1
  with pytest.raises(ValueError, match="'hello world' is not one token"):
    pipeline.EvalTask("x", task.images, task.tokens, None, filler_words=("hello world",)
                      ).filler_token_ids()
