"""Imported weights against an independent numpy forward of OpenAI CLIP (tests/clip_reference.py):
embeddings, logits and the outlier statistics agree to float32 round-off. Runs without torch."""
import jax
import numpy as np
import pytest

import clip_reference as ref
from qtx import weights
from qtx.analysis import outliers as outlier_lib
from test_weights import _save_safetensors, config_for, embed, fake_state_dict, template

# (state_dict sizes, head width): image/text widths, depths, patch, image size, MLP ratio
SHAPES = {
    "w32_p8": (dict(width=32, depth=2, patch=8, image=16, t_width=32, t_depth=2, mlp=4), 16),
    "w48_p4_3heads": (dict(width=48, depth=3, patch=4, image=12, t_width=48, t_depth=1, mlp=2),
                      16),
}
# float32 vs float64 on unit-norm embeddings of these few-layer models: at most 3.4e-7;
# every wiring mutant tried moves them by 1e-2 or more
ATOL = 1e-5


def _inputs(c, seed=1):
  rng = np.random.default_rng(seed)
  s, T, V = c.model.image.image_size, c.model.text.context_length, c.model.text.vocab_size
  images = rng.integers(0, 256, (4, s, s, 3), dtype=np.uint8)
  tokens = np.zeros((4, T), np.int32)
  for b, n in enumerate((2, 5, 9, T - 1)):  # start, n - 1 words, end-of-text (highest id), pad 0
    tokens[b, 0] = V - 2
    tokens[b, 1:n] = rng.integers(1, V - 2, n - 1)
    tokens[b, n] = V - 1
  return images, tokens


def _imported(tmp_path, shape, activation, preset="softmax"):
  sizes, head_dim = SHAPES[shape]
  sd = fake_state_dict(seed=len(shape), **sizes)
  c = config_for(sd, preset)
  weights.set_model_config(c, weights.infer_config(sd, head_dim=head_dim))
  for t in (c.model.image, c.model.text):
    t.activation = activation
  path = str(tmp_path / "clip.safetensors")
  _save_safetensors(path, sd)
  model, tmpl = template(c)
  params = weights.load_into(path, tmpl, c)
  return sd, c, model, params


@pytest.mark.parametrize("shape,activation", [("w32_p8", "quick_gelu"), ("w32_p8", "gelu"),
                                              ("w48_p4_3heads", "gelu_tanh")])
def test_imported_weights_equal_the_numpy_forward(tmp_path, shape, activation):
  sd, c, model, params = _imported(tmp_path, shape, activation)
  images, tokens = _inputs(c)
  zi, zt = embed(model, params, images, tokens)
  ri, _ = ref.encode_image(sd, images, c.model.image.heads, activation)
  rt, _ = ref.encode_text(sd, tokens, c.model.text.heads, activation)
  np.testing.assert_allclose(zi, ri, atol=ATOL, rtol=0)
  np.testing.assert_allclose(zt, rt, atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.exp(float(params["logit_scale"])) * zi @ zt.T,
                             ref.logits(sd, ri, rt), atol=100 * ATOL, rtol=0)
  # the reference is sensitive to what it checks: another activation is visibly different
  other = "gelu" if activation == "quick_gelu" else "quick_gelu"
  assert np.abs(ref.encode_image(sd, images, c.model.image.heads, other)[0] - ri).max() > 1e-3


def test_gated_import_preserves_the_checkpoint_function(tmp_path):
  sd, c, model, params = _imported(tmp_path, "w32_p8", "quick_gelu", preset="gated")
  assert "gate" in params["visual"]["encoder"]["block_0"]["attn"]
  images, tokens = _inputs(c)
  zi, zt = embed(model, params, images, tokens)
  np.testing.assert_allclose(zi, ref.encode_image(sd, images, c.model.image.heads)[0], atol=ATOL)
  np.testing.assert_allclose(zt, ref.encode_text(sd, tokens, c.model.text.heads)[0], atol=ATOL)


def test_outlier_statistics_equal_the_numpy_forward(tmp_path):
  """Every block's FFN output and block output, per sequence, averaged: the text tower counts
  the tokens up to each end-of-text only; batches of 3 over 4 sequences (a padded last batch)."""
  sd, c, model, params = _imported(tmp_path, "w32_p8", "quick_gelu")
  images, tokens = _inputs(c)
  got = outlier_lib.outlier_metrics(model, jax.tree.map(np.asarray, params), images, tokens,
                                 batch_size=3)
  _, inter_i = ref.encode_image(sd, images, c.model.image.heads)
  _, inter_t = ref.encode_text(sd, tokens, c.model.text.heads)
  T_img = inter_i[0]["block_out"].shape[1]
  want = {"image": ref.outlier_stats(inter_i, [T_img] * len(images)),
          "text": ref.outlier_stats(inter_t, list(np.argmax(tokens, -1) + 1))}
  n = 0
  for tower, stats in want.items():
    for name, (inf, kurt) in stats.items():
      np.testing.assert_allclose(got[f"outliers/{tower}/inf_norm/{name}"], inf, rtol=1e-5,
                                 err_msg=f"{tower} {name}")
      np.testing.assert_allclose(got[f"outliers/{tower}/kurtosis/{name}"], kurt, rtol=1e-4,
                                 err_msg=f"{tower} {name}")
      n += 2
  assert n == 2 * 2 * (2 + 2)  # 2 towers x 2 blocks x 2 tensors x 2 statistics
  np.testing.assert_allclose(
      got["outliers/max_inf_norm"],
      max(v[0] for s in want.values() for v in s.values()), rtol=1e-5)
  np.testing.assert_allclose(
      got["outliers/avg_kurtosis"],
      np.mean([v[1] for s in want.values() for v in s.values()]), rtol=1e-4)
