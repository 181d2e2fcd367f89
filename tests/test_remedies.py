"""The attention-sink remedies besides softmax_sink (issue: every remedy in one protocol):
the per-channel elementwise gate (Qiu et al. 2025), register tokens (Darcet et al. 2023) and
Muon on the hidden matrices (Jordan et al. 2024; Liu et al. 2025), each against a numpy
re-statement of its formula, with gradients checked and a short training whose loss falls."""
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import micro_config

from qtx import config_lib, metrics, modes, optim
from qtx import run as run_lib
from qtx.nn.vit import VisionTower, normalize_images, patchify


# ----------------------------------------------------------------------------- elementwise gate

def test_elementwise_gate_gradients_match_finite_differences():
  from qtx.nn.attention import AttentionConfig, MultiHeadAttention
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  mha = MultiHeadAttention(2, AttentionConfig(gate="elementwise"))
  params = nn.meta.unbox(mha.init(jax.random.key(1), x)["params"])
  f = lambda g: jnp.sum(jnp.sin(mha.apply({"params": {**params, "gate": g}}, x)))
  grads = jax.grad(f)(params["gate"])
  # central differences on a few kernel entries and the bias
  eps = 1e-2
  for name, idx in (("kernel", (0, 0)), ("kernel", (3, 5)), ("bias", (2,))):
    plus = jax.tree.map(lambda a: a, params["gate"])
    minus = jax.tree.map(lambda a: a, params["gate"])
    plus[name] = plus[name].at[idx].add(eps)
    minus[name] = minus[name].at[idx].add(-eps)
    fd = (f(plus) - f(minus)) / (2 * eps)
    np.testing.assert_allclose(grads[name][idx], fd, rtol=2e-2, atol=1e-4)


