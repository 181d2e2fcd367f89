"""Zero-shot classification and image<->text retrieval with any pair of encoders.

`encode_image(images_BxHxWxC) -> BxE` and `encode_text(tokens_BxT) -> BxE` return
L2-normalised embeddings; the same functions serve the float and the fake-quantized model.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from qtx.data import pipeline
from qtx.data.pipeline import ClassificationStream, EvalTask


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
  """Fraction of rows whose label is among the k highest scores (ties: lower class first)."""
  own = scores_NxC[np.arange(len(labels_N)), labels_N]
  return float(np.mean(_ranks(scores_NxC, own, labels_N) < min(k, scores_NxC.shape[1])))


def recall_at_k(sim_NxN: np.ndarray, k: int) -> float:
  """Fraction of rows whose own index (the diagonal) is among the k highest scores. Ties rank
  as a stable sort would (identical captions neither all win nor all lose)."""
  n = np.arange(sim_NxN.shape[0])
  return float(np.mean(_ranks(sim_NxN, sim_NxN[n, n], n) < k))


def _ranks(sim_bxM, own_score_b, own_index_b):
  """Rank of each row's own entry (0 = best) as a stable sort would place it: strictly higher
  scores, plus equal ones at a lower index."""
  idx = np.arange(sim_bxM.shape[1])[None, :]
  return (np.sum(sim_bxM > own_score_b[:, None], axis=1)
          + np.sum((sim_bxM == own_score_b[:, None]) & (idx < own_index_b[:, None]), axis=1))


def retrieval_recalls(zi_NxE: np.ndarray, zt_MxE: np.ndarray,
                      caption_image_M: np.ndarray | None = None, ks=(1, 5, 10),
                      block: int = 1024) -> dict[str, float]:
  """Image<->text recall@k with any number of captions per image (COCO / Flickr30k protocol).

  image->text: an image is a hit at k when any of its captions is among the k captions it
  scores highest; text->image: a caption is a hit when its image is among the k images it
  scores highest (every caption counts once). caption_image_M maps caption j to its image
  (None: caption i belongs to image i). Similarities are formed `block` rows at a time, so
  memory stays at block x max(N, M) scores, never N x M.
  """
  N, M = zi_NxE.shape[0], zt_MxE.shape[0]
  cap_img = np.arange(M) if caption_image_M is None else np.asarray(caption_image_M)
  if cap_img.shape != (M,) or (M and (cap_img.min() < 0 or cap_img.max() >= N)):
    raise ValueError(f"caption_image must map each of the {M} captions to an image index in "
                     f"[0, {N}), got shape {cap_img.shape}")
  counts = np.bincount(cap_img, minlength=N)
  if np.any(counts == 0):
    raise ValueError(f"{int(np.sum(counts == 0))} image(s) have no caption; every image needs "
                     "at least one for image->text retrieval")
  i2t_rank = np.empty(N, np.int64)
  for s in range(0, N, block):
    sim = zi_NxE[s:s + block] @ zt_MxE.T  # b x M
    own = cap_img[None, :] == np.arange(s, s + sim.shape[0])[:, None]
    masked = np.where(own, sim, -np.inf)
    best_j = np.argmax(masked, axis=1)  # the best-scored own caption (lowest index on ties)
    best = masked[np.arange(sim.shape[0]), best_j]
    # captions of the same image never count against it
    i2t_rank[s:s + sim.shape[0]] = _ranks(np.where(own, -np.inf, sim), best, best_j)
  t2i_rank = np.empty(M, np.int64)
  for s in range(0, M, block):
    sim = zt_MxE[s:s + block] @ zi_NxE.T  # b x N
    g = cap_img[s:s + sim.shape[0]]
    t2i_rank[s:s + sim.shape[0]] = _ranks(sim, sim[np.arange(sim.shape[0]), g], g)
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = float(np.mean(i2t_rank < k))
    out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k))
  return out


def zeroshot_accuracy(zi_NxE: np.ndarray, zc_CxE: np.ndarray, labels_N: np.ndarray,
                      ks=(1, 5), block: int = 4096) -> dict[str, float]:
  """Top-k zero-shot accuracy, scoring `block` images at a time (memory block x C)."""
  C = zc_CxE.shape[0]
  hits = {k: 0 for k in ks}
  for s in range(0, zi_NxE.shape[0], block):
    scores = zi_NxE[s:s + block] @ zc_CxE.T
    y = labels_N[s:s + block]
    rank = _ranks(scores, scores[np.arange(len(y)), y], y)  # ties: lower class first
    for k in ks:
      hits[k] += int(np.sum(rank < min(k, C)))
  return {f"zeroshot_top{k}": hits[k] / zi_NxE.shape[0] for k in ks}


def evaluate_classification(encode_image, encode_text, task: ClassificationStream,
                            batch_size: int, context_length: int,
                            prefix: str = "eval/") -> dict[str, float]:
  """Zero-shot top-1/top-5 over a whole classification split, streamed: images are decoded and
  encoded one batch at a time and only their embeddings are kept (N x E)."""
  zc = class_embeddings(encode_text, task.prompt_tokens(context_length), batch_size)
  zs, labels = [], []
  for images, y in task.batches(batch_size):
    zs.append(encode_batched(encode_image, images, batch_size))
    labels.append(y)
  if not zs:
    raise ValueError(f"zero-shot split {task.name!r} has no readable images")
  zi, y = np.concatenate(zs), np.concatenate(labels)
  out = {f"{prefix}{k}": v for k, v in zeroshot_accuracy(zi, zc, y).items()}
  out[f"{prefix}num_samples"] = int(len(y))
  return out


def evaluate(encode_image, encode_text, task: EvalTask, batch_size: int,
             prefix: str = "eval/", context_length: int | None = None) -> dict[str, float]:
  """Retrieval (R@1/5/10 both ways, any number of captions per image) and, for a task with
  labels, zero-shot top-1/top-5, over the whole task. A ClassificationStream is evaluated
  streamed (zero-shot only; needs context_length)."""
  if isinstance(task, ClassificationStream):
    if context_length is None:
      raise ValueError("a streamed classification task needs the text context_length")
    return evaluate_classification(encode_image, encode_text, task, batch_size,
                                   context_length, prefix)
  zi = encode_batched(encode_image, task.images, batch_size)
  out = {}
  if task.tokens is not None and len(task.tokens):
    zt = encode_batched(encode_text, task.tokens, batch_size)
    cap = getattr(task, "caption_image", None)
    out.update({f"{prefix}{k}": v for k, v in retrieval_recalls(zi, zt, cap).items()})
  if task.labels is not None and len(task.class_names):
    zc = class_embeddings(encode_text, task.prompt_tokens(task.tokens.shape[1]), batch_size)
    out.update({f"{prefix}{k}": v
                for k, v in zeroshot_accuracy(zi, zc, np.asarray(task.labels)).items()})
  return out


def zeroshot_tasks(config) -> dict:
  """Extra evaluators from eval.zeroshot ("name[@path],..."), each an EvalTask."""
  spec = config.eval.get("zeroshot", "")
  if not spec:
    return {}
  out = {}
  for item in (x.strip() for x in spec.split(",") if x.strip()):
    name, _, path = item.partition("@")
    task = None
    if pipeline.is_streamed_classification(name):  # whole split, streamed
      task = pipeline.make_classification_stream(config, name, path or None)
    out[name] = task or pipeline.make_eval_task(config, name, path or None)
  return out


def evaluate_all(enc_i, enc_t, params, task, extra_tasks, config) -> dict:
  """The training data's eval split under eval/, each extra evaluator under eval/<name>/."""
  fi = lambda x: enc_i(params, x)
  ft = lambda x: enc_t(params, x)
  out = evaluate(fi, ft, task, config.eval.batch_size)
  for name, t in extra_tasks.items():
    out.update(evaluate(fi, ft, t, config.eval.batch_size, prefix=f"eval/{name}/",
                        context_length=config.model.text.context_length))
  return out
