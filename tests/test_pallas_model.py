"""impl='pallas' in the attention module: a tiny model's loss and every parameter's gradient
equal impl='xla' (so the Pallas backward inside the model is what is compared)."""
import chex
import jax
import numpy as np
import pytest

from conftest import micro_config
from qtx import parallel
from qtx import run as run_lib
from qtx.modes import train as train_mode


def _batch(c):
  rng = np.random.default_rng(0)
  s = c.model.image.image_size
  tokens = rng.integers(1, 1000, (c.train.batch_size, c.model.text.context_length))
  tokens[:, 6] = 49407
  return {"image": rng.integers(0, 256, (c.train.batch_size, s, s, 3), dtype=np.uint8),
          "tokens": tokens.astype(np.int32)}


def _loss_and_grads(c):
  s = run_lib.build(c, train=True)
  state = run_lib.init_state(s, 0)
  batch = parallel.global_batch(_batch(c), s.mesh, s.rules)
  loss, grads = jax.jit(jax.value_and_grad(
      lambda p: train_mode.loss_fn(s.model, c, p, batch, 0)[0]))(state.params)
  return float(loss), jax.device_get(grads)


@pytest.mark.parametrize("preset,gamma", [("gated", None), ("clipped_softmax", -0.03),
                                          ("sink_and_softplus", None)])
def test_loss_and_gradients_pallas_equal_xla(preset, gamma):
  results = {}
  for impl in ("xla", "pallas"):
    # sink_and_softplus: the sink kernel in the image tower, the softplus kernel in the text
    c = micro_config("softmax" if preset == "sink_and_softplus" else preset,
                     **{"train.batch_size": 4})
    if preset == "sink_and_softplus":
      c.model.image.attention.normalizer = "softmax_sink"
      c.model.text.attention.normalizer = "softplus"
    for t in (c.model.image, c.model.text):
      t.depth = 1  # interpret-mode Pallas is slow on CPU
      t.attention.impl = impl
      if gamma is not None:
        t.attention.alpha = None
        t.attention.gamma = gamma
    results[impl] = _loss_and_grads(c)
  np.testing.assert_allclose(results["pallas"][0], results["xla"][0], rtol=1e-5)
  g_xla, g_pallas = results["xla"][1], results["pallas"][1]
  if preset == "sink_and_softplus":  # the learned sink logits get their gradient from the kernel
    g = g_pallas["visual"]["encoder"]["block_0"]["attn"]["sink"]
    assert np.abs(g).min() > 1e-6
    np.testing.assert_allclose(g, g_xla["visual"]["encoder"]["block_0"]["attn"]["sink"],
                               rtol=1e-4)
  # the attention weights get real gradients (the comparison below is not 0 == 0) ...
  for tower in ("visual", "textual"):
    for name in ("query", "value", "out"):
      g = g_xla[tower]["encoder"]["block_0"]["attn"][name]["kernel"]
      assert np.abs(g).max() > 1e-4, (tower, name)
  # ... and both backward passes give them alike, to float32 rounding of the sums
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g_xla))
  chex.assert_trees_all_close(g_pallas, g_xla, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("normalizer", ["clipped_softmax", "softmax_sink", "softplus"])
def test_quantized_attention_with_pallas_equals_xla(normalizer):
  """Under fake quantization the scores are quantized before the normalizer, so the fused
  kernel cannot run: clipped softmax takes the two-pass softmax kernel, the sink and softplus
  (arguments that kernel does not take) the XLA normalizer. Either way the quantized module
  computes what impl='xla' does."""
  import flax.linen as nn
  import jax.numpy as jnp
  from qtx.nn.attention import AttentionConfig, MultiHeadAttention
  from qtx.quant.layers import QUANT_STATS, QuantConfig
  x = jax.random.normal(jax.random.key(0), (2, 9, 16))
  kw = {"gamma": -0.05} if normalizer == "clipped_softmax" else {}
  quant = QuantConfig(enabled=True)
  out = {}
  for impl in ("xla", "pallas"):
    mha = MultiHeadAttention(2, AttentionConfig(normalizer=normalizer, impl=impl, **kw),
                             causal=True, quant=quant)
    v = nn.meta.unbox(mha.init(jax.random.key(1), x))
    _, upd = mha.apply(v, x, mutable=[QUANT_STATS])
    out[impl] = mha.apply({"params": v["params"], **upd}, x)
  np.testing.assert_allclose(out["pallas"], out["xla"], rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(out["xla"]))) > 1e-3
