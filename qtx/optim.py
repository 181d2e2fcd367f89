"""The optimizer of a training run: learning-rate schedule and AdamW."""
from __future__ import annotations

import jax
import optax


def lr_schedule(config) -> optax.Schedule:
  """Linear warm-up to train.lr, then cosine decay to train.lr * train.end_lr_fraction."""
  t = config.train
  if t.total_steps <= 0:
    raise ValueError(f"train.total_steps must be > 0, got {t.total_steps}")
  warmup = min(t.warmup_steps, t.total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=warmup,
      decay_steps=max(t.total_steps, warmup + 1), end_value=t.lr * t.end_lr_fraction)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with warmup + cosine, global-norm clipping; no weight decay on gains, biases and the
  temperature (parameters with fewer than 2 dimensions)."""
  t = config.train
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = []
  if t.grad_clip and t.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(t.grad_clip))
  parts.append(optax.adamw(lr_schedule(config), b1=t.b1, b2=t.b2, eps=1e-8,
                           weight_decay=t.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