def test_elementwise_gate_is_one_value_per_channel():
  """Channel c of head h is scaled by its own sigmoid(x W[:, h*K + c] + b): changing one column
  of W changes that one output channel of the gated context only."""
  from qtx.nn.attention import HeadGate
  x = jax.random.normal(jax.random.key(0), (1, 3, 16))
  gate = HeadGate("elementwise", num_heads=4)
  v = nn.meta.unbox(gate.init(jax.random.key(1), x))
  g0 = gate.apply(v, x)
  chex.assert_shape(g0, (1, 3, 4, 4))
  w = np.asarray(v["params"]["kernel"]).copy()
  w[:, 6] += 1.0  # head 1, channel 2
  g1 = gate.apply({"params": {**v["params"], "kernel": jnp.asarray(w)}}, x)
  changed = np.abs(np.asarray(g1 - g0)).reshape(3, 16).max(0) > 1e-7
  assert changed.tolist() == [i == 6 for i in range(16)]
  want = 1 / (1 + np.exp(-(np.asarray(x, np.float64) @ w + np.asarray(v["params"]["bias"]))))
  np.testing.assert_allclose(np.asarray(g1).reshape(1, 3, 16), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- registers

def _tower(registers, **kw):
  return VisionTower(image_size=16, patch_size=4, width=32, depth=2, heads=2, mlp_dim=64,
                     embed_dim=16, registers=registers, **kw)


def test_registers_are_appended_without_positions_and_dropped_at_the_output():
  images = jax.random.randint(jax.random.key(0), (2, 16, 16, 3), 0, 256).astype(jnp.uint8)
  tower = _tower(3)
  params = nn.meta.unbox(tower.init(jax.random.key(1), images)["params"])
  chex.assert_shape(params["registers"], (3, 32))
  chex.assert_shape(params["pos_embed"], (17, 32))  # positions for class + 16 patches only
  seen = {}

  def grab(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.name == "encoder" and context.method_name == "__call__":
      seen["in"], seen["out"] = args[0], out
    return out

  with nn.intercept_methods(grab):
    emb = tower.apply({"params": params}, images)
  # the encoder input, re-built by hand: [cls + p0; patches W + p; r_1..r_N], then ln_pre
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(patchify(normalize_images(images), 4), np.float64) @ p["patch_embed"]["kernel"]
  seq = np.concatenate([np.broadcast_to(p["cls_token"], (2, 1, 32)), x], 1) + p["pos_embed"]
  seq = np.concatenate([seq, np.broadcast_to(p["registers"], (2, 3, 32))], 1)
  mu, var = seq.mean(-1, keepdims=True), seq.var(-1, keepdims=True)
  seq = (seq - mu) / np.sqrt(var + 1e-5) * p["ln_pre"]["scale"] + p["ln_pre"]["bias"]
  chex.assert_shape(seen["in"], (2, 20, 32))
  np.testing.assert_allclose(seen["in"], seq, rtol=1e-4, atol=1e-4)
  # pooled from the class token (position 0) of the encoder output
  h = np.asarray(seen["out"][:, 0], np.float64)
  h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
  h = h * p["ln_post"]["scale"] + p["ln_post"]["bias"]
  np.testing.assert_allclose(emb, h @ p["proj"]["kernel"], rtol=1e-4, atol=1e-5)
  # the registers are attended: they change the class token and receive a gradient
  g = jax.grad(lambda q: jnp.sum(tower.apply({"params": q}, images) ** 2))(params)
  assert float(jnp.min(jnp.abs(g["registers"]).sum(-1))) > 0
  # (a random change: ln_pre removes a constant shift of a token)
  q = {**params, "registers": params["registers"] + jax.random.normal(jax.random.key(5), (3, 32))}
  assert not np.allclose(tower.apply({"params": q}, images), emb, atol=1e-5)


def test_registers_zero_is_the_plain_tower():
  images = jax.random.randint(jax.random.key(0), (2, 16, 16, 3), 0, 256).astype(jnp.uint8)
  a, b = _tower(0), VisionTower(image_size=16, patch_size=4, width=32, depth=2, heads=2,
                                mlp_dim=64, embed_dim=16)
  pa = a.init(jax.random.key(1), images)["params"]
  assert "registers" not in pa
  np.testing.assert_array_equal(a.apply({"params": pa}, images), b.apply({"params": pa}, images))


@pytest.mark.parametrize("bad", [-1, True])
def test_bad_register_count_is_named(bad):
  c = micro_config()
  c.model.image.registers = bad
  with pytest.raises(ValueError, match="model.image.registers"):
    config_lib.validate(c)


# ----------------------------------------------------------------------------- Muon

NS = (3.4445, -4.775, 2.0315)


def _np_newton_schulz(g, steps=5, eps=1e-8):
  """Jordan et al. 2024: X_0 = G / ||G||_F (wide orientation), X <- aX + b(XX^T)X + c(XX^T)^2 X."""
  x = np.asarray(g, np.float64)
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  x = x / (np.linalg.norm(x) + eps)
  a, b, c = NS
  for _ in range(steps):
    A = x @ x.T
    x = a * x + (b * A + c * A @ A) @ x
  return x.T if tall else x


def _np_muon_updates(grads, lr, wd, p0, beta=0.95):
  """Muon updates (Nesterov momentum with optax's bias correction, Newton-Schulz, the RMS
  scale 0.2 sqrt(max(fan_in, fan_out)) of Liu et al. 2025, decoupled weight decay)."""
  m, p, out = np.zeros_like(p0), p0.copy(), []
  for t, g in enumerate(grads, start=1):
    m = beta * m + (1 - beta) * g
    u = beta * m / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
    o = _np_newton_schulz(u) * 0.2 * math.sqrt(max(p0.shape))
    p = p - lr * (o + wd * p)
    out.append(p.copy())
  return out


def _np_adamw(grads, lr, wd, p0, b1, b2, eps=1e-8, decay=True):
  m = v = np.zeros_like(p0)
  p, out = p0.copy(), []
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    u = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    p = p - lr * (u + (wd * p if decay else 0))
    out.append(p.copy())
  return out


def _opt_config(scan=False):
  c = micro_config(**{"train.optimizer": "muon", "train.grad_clip": 0.0, "train.warmup_steps": 0,
                      "train.total_steps": 1000, "train.end_lr_fraction": 1.0,
                      "train.lr": 0.02, "train.weight_decay": 0.1, "model.scan": scan})
  return c


def test_muon_updates_hidden_matrices_and_adamw_the_rest():
  """Three steps of train.optimizer=muon on a parameter tree shaped like a tower: the blocks'
  kernels follow the numpy Muon, everything else the numpy AdamW (no decay below 2-D)."""
  c = _opt_config()
  rng = np.random.default_rng(0)
  params = {"visual": {"encoder": {"block_0": {
                "attn": {"query": {"kernel": rng.normal(size=(8, 6)), "bias": rng.normal(size=6)}},
                "mlp": {"fc1": {"kernel": rng.normal(size=(6, 10))}},
                "attn_gate": {"gate": {"kernel": rng.normal(size=(8, 4))}}}},
                "patch_embed": {"kernel": rng.normal(size=(12, 8))},
                "registers": rng.normal(size=(2, 8))},
            "logit_scale": np.float64(2.0)}
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  grads = [jax.tree.map(lambda a: np.asarray(rng.normal(size=a.shape), np.float32), params)
           for _ in range(3)]
  tx = optim.make_optimizer(c)
  state = tx.init(params)
  p, got = params, []
  for g in grads:
    upd, state = tx.update(g, state, p)
    p = jax.tree.map(lambda a, u: np.asarray(a + u), p, upd)
    got.append(p)
  path = lambda t, *ks: [x for x in [t] for k in ks for x in [x[k]]][-1]
  muon_keys = [("visual", "encoder", "block_0", "attn", "query", "kernel"),
               ("visual", "encoder", "block_0", "mlp", "fc1", "kernel")]
  adam_keys = [("visual", "encoder", "block_0", "attn", "query", "bias"),
               ("visual", "encoder", "block_0", "attn_gate", "gate", "kernel"),
               ("visual", "patch_embed", "kernel"), ("visual", "registers"), ("logit_scale",)]
  for keys in muon_keys:
    want = _np_muon_updates([np.asarray(path(g, *keys), np.float64) for g in grads], 0.02, 0.1,
                            np.asarray(path(params, *keys), np.float64))
    for t in range(3):
      np.testing.assert_allclose(path(got[t], *keys), want[t], rtol=2e-4, atol=2e-5,
                                 err_msg=str(keys))
  for keys in adam_keys:
    p0 = np.asarray(path(params, *keys), np.float64)
    want = _np_adamw([np.asarray(path(g, *keys), np.float64) for g in grads], 0.02, 0.1, p0,
                     c.train.b1, c.train.b2, decay=p0.ndim >= 2)
    for t in range(3):
      np.testing.assert_allclose(path(got[t], *keys), want[t], rtol=2e-5, atol=2e-6,
                                 err_msg=str(keys))


def test_muon_orthogonalises_each_scanned_layer_on_its_own():
  """Under model.scan the stacked (L, D, F) kernel is L matrices: its update equals the
  unstacked updates of each layer."""
  rng = np.random.default_rng(1)
  stacked = {"visual": {"encoder": {"blocks": {"mlp": {"fc1": {
      "kernel": np.asarray(rng.normal(size=(3, 6, 10)), np.float32)}}}}}}
  g = jax.tree.map(lambda a: np.asarray(rng.normal(size=a.shape), np.float32), stacked)
  tx = optim.make_optimizer(_opt_config(scan=True))
  upd, _ = tx.update(g, tx.init(stacked), stacked)
  u = np.asarray(upd["visual"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"])
  k = stacked["visual"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"]
  gk = g["visual"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"]
  for layer in range(3):
    want = _np_muon_updates([gk[layer].astype(np.float64)], 0.02, 0.1,
                            k[layer].astype(np.float64))[0] - k[layer]
    np.testing.assert_allclose(u[layer], want, rtol=2e-4, atol=2e-5)


def test_muon_labels_of_the_clip_model():
  c = micro_config(**{"train.optimizer": "muon"})
  run = run_lib.build(c, train=True)
  labels = optim.param_labels(run.abstract_params)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
  muon = sorted(k for k, v in flat.items() if v == "muon")
  # q, k, v, out and the two MLP matrices of each of the 2 + 2 blocks
  assert len(muon) == 6 * 4, muon
  assert all("encoder" in k and k.endswith("['kernel']") for k in muon)
  assert flat["['visual']['patch_embed']['kernel']"] == "adamw"
  assert flat["['textual']['token_embed']"] == "adamw"


def test_unknown_optimizer_is_named():
  c = micro_config(**{"train.optimizer": "sgd"})
  with pytest.raises(ValueError, match="train.optimizer 'sgd'"):
    config_lib.validate(c)


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("change", [
    {"train.optimizer": "muon"},
    {"model.image.registers": 4},
    {"model.image.attention.gate": "elementwise", "model.text.attention.gate": "elementwise"},
], ids=["muon", "registers", "elementwise_gate"])
def test_remedy_trains_and_its_loss_falls(tmp_path, change):
  c = micro_config(**{"train.total_steps": 16, "train.log_every": 2, "train.lr": 3e-3, **change})
  out = modes.run(c, str(tmp_path))
  losses = [r["train/loss"] for r in metrics.read(str(tmp_path)) if "train/loss" in r]
  assert losses[-1] < losses[0] - 0.2, losses
  assert np.isfinite(out["train/loss"])
