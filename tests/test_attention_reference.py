"""The attention module against a numpy re-statement of the formulas (PAPERS.md sections 1, 3):
per-row key counts N_i (i + 1 in a causal tower), clipped softmax's gamma = -alpha / N_i,
softplus attention's q/k L2 normalisation, log(d) log(N_i) scale and re-weighting, the three
per-head gates and the per-channel (elementwise) gate, on random non-zero inputs where each of them changes the output."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx.nn.attention import AttentionConfig, MultiHeadAttention

B, T, D, H = 2, 7, 16, 4
K = D // H


def _np_norm(s, allowed, cfg):
  """Normalised weights of scores s (B x H x T x T), allowed: bool T x T."""
  n_i = allowed.sum(-1, keepdims=True).astype(np.float64)  # T x 1: keys row i sees
  if cfg.normalizer in ("softmax", "clipped_softmax"):
    e = np.where(allowed, np.exp(s - np.where(allowed, s, -np.inf).max(-1, keepdims=True)), 0)
    p = e / e.sum(-1, keepdims=True)
    if cfg.normalizer == "clipped_softmax":
      gamma = -cfg.alpha / n_i if cfg.alpha is not None else cfg.gamma
      p = np.where(allowed, np.clip((cfg.zeta - gamma) * p + gamma, 0, 1), 0)
    return p
  sp = np.where(allowed, np.log1p(np.exp(s)), 0)  # softplus; multiplicative mask
  a = sp / (sp.sum(-1, keepdims=True) + cfg.softplus_eps)
  o = np.where(n_i <= 1, 0.0, 1.0)
  b = np.where(allowed, np.maximum(n_i * a - o, 0) ** cfg.softplus_p, 0)
  tot = b.sum(-1, keepdims=True)
  return b / np.where(tot > 0, tot, 1)


def _np_gate(x, p, kind):
  x = x.reshape(B, T, H, K) if kind in ("linear", "mlp") else x
  if kind == "elementwise":  # Qiu et al. 2025: sigmoid(x W + b), one value per channel
    return (1 / (1 + np.exp(-(x @ p["kernel"] + p["bias"])))).reshape(B, T, H, K)
  if kind == "linear":
    logits = np.einsum("bthk,hk->bth", x, p["kernel"]) + p["bias"]
  elif kind == "mlp":
    h = np.maximum(np.einsum("bthk,hkn->bthn", x, p["hidden_kernel"]) + p["hidden_bias"], 0)
    logits = np.einsum("bthn,hn->bth", h, p["kernel"]) + p["bias"]
  else:
    logits = x @ p["kernel"] + p["bias"]
  return 1 / (1 + np.exp(-logits))


def np_attention(x, params, cfg, causal):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)

  def lin(name):
    return (x @ p[name]["kernel"] + p[name]["bias"]).reshape(B, T, H, K).transpose(0, 2, 1, 3)

  q, k, v = lin("query"), lin("key"), lin("value")
  allowed = np.tril(np.ones((T, T), bool)) if causal else np.ones((T, T), bool)
  n_i = allowed.sum(-1, keepdims=True).astype(np.float64)
  if cfg.normalizer == "softplus":
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    scale = math.log(K) * np.log(np.maximum(n_i, 2))
  else:
    scale = 1 / math.sqrt(K)
  s = q @ k.transpose(0, 1, 3, 2) * scale
  if cfg.normalizer == "softmax_sink":  # exp(s_ij) / (exp(b_h) + sum_k exp(s_ik))
    b = p["sink"][None, :, None, None]
    e = np.where(allowed, np.exp(s), 0)
    probs = e / (np.exp(b) + e.sum(-1, keepdims=True))
  else:
    probs = _np_norm(s, allowed, cfg)
  ctx = (probs @ v).transpose(0, 2, 1, 3)  # B x T x H x K
  if cfg.gate != "none":
    g = _np_gate(x, p["gate"], cfg.gate)
    ctx = ctx * (g if g.ndim == 4 else g[..., None])
  return ctx.reshape(B, T, D) @ p["out"]["kernel"] + p["out"]["bias"]


CASES = {
    "softmax": AttentionConfig(),
    "clipped_gamma": AttentionConfig(normalizer="clipped_softmax", gamma=-0.05),
    "clipped_alpha": AttentionConfig(normalizer="clipped_softmax", alpha=1.0),
    "clipped_alpha_zeta": AttentionConfig(normalizer="clipped_softmax", alpha=0.5, zeta=1.02),
    "softplus_p1": AttentionConfig(normalizer="softplus", softplus_p=1.0),
    "softplus_p3": AttentionConfig(normalizer="softplus", softplus_p=3.0),
    "gate_linear": AttentionConfig(gate="linear", gate_pi_init=0.25),
    "gate_mlp": AttentionConfig(gate="mlp", gate_hidden=3),
    "gate_all_heads": AttentionConfig(gate="all_heads_linear"),
    "gate_elementwise": AttentionConfig(gate="elementwise", gate_pi_init=0.3),
    "sink_elementwise": AttentionConfig(normalizer="softmax_sink", sink_init=0.5,
                                        gate="elementwise"),
    "clipped_alpha_gated": AttentionConfig(normalizer="clipped_softmax", alpha=1.0, gate="linear"),
}


def _module_and_params(cfg, causal, seed=0):
  x = jax.random.normal(jax.random.key(seed), (B, T, D)) * 1.5
  mha = MultiHeadAttention(H, cfg, causal=causal)
  params = nn.meta.unbox(mha.init(jax.random.key(seed + 1), x)["params"])
  # non-zero biases everywhere, so a gate or a bias that is ignored changes the result
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(7), a.shape), params)
  return x, mha, params


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_equals_numpy_formulas(case, causal):
  cfg = CASES[case]
  x, mha, params = _module_and_params(cfg, causal)
  got = np.asarray(mha.apply({"params": params}, x))
  want = np_attention(x, params, cfg, causal)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_per_row_key_counts_matter_in_the_causal_tower():
  """The reference is sensitive to N_i: with every row 'seeing' all T keys the clipped and
  softplus probabilities differ from the true ones (so the test above pins N_i = i + 1)."""
  for case in ("clipped_alpha", "softplus_p1"):
    cfg = CASES[case]
    x, mha, params = _module_and_params(cfg, True)
    got = np.asarray(mha.apply({"params": params}, x))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xs = np.asarray(x, np.float64)

    def lin(name):
      return (xs @ p[name]["kernel"] + p[name]["bias"]).reshape(B, T, H, K).transpose(0, 2, 1, 3)

    q, k, v = lin("query"), lin("key"), lin("value")
    allowed = np.tril(np.ones((T, T), bool))
    if cfg.normalizer == "softplus":
      q = q / np.linalg.norm(q, axis=-1, keepdims=True)
      k = k / np.linalg.norm(k, axis=-1, keepdims=True)
      s = q @ k.transpose(0, 1, 3, 2) * math.log(K) * math.log(T)  # wrong: N = T for every row
      sp = np.where(allowed, np.log1p(np.exp(s)), 0)
      a = sp / (sp.sum(-1, keepdims=True) + cfg.softplus_eps)
      b = np.where(allowed, np.maximum(T * a - 1, 0), 0)
      probs = b / np.maximum(b.sum(-1, keepdims=True), 1e-30)
    else:
      s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(K)
      e = np.where(allowed, np.exp(s), 0)
      probs = np.where(allowed, np.clip((1 + 1 / T) * e / e.sum(-1, keepdims=True) - 1 / T, 0, 1), 0)
    wrong = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, D) @ p["out"]["kernel"] + p["out"]["bias"]
    assert np.abs(got - wrong).max() > 1e-2, case


def test_gate_changes_the_output_on_non_zero_input():
  """Gated attention is not the ungated module times a constant: each token's gate differs."""
  cfg = CASES["gate_linear"]
  x, mha, params = _module_and_params(cfg, False)
  gated = np.asarray(mha.apply({"params": params}, x))
  ungated = np.asarray(MultiHeadAttention(H, AttentionConfig()).apply(
      {"params": {k: v for k, v in params.items() if k != "gate"}}, x))
  bias = np.asarray(params["out"]["bias"])
  ratio = (gated - bias) / (ungated - bias)
  assert np.std(ratio) > 1e-2  # a constant 0.25 would give std 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_matmul_gradients_equal_autodiff_of_einsum(dtype):
  """The two attention matmuls carry their own backward pass (each gradient a matmul whose
  contracted axis is minor, which XLA's CPU matmul library takes without a slow path); it
  must equal autodiff of the plain einsums, here with T != S so a swapped axis shows."""
  from qtx.nn import attention
  Bq, Tq, S, Hq, Kq = 2, 5, 7, 3, 4
  ks = jax.random.split(jax.random.key(3), 5)
  q = jax.random.normal(ks[0], (Bq, Tq, Hq, Kq)).astype(dtype)
  k = jax.random.normal(ks[1], (Bq, S, Hq, Kq)).astype(dtype)
  v = jax.random.normal(ks[2], (Bq, S, Hq, Kq)).astype(dtype)
  p = jax.nn.softmax(jax.random.normal(ks[3], (Bq, Hq, Tq, S))).astype(dtype)
  g_s = jax.random.normal(ks[4], (Bq, Hq, Tq, S)).astype(dtype)
  g_c = jax.random.normal(ks[4], (Bq, Tq, Hq, Kq)).astype(dtype)
  for fn, ref, args, g in [
      (attention._scores, lambda a, b: jnp.einsum("bthk,bshk->bhts", a, b), (q, k), g_s),
      (attention._context, lambda a, b: jnp.einsum("bhts,bshk->bthk", a, b), (p, v), g_c)]:
    out, vjp = jax.vjp(fn, *args)
    out_ref, vjp_ref = jax.vjp(ref, *args)
    np.testing.assert_array_equal(out, out_ref)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    for got, want in zip(vjp(g), vjp_ref(g)):
      assert got.dtype == want.dtype and got.shape == want.shape
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                 rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(), (1, 1, 5, 1), (2, 1, 5, 1), (2, 3, 5, 1), (3, 1, 1),
                                   (5, 1)])
def test_score_scale_moved_onto_q_equals_scaling_the_scores(shape):
  """The attention multiplies q by the score scale instead of the T x S scores; for any
  scale constant along the keys (scalar, per query row, per batch, per head) the scores must
  equal q.k * scale, and a scale that varies along the keys is refused."""
  from qtx.nn import attention
  Bq, Tq, S, Hq, Kq = 2, 5, 7, 3, 4
  ks = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(ks[0], (Bq, Tq, Hq, Kq))
  k = jax.random.normal(ks[1], (Bq, S, Hq, Kq))
  scale = jax.random.uniform(ks[2], shape, minval=0.1, maxval=3.0)
  got = jnp.einsum("bthk,bshk->bhts", q * attention._to_query_layout(scale), k)
  want = jnp.einsum("bthk,bshk->bhts", q, k) * scale
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
  if shape:
    with pytest.raises(ValueError, match="varies along the keys"):
      attention._to_query_layout(jnp.ones(shape[:-1] + (S,)))
