"""Attention-mass statistics (qtx.analysis.attention_mass) in closed form: with the query and
key projections zeroed every score is 0, so a softmax_sink head gives each visible key
1 / (e^b + N_i) and the sink e^b / (e^b + N_i), N_i the keys row i sees."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import micro_config

from qtx import run as run_lib
from qtx.analysis import attention_mass as am


def _zero_qk(params):
  def zero(path, x):
    names = [str(getattr(k, "key", "")) for k in path]
    return jnp.zeros_like(x) if ("query" in names or "key" in names) else x
  return jax.tree_util.tree_map_with_path(zero, params)


def _zero_qk_model(preset, **attention):
  """(config, run, params) of the micro model with `preset`, the attention fields set in both
  towers, and zero query/key projections (every score 0)."""
  c = micro_config(preset)
  for t in (c.model.image, c.model.text):
    for k, v in attention.items():
      t.attention[k] = v
  s = run_lib.build(c)
  return c, s, _zero_qk(run_lib.init_params(s, 0))


def _images(c, n, plain_patches):
  """uint8 images: noise everywhere except `plain_patches` (patch indices) of one colour."""
  rng = np.random.default_rng(0)
  s, p = c.model.image.image_size, c.model.image.patch_size
  x = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
  per_row = s // p
  for j in plain_patches:
    r, col = divmod(j, per_row)
    x[:, r * p:(r + 1) * p, col * p:(col + 1) * p] = 77
  return x


@pytest.mark.parametrize("registers", [0, 3])
def test_mass_statistics_equal_their_closed_form(registers):
  b = 0.7
  c = micro_config("softmax_sink", **{"model.image.registers": registers})
  for t in (c.model.image, c.model.text):
    t.attention.sink_init = b
  s = run_lib.build(c)
  params = _zero_qk(run_lib.init_params(s, 0))
  plain = [0, 5, 6, 15]
  images = _images(c, 6, plain)
  T = c.model.text.context_length
  rng = np.random.default_rng(1)
  tokens = np.zeros((6, T), np.int32)
  lengths = [3, 5, 16, 9, 2, 7]  # tokens up to and including end-of-text (the highest id)
  for r, L in enumerate(lengths):
    tokens[r, :L - 1] = rng.integers(1, 1000, L - 1)
    tokens[r, L - 1] = 49407
  m = am.attention_mass_metrics(s.model, params, images, tokens, batch_size=4,
                                patch_size=c.model.image.patch_size, registers=registers)
  eb = math.exp(b)
  S = (c.model.image.image_size // c.model.image.patch_size) ** 2 + 1 + registers
  np.testing.assert_allclose(m["attn/image/null_mass"], eb / (eb + S), rtol=1e-5)
  np.testing.assert_allclose(m["attn/image/first_key_mass"], 1 / (eb + S), rtol=1e-5)
  np.testing.assert_allclose(m["attn/image/top_key_mass"], 1 / (eb + S), rtol=1e-5)
  np.testing.assert_allclose(m["attn/image/background_mass"], len(plain) / (eb + S), rtol=1e-5)
  if registers:
    np.testing.assert_allclose(m["attn/image/register_mass"], registers / (eb + S), rtol=1e-5)
  else:
    assert "attn/image/register_mass" not in m
  # text: causal, row i sees i + 1 keys; only rows up to end-of-text count
  null = first = top = 0.0
  for L in lengths:
    n_i = np.arange(1, L + 1, dtype=np.float64)
    null += np.mean(eb / (eb + n_i))
    first += np.mean(1 / (eb + n_i))
    top += np.mean(1 / (eb + n_i))  # key 0 is seen by every row: it has the largest mean
  np.testing.assert_allclose(m["attn/text/null_mass"], null / 6, rtol=1e-5)
  np.testing.assert_allclose(m["attn/text/first_key_mass"], first / 6, rtol=1e-5)
  np.testing.assert_allclose(m["attn/text/top_key_mass"], top / 6, rtol=1e-5)


def test_softmax_rows_give_no_mass_to_no_key():
  """Plain softmax rows sum to 1 (the sink test above gives the mass it takes away), and no
  plain patch means no background mass."""
  c = micro_config()
  s = run_lib.build(c)
  params = run_lib.init_params(s, 0)
  images = _images(c, 4, [])
  tokens = np.tile(np.array([[49406, 5, 6, 49407] + [0] * 12], np.int32), (4, 1))
  m = am.attention_mass_metrics(s.model, params, images, tokens, 4, c.model.image.patch_size)
  assert abs(m["attn/image/null_mass"]) < 1e-6 and abs(m["attn/text/null_mass"]) < 1e-6
  assert m["attn/image/background_mass"] == 0.0


def test_background_patches():
  c = micro_config()
  x = _images(c, 2, [1, 2])
  bg = np.asarray(am.background_patches(x, c.model.image.patch_size))
  assert bg.shape == (2, 16)
  assert [j for j in range(16) if bg[0, j]] == [1, 2]


def test_filler_and_content_queries_are_reported_apart():
  """With zero query/key projections, the sink head's row i gives the start token
  1 / (e^b + i + 1); the filler and content statistics average that over their own rows
  (content: after the start token, up to end-of-text, not filler), per layer and overall."""
  b = 0.3
  c, s, params = _zero_qk_model("softmax_sink", sink_init=b)
  T = c.model.text.context_length
  F = (11, 12)  # filler ids
  # the third sequence has no filler: it is left out of the filler mean, not counted as 0
  seqs = [[49406, 11, 5, 12, 12, 6, 49407], [49406, 7, 11, 49407], [49406, 8, 49407]]
  tokens = np.zeros((3, T), np.int32)
  for r, q in enumerate(seqs):
    tokens[r, :len(q)] = q
  images = _images(c, 3, [])
  m = am.attention_mass_metrics(s.model, params, images, tokens, 2, c.model.image.patch_size,
                                filler_ids=F)
  eb = math.exp(b)
  want = {"filler": [], "content": []}
  for q in seqs:
    rows = {"filler": [i for i, t in enumerate(q) if t in F],
            "content": [i for i, t in enumerate(q) if i > 0 and t not in F]}
    for g, idx in rows.items():
      if idx:
        want[g].append(np.mean([1 / (eb + i + 1) for i in idx]))
  assert len(want["filler"]) == 2 and len(want["content"]) == 3
  for g in ("filler", "content"):
    np.testing.assert_allclose(m[f"attn/text/first_key_mass_{g}"], np.mean(want[g]), rtol=1e-5)
    for layer in range(c.model.text.depth):
      np.testing.assert_allclose(m[f"attn/text/first_key_mass_{g}/layer_{layer}"],
                                 np.mean(want[g]), rtol=1e-5)
  assert not any("filler" in k or "#" in k for k in am.attention_mass_metrics(
      s.model, params, images, tokens, 2, c.model.image.patch_size))
  assert not any("#" in k for k in m)


@pytest.mark.parametrize("a", [1.1264, 1.115])
def test_probability_grid_statistics_equal_their_closed_form(a):
  """Clipped softmax with zero query/key projections: a row that sees N keys gives each of them
  max(0, (1 - a) / N + a / N^2) (gamma = -a / N): exact zeros for large N, entries below half a
  step of the 8-bit grid (1/510) and entries above it."""
  # a = 1.1264: N = 8 gives 0.0018, between 1/600 and 1/510; a = 1.115: N = 8 gives 0.0030,
  # between 1/510 and 1/255 (and N = 9 0.0010): the threshold is pinned from both sides
  c, s, params = _zero_qk_model("clipped_softmax", alpha=a)
  T = c.model.text.context_length
  lengths = [3, 8, 12, 16]
  tokens = np.zeros((4, T), np.int32)
  for r, L in enumerate(lengths):
    tokens[r, :L - 1] = np.arange(1, L)
    tokens[r, L - 1] = 49407
  m = am.attention_mass_metrics(s.model, params, _images(c, 4, []), tokens, 4,
                                c.model.image.patch_size)
  # image: 17 keys, every entry clipped to 0
  assert (m["attn/image/prob_zero_fraction"], m["attn/image/prob_tiny_fraction"],
          m["attn/image/prob_tiny_mass"]) == (1.0, 0.0, 0.0)
  p = lambda n: max(0.0, (1 - a) / n + a / n ** 2)
  zero, tiny, mass = [], [], []
  for L in lengths:
    ns = np.arange(1, L + 1)
    zero.append(sum(n for n in ns if p(n) == 0) / ns.sum())
    nonzero = [n for n in ns if p(n) > 0]
    tiny.append(sum(n for n in nonzero if p(n) < 1 / 510) / sum(nonzero))
    mass.append(sum(n * p(n) for n in nonzero if p(n) < 1 / 510) / L)
  np.testing.assert_allclose(m["attn/text/prob_zero_fraction"], np.mean(zero), rtol=1e-6)
  np.testing.assert_allclose(m["attn/text/prob_tiny_fraction"], np.mean(tiny), rtol=1e-6)
  np.testing.assert_allclose(m["attn/text/prob_tiny_mass"], np.mean(mass), rtol=1e-4)
  assert min(np.mean(zero), np.mean(tiny), np.mean(mass)) > 0  # the case tests something
