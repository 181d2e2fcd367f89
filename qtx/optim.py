"""The optimizer of a training run: learning-rate schedule, AdamW or Muon (`train.optimizer`).

adamw: AdamW on every parameter (no weight decay on parameters with fewer than 2 dimensions).

muon: Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks") on
the hidden weight matrices: the 2-D kernels of the transformer blocks (attention q/k/v/out, the
MLP, the gate maps from the block input). Their update is the Nesterov momentum
    m_t = beta m_{t-1} + g_t,   u_t = beta m_t + g_t   (optax's bias-corrected form)
orthogonalised by five quintic Newton-Schulz steps, X <- a X + b (X X^T) X + c (X X^T)^2 X with
(a, b, c) = (3.4445, -4.775, 2.0315) from X_0 = u_t / ||u_t||_F, approximately U V^T of
u_t = U S V^T; then scaled by 0.2 sqrt(max(fan_in, fan_out)) so its RMS matches AdamW's (Liu et
al. 2025, "Muon is Scalable for LLM Training"), which lets it share `train.lr` and the decoupled
weight decay `train.weight_decay * lr`. Every other parameter (embeddings, positions, class and
register tokens, the patch embedding, the projections to the joint space, gains, biases, the
temperature, the gates and the sinks) gets the same AdamW as with train.optimizer=adamw,
as Muon's authors prescribe for input/output layers and scalars. With model.scan the stacked
kernels are orthogonalised layer by layer (the leading 'layers' axis is a batch axis).
"""
from __future__ import annotations

import jax
import optax
from flax.core import meta
from optax.contrib import MuonDimensionNumbers, scale_by_muon
from optax.contrib._muon import scale_by_shape

OPTIMIZERS = ("adamw", "muon")
MUON_MOMENTUM = 0.95
MUON_RMS = 0.2  # Liu et al. 2025: the update RMS of AdamW that Muon's updates are scaled to


def lr_schedule(config) -> optax.Schedule:
  """Linear warm-up to train.lr, then cosine decay to train.lr * train.end_lr_fraction."""
  t = config.train
  if t.total_steps <= 0:
    raise ValueError(f"train.total_steps must be > 0, got {t.total_steps}")
  warmup = min(t.warmup_steps, t.total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=warmup,
      decay_steps=max(t.total_steps, warmup + 1), end_value=t.lr * t.end_lr_fraction)


def _names(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def is_hidden_matrix(path, leaf, scan: bool = False) -> bool:
  """True for the weight matrices Muon updates: a 'kernel' of a dense layer inside a tower's
  encoder blocks (attention q/k/v/out, the MLP), a matrix (2-D; 3-D with the stacked 'layers'
  axis under model.scan). Gate parameters stay with AdamW. `path` is a jax key path (boxed or
  plain parameter trees)."""
  names = _names(path)
  if not names or names[-1] != "kernel" or "encoder" not in names or "gate" in names:
    return False
  return len(leaf.shape) - (1 if scan else 0) == 2


def param_labels(params, scan: bool = False):
  """'muon' or 'adamw' per parameter. On a boxed tree (flax's Partitioned, as when the run's
  shardings are derived) a label replaces the whole box, so the masked-out group's state is one
  optax.MaskedNode per parameter rather than a box around one."""
  def label(path, leaf):
    return "muon" if is_hidden_matrix(path, getattr(leaf, "value", leaf), scan) else "adamw"
  return jax.tree_util.tree_map_with_path(
      label, params, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def _adamw(config, schedule):
  t = config.train
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=1e-8, weight_decay=t.weight_decay,
                     mask=decay_mask)


def _muon(config, schedule):
  """The Muon chain of the hidden matrices (see the module docstring)."""
  scan = bool(config.model.scan)
  dims = MuonDimensionNumbers(1, 2) if scan else MuonDimensionNumbers(0, 1)
  masked = lambda x: isinstance(x, optax.MaskedNode)
  dim_nums = lambda updates: jax.tree.map(lambda u: u if masked(u) else dims, updates,
                                          is_leaf=masked)
  return optax.chain(
      scale_by_muon(beta=MUON_MOMENTUM, nesterov=True, weight_dimension_numbers=dim_nums),
      scale_by_shape(weight_dimension_numbers=dim_nums, consistent_rms=MUON_RMS),
      optax.add_decayed_weights(config.train.weight_decay),
      optax.scale_by_learning_rate(schedule))


def make_optimizer(config) -> optax.GradientTransformation:
  """train.optimizer with warmup + cosine and global-norm clipping (train.grad_clip)."""
  t = config.train
  name = t.get("optimizer", "adamw")
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown train.optimizer {name!r}; choose one of {OPTIMIZERS}")
  schedule = lr_schedule(config)
  parts = []
  if t.grad_clip and t.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(t.grad_clip))
  if name == "adamw":
    parts.append(_adamw(config, schedule))
  else:
    scan = bool(config.model.scan)
    parts.append(optax.partition(
        {"muon": _muon(config, schedule), "adamw": _adamw(config, schedule)},
        lambda params: param_labels(params, scan)))
  return optax.chain(*parts)
