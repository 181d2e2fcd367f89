"""Where the attention of a CLIP model's heads goes: the signature of "no-op" heads.

A head that must leave the residual unchanged puts its attention where it writes nothing: an
explicit sink (softmax_sink), mass clipped away (clipped softmax), or a token whose value is
small, typically the first token or the plain background (Bondarenko et al. 2023, section 3;
Gu et al. 2024, "When Attention Sink Emerges in Language Models"). Over an eval set, for each
layer and head, with p_ij the attention probabilities of query row i (only the rows the output
depends on: text up to its end-of-text token) and E the mean over sequences, rows, heads and
layers:

  attn/<tower>/null_mass        E[1 - sum_j p_ij]: the mass given to no key (0 for softmax)
  attn/<tower>/first_key_mass   E[p_i0]: the class token (image) / start-of-text token (text)
  attn/<tower>/top_key_mass     E over sequences, heads, layers of max_j mean_i p_ij: the mass
                                of the key the head attends most (Gu et al.'s sink statistic)
  attn/image/background_mass    E[sum over background patches j of p_ij]: patches whose pixels
                                are uniform (max - min <= data-range/32 per channel)
  attn/image/register_mass      E[sum over register tokens j of p_ij] (model.image.registers)

How much of the attention an 8-bit probability grid of [0, 1] erases (steps of 1/255; values
below half a step round to 0), over the entries each row sees. This is the per-tensor grid of
a layer whose largest probability is 1 (the calibrated range), as in every layer of the
clipped-softmax models measured here; a layer whose probabilities stay lower gets a finer grid
and loses less than these statistics say:
  attn/<tower>/prob_zero_fraction      entries exactly 0 (clipped softmax's clipped keys)
  attn/<tower>/prob_tiny_fraction      non-zero entries below 1/510, of the non-zero entries
  attn/<tower>/prob_tiny_mass          their summed probability per row (mass lost to rounding)

With `filler_ids` (token ids of words that say nothing, data.synthetic.filler) the text tower
also reports the start-token mass of filler queries and of content queries (the other rows
after the start token), over all layers and per layer:
  attn/text/first_key_mass_filler[/layer_<l>], attn/text/first_key_mass_content[/layer_<l>]
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qtx.nn.clip import CLIP
from qtx.nn.text import valid_tokens
from qtx.nn.vit import patchify
from qtx.quant import outliers

BACKGROUND_RANGE = 8  # uint8 levels: a patch whose every channel spans at most this is plain


_HAS_ROWS = "#has_rows"  # per-sequence indicator of a query group (internal)
# Half a step of the 8-bit grid of [0, 1]: smaller probabilities round to 0.
TINY_PROB = 1.0 / 510.0


def background_patches(images_BxHxWxC, patch_size: int):
  """B x P bool: patches whose pixel range is <= BACKGROUND_RANGE in every channel."""
  x = jnp.asarray(images_BxHxWxC)
  scale = 1.0 if x.dtype == jnp.uint8 else 255.0
  B, H, W, C = x.shape
  p = patchify(x.astype(jnp.float32) * scale, patch_size).reshape(B, -1, patch_size ** 2, C)
  return jnp.all(p.max(2) - p.min(2) <= BACKGROUND_RANGE, axis=-1)


def seen_entries(tower: str, x, T: int, S: int):
  """B x 1 x T x S bool: the probabilities the statistics count, the entries each query row the
  output depends on can attend (text: rows up to end-of-text, causal keys; image: all)."""
  if tower == "text":
    rows = valid_tokens(x)
    causal = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]  # row i sees keys 0..i
    return rows[:, None, :, None] & causal[None, None]
  return jnp.ones((x.shape[0], 1, T, S), bool)


def _probs(intermediates: Mapping[str, Any], tower_module: str) -> list[jax.Array]:
  enc = intermediates[tower_module]["encoder"]
  scanned = ("blocks",) if "blocks" in enc else ()
  flat = outliers.flatten_intermediates(enc, scanned=scanned, include=("attn_probs",))
  return [flat[k] for k in sorted(flat, key=outliers.layer_order)]


def _row_means(p_BxHxTxS, rows_BxT):
  """Means over the valid rows: (mass to no key, first key, per-key) per sequence and head."""
  w = rows_BxT[:, None, :, None].astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w, axis=2), 1.0)  # B x 1 x 1
  p = p_BxHxTxS.astype(jnp.float32) * w
  null = jnp.sum(w[..., 0] - jnp.sum(p, -1), -1) / n[..., 0]  # B x H
  per_key = jnp.sum(p, axis=2) / n  # B x H x S
  return null, per_key


def make_mass_fn(model: CLIP, tower: str, patch_size: int = 0, registers: int = 0,
                 variables_extra: dict | None = None, filler_ids=()) -> Callable:
  """Jitted (params, x) -> {statistic: per-sequence values (B,)} of one tower (module
  docstring), each a mean over layers and heads."""
  method = CLIP.encode_image if tower == "image" else CLIP.encode_text
  module = "visual" if tower == "image" else "textual"
  extra = dict(variables_extra or {})

  def fn(params, x):
    _, state = model.apply({"params": params, **extra}, x, method=method,
                           mutable=["intermediates"])
    probs = _probs(state["intermediates"], module)
    if not probs:
      raise ValueError("the model sowed no attention probabilities (intermediates "
                       "'attn_probs'); attention mass needs the XLA attention path")
    B, _, T, S = probs[0].shape
    rows = valid_tokens(x) if tower == "text" else jnp.ones((B, T), bool)
    out = {"null_mass": [], "first_key_mass": [], "top_key_mass": []}
    if tower == "image":
      out["background_mass"] = []
      bg = background_patches(x, patch_size)  # B x P, keys 1..P
      keys_bg = jnp.zeros((B, S), bool).at[:, 1:1 + bg.shape[1]].set(bg)
      if registers:
        out["register_mass"] = []
    groups = {}
    if tower == "text" and len(filler_ids):
      is_filler = jnp.isin(x, jnp.asarray(filler_ids, x.dtype))
      after_start = jnp.arange(T)[None, :] > 0
      groups = {"filler": rows & is_filler, "content": rows & ~is_filler & after_start}
    for l, p in enumerate(probs):
      for g, g_rows in groups.items():
        mass = _row_means(p, g_rows)[1][..., 0].mean(-1)
        out.setdefault(f"first_key_mass_{g}", []).append(mass)
        out[f"first_key_mass_{g}/layer_{l}"] = [mass]
    for g, g_rows in groups.items():  # sequences without such rows are left out of the mean
      out[f"first_key_mass_{g}" + _HAS_ROWS] = [jnp.any(g_rows, -1).astype(jnp.float32)]
    seen = seen_entries(tower, x, T, S)
    for k in ("prob_zero_fraction", "prob_tiny_fraction", "prob_tiny_mass"):
      out[k] = []
    for p in probs:
      p32 = p.astype(jnp.float32)
      zero = seen & (p32 == 0)
      tiny = seen & (p32 > 0) & (p32 < TINY_PROB)
      n_seen = jnp.maximum(jnp.sum(seen, (1, 2, 3)) * p.shape[1], 1)
      n_nonzero = jnp.maximum(jnp.sum(seen & (p32 > 0), (1, 2, 3)), 1)
      n_rows = jnp.maximum(jnp.sum(rows, -1) * p.shape[1], 1)
      out["prob_zero_fraction"].append(jnp.sum(zero, (1, 2, 3)) / n_seen)
      out["prob_tiny_fraction"].append(jnp.sum(tiny, (1, 2, 3)) / n_nonzero)
      out["prob_tiny_mass"].append(jnp.sum(jnp.where(tiny, p32, 0.0), (1, 2, 3)) / n_rows)
    for p in probs:
      null, per_key = _row_means(p, rows)
      out["null_mass"].append(null.mean(-1))
      out["first_key_mass"].append(per_key[..., 0].mean(-1))
      out["top_key_mass"].append(per_key.max(-1).mean(-1))
      if tower == "image":
        out["background_mass"].append(
            jnp.sum(per_key * keys_bg[:, None, :], -1).mean(-1))
        if registers:
          out["register_mass"].append(per_key[..., S - registers:].sum(-1).mean(-1))
    return {k: jnp.mean(jnp.stack(v), 0) for k, v in out.items()}

  return jax.jit(fn)


def attention_mass_metrics(model: CLIP, params, images: np.ndarray, tokens: np.ndarray,
                           batch_size: int, patch_size: int, registers: int = 0,
                           variables_extra: dict | None = None, prefix: str = "attn/",
                           filler_ids=()) -> dict[str, float]:
  """The module docstring's statistics over `images` and `tokens` (fixed-size batches; the
  padding of the last one is not counted)."""
  metrics = {}
  for tower, x in (("image", images), ("text", tokens)):
    fn = make_mass_fn(model, tower, patch_size, registers, variables_extra,
                      filler_ids if tower == "text" else ())
    n = x.shape[0]
    if n == 0:
      raise ValueError("attention mass needs at least one sequence, got an empty eval set")
    sums: dict[str, float] = {}
    for i in range(0, n, batch_size):
      chunk = x[i:i + batch_size]
      valid = chunk.shape[0]
      if valid < batch_size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, axis=0)])
      for k, v in fn(params, chunk).items():
        sums[k] = sums.get(k, 0.0) + float(np.sum(np.asarray(v, np.float64)[:valid]))
    for k, v in sums.items():
      if k.endswith(_HAS_ROWS):
        continue
      group = k.split("/")[0] + _HAS_ROWS  # a group statistic: over the sequences that have rows
      metrics[f"{prefix}{tower}/{k}"] = v / max(sums[group], 1.0) if group in sums else v / n
  return metrics
