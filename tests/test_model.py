"""CLIP towers: shapes, parameter counts, gates, bf16, scan/remat, bad input."""
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import micro_config
from qtx import config_lib
from qtx.nn.attention import AttentionConfig, HeadGate, MultiHeadAttention
from qtx.run import build_model


def _inputs(c, B=3, seed=0):
  rng = np.random.default_rng(seed)
  s = c.model.image.image_size
  images = rng.integers(0, 256, (B, s, s, 3), dtype=np.uint8)
  tokens = np.zeros((B, c.model.text.context_length), np.int32)
  for b in range(B):
    n = 3 + b
    tokens[b, 0] = 49406
    tokens[b, 1:n] = rng.integers(1, 40000, n - 1)
    tokens[b, n] = 49407
  return jnp.asarray(images), jnp.asarray(tokens)


def _n_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _param_shapes(c):
  """The parameter tree's shapes (eval_shape: nothing is allocated)."""
  m = build_model(c)
  img = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8)
  tok = jax.ShapeDtypeStruct((1, 77), jnp.int32)
  return nn.meta.unbox(jax.eval_shape(m.init, jax.random.key(0), img, tok)["params"])


def test_b16_parameter_count_matches_openai_clip():
  params = _param_shapes(config_lib.b16_config())
  # OpenAI CLIP ViT-B/16: 149,620,737 parameters (visual 86,192,640; text + logit_scale rest).
  assert _n_params(params) == 149_620_737
  assert _n_params(params["visual"]) == 86_192_640
  assert params["visual"]["pos_embed"].shape == (197, 768)
  assert params["textual"]["token_embed"].shape == (49408, 512)


def test_b32_parameter_count_matches_openai_clip():
  params = _param_shapes(config_lib.b32_config())
  assert _n_params(params) == 151_277_313  # OpenAI CLIP ViT-B/32
  assert params["visual"]["pos_embed"].shape == (50, 768)


def test_pod_presets_are_pod_safe_and_refuse_synthetic_data():
  from qtx import config_lib as cl
  for fn, name in ((cl.b16_config, "configs/clip_b16.py"), (cl.b32_config, "configs/clip_b32.py")):
    c = fn("gated")
    assert (c.model.dtype, c.model.remat, c.train.microbatches) == ("bfloat16", "full", 0)
    assert c.checkpoint.every_steps == 1000
    assert (c.mesh.shape.data, c.mesh.shape.fsdp) == (-1, 1)
    assert c.model.image.attention.gate == "linear"
    with pytest.raises(ValueError, match=rf"refuses the embedded synthetic.*{name}:runlocal"):
      cl.validate(c)
    c.data.name, c.data.path = "folder", "/data/my_pairs"
    cl.validate(c)  # real data: accepted
    r = fn("gated,runlocal")
    assert r.model.image.attention.gate == "linear" and r.model.dtype == "bfloat16"
    assert r.train.batch_size <= 8 and r.train.total_steps <= 4
    cl.validate(r)  # runlocal allows the synthetic data
  with pytest.raises(ValueError, match=r"unknown config argument word\(s\) \['runlcoal'\]"):
    cl.b16_config("gated,runlcoal")
  with pytest.raises(ValueError, match="2 normalizer presets"):
    cl.b16_config("gated,softplus")
  assert cl.config_words(None) == ("softmax", False)
  assert cl.config_words("runlocal, clipped_softmax") == ("clipped_softmax", True)


