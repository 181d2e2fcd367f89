"""A plain numpy (float64) forward of OpenAI's CLIP ViT, written from the architecture and read
directly from a state_dict in OpenAI's names and torch layouts. It shares no code with qtx, so
weight import, the model and the outlier statistics can be checked against it.

Architecture (Radford et al. 2021; the released `clip/model.py` layout):
  image: conv1 (W, C, P, P), stride P, no bias -> [class_embedding; patches] + positional ->
         ln_pre -> residual blocks -> ln_post(x[CLS]) @ proj
  text:  token_embedding[tokens] + positional_embedding -> causal residual blocks ->
         ln_final -> x[argmax(tokens)] @ text_projection
  block: x + out_proj(attention(ln_1(x))); then x + c_proj(act(c_fc(ln_2(x))))
  attention: [q; k; v] = x @ in_proj_weight.T + in_proj_bias, H heads of width W / H,
         softmax(q k^T / sqrt(W / H) (+ causal -inf)) v, heads concatenated.
  LayerNorm: eps 1e-5, biased variance. Embeddings are L2-normalised; logits = exp(s) zi zt^T.
"""
import math

import numpy as np

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _erf(x):
  return np.vectorize(math.erf, otypes=[np.float64])(x)


ACTIVATIONS = {
    "quick_gelu": lambda x: x / (1.0 + np.exp(-1.702 * x)),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi)
                                                    * (x + 0.044715 * x ** 3))),
}


def layer_norm(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _softmax(s):
  s = s - s.max(-1, keepdims=True)
  e = np.exp(s)
  return e / e.sum(-1, keepdims=True)


def attention(x_BxTxD, sd, p, heads, causal):
  B, T, D = x_BxTxD.shape
  K = D // heads
  w, b = sd[p + "in_proj_weight"], sd[p + "in_proj_bias"]
  qkv = x_BxTxD @ w.T + b
  q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, T, heads, K).transpose(0, 2, 1, 3)
             for i in range(3))
  s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(K)
  if causal:
    s = s + np.triu(np.full((T, T), -np.inf), 1)
  ctx = (_softmax(s) @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
  return ctx @ sd[p + "out_proj.weight"].T + sd[p + "out_proj.bias"]


def transformer(x, sd, prefix, heads, causal, activation):
  """Residual blocks; returns (x, [{'ffn_out', 'block_out'} per block])."""
  act = ACTIVATIONS[activation]
  inter = []
  i = 0
  while f"{prefix}transformer.resblocks.{i}.ln_1.weight" in sd:
    p = f"{prefix}transformer.resblocks.{i}."
    h = layer_norm(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
    x = x + attention(h, sd, p + "attn.", heads, causal)
    h = layer_norm(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
    h = act(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
    ffn = h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    x = x + ffn
    inter.append({"ffn_out": ffn, "block_out": x})
    i += 1
  return x, inter


def encode_image(sd, images_BxHxWxC, heads, activation="quick_gelu"):
  """uint8 images -> (L2-normalised embedding B x E, per-block intermediates)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = (images_BxHxWxC / 255.0 - MEAN) / STD  # B x H x W x C
  conv = sd["visual.conv1.weight"]  # W x C x P x P
  Wd, C, P, _ = conv.shape
  B, Hh, Ww, _ = x.shape
  g_h, g_w = Hh // P, Ww // P
  # a stride-P convolution: every output position is the dot product of one P x P patch
  patches = np.zeros((B, g_h * g_w, Wd))
  for i in range(g_h):
    for j in range(g_w):
      patch = x[:, i * P:(i + 1) * P, j * P:(j + 1) * P, :]  # B x P x P x C
      patches[:, i * g_w + j] = np.einsum("bpqc,wcpq->bw", patch, conv)
  cls = np.broadcast_to(sd["visual.class_embedding"], (B, 1, Wd))
  x = np.concatenate([cls, patches], 1) + sd["visual.positional_embedding"]
  if "visual.ln_pre.weight" in sd:
    x = layer_norm(x, sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
  x, inter = transformer(x, sd, "visual.", heads, False, activation)
  z = layer_norm(x[:, 0], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
  return z / np.linalg.norm(z, axis=-1, keepdims=True), inter


def encode_text(sd, tokens_BxT, heads, activation="quick_gelu"):
  """int tokens -> (L2-normalised embedding B x E, per-block intermediates)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = sd["token_embedding.weight"][tokens_BxT] + sd["positional_embedding"]
  x, inter = transformer(x, sd, "", heads, True, activation)
  x = layer_norm(x, sd["ln_final.weight"], sd["ln_final.bias"])
  z = x[np.arange(len(tokens_BxT)), np.argmax(tokens_BxT, -1)] @ sd["text_projection"]
  return z / np.linalg.norm(z, axis=-1, keepdims=True), inter


def logits(sd, zi, zt):
  return math.exp(float(sd["logit_scale"])) * zi @ zt.T


def kurtosis(x):
  x = np.asarray(x, np.float64).ravel()
  d = x - x.mean()
  return np.mean(d ** 4) / np.mean(d ** 2) ** 2


def outlier_stats(inter, lengths):
  """{'block_<i>/<tensor>': (mean inf-norm, mean kurtosis)} over sequences, counting the
  first lengths[b] tokens of sequence b (the paper's per-sequence statistics)."""
  out = {}
  for i, tensors in enumerate(inter):
    for name, v in tensors.items():
      rows = [v[b, :n] for b, n in enumerate(lengths)]
      out[f"block_{i}/{name}"] = (np.mean([np.abs(r).max() for r in rows]),
                                  np.mean([kurtosis(r) for r in rows]))
  return out
