"""Zero-shot classification and image<->text retrieval with any pair of encoders.

`encode_image(images_BxHxWxC) -> BxE` and `encode_text(tokens_BxT) -> BxE` return
L2-normalised embeddings; the same functions serve the float and the fake-quantized model.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from qtx.data.pipeline import EvalTask


def encode_batched(fn: Callable, x: np.ndarray, batch_size: int) -> np.ndarray:
  """Apply fn over x in fixed-size batches (the last one padded, so fn compiles once)."""
  n = x.shape[0]
  out = []
  for i in range(0, n, batch_size):
    chunk = x[i:i + batch_size]
    pad = batch_size - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(chunk))[:batch_size - pad])
  return np.concatenate(out)


def class_embeddings(encode_text, prompt_tokens_CxMxT: np.ndarray, batch_size: int):
  """Per class: mean of the normalised prompt embeddings, re-normalised (CLIP's ensembling)."""
  C, M, T = prompt_tokens_CxMxT.shape
  z = encode_batched(encode_text, prompt_tokens_CxMxT.reshape(C * M, T), batch_size)
  z = z.reshape(C, M, -1).mean(axis=1)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def topk_accuracy(scores_NxC: np.ndarray, labels_N: np.ndarray, k: int) -> float:
  k = min(k, scores_NxC.shape[1])
  top = np.argsort(-scores_NxC, axis=1)[:, :k]
  return float(np.mean(np.any(top == labels_N[:, None], axis=1)))


def recall_at_k(sim_NxN: np.ndarray, k: int) -> float:
  """Fraction of rows whose own index (the diagonal) is among the k highest scores."""
  n = sim_NxN.shape[0]
  own = sim_NxN[np.arange(n), np.arange(n)]
  # Rank as a stable sort would: strictly better entries, plus equal ones at a lower index
  # (identical captions tie exactly; they neither all win nor all lose).
  idx = np.arange(n)
  rank = (np.sum(sim_NxN > own[:, None], axis=1)
          + np.sum((sim_NxN == own[:, None]) & (idx[None, :] < idx[:, None]), axis=1))
  return float(np.mean(rank < k))


def evaluate(encode_image, encode_text, task: EvalTask, batch_size: int,
             prefix: str = "eval/") -> dict[str, float]:
  zi = encode_batched(encode_image, task.images, batch_size)
  zt = encode_batched(encode_text, task.tokens, batch_size)
  sim = zi @ zt.T
  out = {
      f"{prefix}i2t_r1": recall_at_k(sim, 1),
      f"{prefix}i2t_r5": recall_at_k(sim, 5),
      f"{prefix}t2i_r1": recall_at_k(sim.T, 1),
      f"{prefix}t2i_r5": recall_at_k(sim.T, 5),
  }
  if task.labels is not None and len(task.class_names):
    zc = class_embeddings(encode_text, task.prompt_tokens(task.tokens.shape[1]), batch_size)
    scores = zi @ zc.T
    out[f"{prefix}zeroshot_top1"] = topk_accuracy(scores, task.labels, 1)
    out[f"{prefix}zeroshot_top5"] = topk_accuracy(scores, task.labels, 5)
  return out