@pytest.mark.parametrize("preset", config_lib.NORMALIZER_PRESETS)
def test_tower_shapes_and_normalised_embeddings(preset):
  c = micro_config(preset)
  m = build_model(c)
  images, tokens = _inputs(c)
  v = m.init(jax.random.key(0), images, tokens)
  zi, zt, scale, bias = m.apply(v, images, tokens)
  chex.assert_shape([zi, zt], (3, c.model.embed_dim))
  np.testing.assert_allclose(jnp.linalg.norm(zi, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(zt, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(scale, math.log(1 / 0.07), rtol=1e-6)
  assert bias is None
  chex.assert_tree_all_finite((zi, zt))


def test_siglip_model_has_bias_and_init():
  c = micro_config(**{"loss.name": "siglip"})
  m = build_model(c)
  images, tokens = _inputs(c)
  v = m.init(jax.random.key(0), images, tokens)
  _, _, scale, bias = m.apply(v, images, tokens)
  np.testing.assert_allclose(scale, math.log(10.0), rtol=1e-6)
  np.testing.assert_allclose(bias, -10.0)


def test_text_pooling_reads_the_eot_position_only():
  c = micro_config()
  m = build_model(c)
  images, tokens = _inputs(c)
  v = m.init(jax.random.key(0), images, tokens)
  zt = m.apply(v, tokens, method=m.encode_text)
  # tokens after the end-of-text token are invisible to it (causal mask)
  t2 = tokens.at[:, -1].set(1234)
  np.testing.assert_allclose(m.apply(v, t2, method=m.encode_text), zt, atol=1e-6)
  t3 = tokens.at[0, 1].set(999)
  assert not np.allclose(m.apply(v, t3, method=m.encode_text)[0], zt[0], atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "mlp", "all_heads_linear", "elementwise"])
@pytest.mark.parametrize("pi_init", [0.5, 0.25])
def test_gate_initial_value_equals_pi_init(kind, pi_init):
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  gate = HeadGate(kind, num_heads=4, hidden=3, pi_init=pi_init)
  v = nn.meta.unbox(gate.init(jax.random.key(1), x))
  np.testing.assert_allclose(jax.nn.sigmoid(v["params"]["bias"]), pi_init, rtol=1e-6)
  # with zero input, the gate equals pi_init exactly (up to float rounding)
  g = gate.apply(v, jnp.zeros_like(x))
  chex.assert_shape(g, (2, 5, 4, 4) if kind == "elementwise" else (2, 5, 4))
  np.testing.assert_allclose(g, pi_init, rtol=1e-6)
  shapes = jax.tree.map(jnp.shape, v["params"])
  expected = {"linear": {"kernel": (4, 4), "bias": (4,)},
              "all_heads_linear": {"kernel": (16, 4), "bias": (4,)},
              "elementwise": {"kernel": (16, 16), "bias": (16,)},
              "mlp": {"hidden_kernel": (4, 4, 3), "hidden_bias": (4, 3), "kernel": (4, 3),
                      "bias": (4,)}}[kind]
  assert dict(shapes) == expected


def test_gate_head_i_sees_only_its_slice():
  x = jax.random.normal(jax.random.key(0), (1, 3, 16))
  gate = HeadGate("linear", num_heads=4)
  v = gate.init(jax.random.key(1), x)
  g0 = gate.apply(v, x)
  g1 = gate.apply(v, x.at[..., 4:8].add(5.0))  # changes head 1's slice only
  np.testing.assert_allclose(g1[..., [0, 2, 3]], g0[..., [0, 2, 3]], rtol=1e-6)
  assert not np.allclose(g1[..., 1], g0[..., 1])


def test_gated_attention_multiplies_each_head_context():
  """out = W_o [g_1 ctx_1; ...; g_H ctx_H] + b with g the gate of each head and token, on a
  non-zero input (a zero input would make the context, and the check, zero)."""
  cfg = AttentionConfig(gate="linear", gate_pi_init=0.25)
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  mha = MultiHeadAttention(4, cfg)
  v = mha.init(jax.random.key(1), x)
  p = nn.meta.unbox(v["params"])
  out_gate = mha.apply({"params": p}, x)
  g = HeadGate("linear", 4, pi_init=0.25).apply({"params": p["gate"]}, x)  # B x T x H
  assert float(jnp.std(g)) > 1e-2  # gates differ between heads and tokens
  # the ungated module with the output projection replaced by identity gives the context
  eye = {"kernel": jnp.eye(16), "bias": jnp.zeros(16)}
  ctx = MultiHeadAttention(4, AttentionConfig()).apply(
      {"params": {**{k: w for k, w in p.items() if k != "gate"}, "out": eye}}, x)
  want = (ctx.reshape(2, 6, 4, 4) * g[..., None]).reshape(2, 6, 16) @ p["out"]["kernel"] \
      + p["out"]["bias"]
  np.testing.assert_allclose(out_gate, want, rtol=1e-5, atol=1e-6)


def _probs(c, step=None):
  m = build_model(c)
  images, tokens = _inputs(c, B=4)
  v = m.init(jax.random.key(0), images, tokens)
  _, inter = m.apply(v, images, tokens, step, mutable=["intermediates"])
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(inter)[0]:
    k = jax.tree_util.keystr(path)
    if "attn_probs" in k:
      T = x.shape[-1]
      allowed = np.tril(np.ones((T, T), bool)) if "textual" in k else np.ones((T, T), bool)
      out[k] = (np.asarray(x), allowed)
  return out


def test_clipped_attention_not_dead_at_init():
  """alpha=1 with gamma = -1/N (N = keys the row sees) keeps a good share of entries non-zero
  at init (every row keeps its largest entry by construction: max p >= 1/N > 1/(N+1), the clip
  threshold; the exact values are pinned in test_attention_reference.py)."""
  probs = _probs(micro_config("clipped_softmax"))
  assert len(probs) == 4  # 2 layers x 2 towers
  for k, (p, allowed) in probs.items():
    assert np.mean(p[..., allowed] > 0) > 0.25, k
    assert np.all(p[..., ~allowed] == 0)


def test_large_alpha_kills_attention_and_gamma_warmup_revives_it():
  c = micro_config("clipped_softmax")
  for t in (c.model.image, c.model.text):
    t.attention.alpha = 8.0
  dead = _probs(c)
  frac_dead_rows = np.mean([np.mean(p.max(-1) == 0) for p, _ in dead.values()])
  assert frac_dead_rows > 0.5  # near-uniform rows at init are clipped to all zeros
  for t in (c.model.image, c.model.text):
    t.attention.gamma_warmup_steps = 100
  alive = _probs(c, step=0)  # gamma ramps from 0: plain softmax at step 0
  for p, allowed in alive.values():
    assert np.all(p[..., allowed] > 0)


def test_bf16_compute_keeps_float32_params():
  c = micro_config(**{"model.dtype": "bfloat16"})
  m = build_model(c)
  images, tokens = _inputs(c)
  v = m.init(jax.random.key(0), images, tokens)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(v["params"])))
  zi, zt, *_ = m.apply(v, images, tokens)
  c32 = micro_config()
  zi32, zt32, *_ = build_model(c32).apply(v, images, tokens)
  assert zi.dtype == jnp.float32  # projection head in float
  # bf16 keeps 8 mantissa bits: unit embeddings move by up to ~1e-2 per entry (measured 4e-3 to
  # 9e-3 on three seeds), cosine to the float32 embedding >= 0.9998; and they do move (the
  # computation really ran in bf16)
  for z, z32 in ((zi, zi32), (zt, zt32)):
    np.testing.assert_allclose(z, z32, atol=2e-2)
    assert np.min(np.sum(np.asarray(z) * np.asarray(z32), -1)) > 0.9995
    assert np.abs(np.asarray(z) - np.asarray(z32)).max() > 1e-4


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_scan_matches_unrolled(remat):
  c = micro_config("gated")
  images, tokens = _inputs(c)
  plain = build_model(c)
  v = nn.meta.unbox(plain.init(jax.random.key(0), images, tokens))
  c.model.scan = True
  c.model.remat = remat
  scanned = build_model(c)
  vs = nn.meta.unbox(scanned.init(jax.random.key(0), images, tokens))
  assert _n_params(vs) == _n_params(v)

  def stack(tower):
    enc = v["params"][tower]["encoder"]
    blocks = [enc[f"block_{i}"] for i in range(c.model.image.depth)]
    return {"blocks": {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}}

  p2 = dict(v["params"])
  for tower in ("visual", "textual"):
    p2[tower] = dict(p2[tower], encoder=stack(tower))
  out = plain.apply(v, images, tokens)
  out_s = scanned.apply({"params": p2}, images, tokens)
  np.testing.assert_allclose(out[0], out_s[0], atol=1e-5)
  np.testing.assert_allclose(out[1], out_s[1], atol=1e-5)
  g = jax.grad(lambda p: jnp.sum(scanned.apply({"params": p}, images, tokens)[0][:, 0]))(p2)
  chex.assert_tree_all_finite(g)


def test_wrong_image_shape_is_a_clear_error():
  c = micro_config()
  m = build_model(c)
  images, tokens = _inputs(c)
  v = m.init(jax.random.key(0), images, tokens)
  with pytest.raises(ValueError, match=r"expects images of shape \(B, 16, 16, 3\), got \(3, 20, 20, 3\)"):
    m.apply(v, jnp.zeros((3, 20, 20, 3), jnp.uint8), method=m.encode_image)
  with pytest.raises(ValueError, match=r"expects tokens of shape \(B, 16\)"):
    m.apply(v, jnp.zeros((3, 77), jnp.int32), method=m.encode_text)
