"""The jitted, sharded CLIP train step: loss, gradients (optionally microbatched) and the
optimizer update.

It needs the model, optimizer and mesh of a built run (qtx.run.build), not the data
pipeline, so a step can be compiled and timed with only JAX, flax, optax and orbax installed
(benchmarks.train_step and the accelerator check do that). qtx.modes.train runs it in the
training loop and re-exports these names.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from qtx import losses, optim, parallel
from qtx.nn.clip import CLIP
from qtx.run import Run, TrainState


def embedding_loss(config, zi, zt, scale, bias, mesh=None):
  """Contrastive loss of (global) embeddings; the ring variant when loss.sharded is set."""
  return losses.compute(config.loss.name, zi, zt, scale, bias, config.loss.max_logit_scale,
                        config.loss.impl, mesh=mesh if config.loss.sharded else None)


def loss_fn(model: CLIP, config, params, batch, step, mesh=None):
  zi, zt, scale, bias = model.apply({"params": params}, batch["image"], batch["tokens"], step)
  loss = embedding_loss(config, zi, zt, scale, bias, mesh)
  return loss, {"logit_scale": jnp.minimum(jnp.exp(scale), config.loss.max_logit_scale)}


def microbatched_grads(model: CLIP, config, params, batch, step, mesh=None):
  """Exact full-batch loss and gradients with activations of one microbatch at a time.

  A contrastive loss couples every pair in the batch, so plain gradient accumulation would
  change the loss (fewer negatives). Instead (as in GradCache): 1) embed all microbatches
  without keeping activations, 2) differentiate the loss w.r.t. the embeddings, 3) re-run each
  microbatch under jax.vjp with its slice of those embedding gradients and sum.
  """
  M = config.train.microbatches
  B = batch["image"].shape[0]
  if B % M:
    raise ValueError(f"batch {B} is not divisible by train.microbatches {M}")

  def split(x):  # B x ... -> M x (B/M) x ...: microbatch m takes rows m, m+M, ...
    return jnp.swapaxes(x.reshape((B // M, M) + x.shape[1:]), 0, 1)

  def merge(x):  # inverse of split
    return jnp.swapaxes(x, 0, 1).reshape((B,) + x.shape[2:])

  images, tokens = split(batch["image"]), split(batch["tokens"])

  def embed(p, im, tk):
    zi = model.apply({"params": p}, im, step, method=CLIP.encode_image)
    zt = model.apply({"params": p}, tk, step, method=CLIP.encode_text)
    return zi, zt

  zi, zt = jax.lax.map(lambda x: embed(params, *x), (images, tokens))
  zi, zt = merge(zi), merge(zt)
  bias = params.get("logit_bias")

  def emb_loss(zi, zt, scale, bias):
    return embedding_loss(config, zi, zt, scale, bias, mesh)

  loss, (g_zi, g_zt, g_scale, g_bias) = jax.value_and_grad(emb_loss, argnums=(0, 1, 2, 3))(
      zi, zt, params["logit_scale"], bias)

  def body(acc, x):
    im, tk, gi, gt = x
    _, vjp = jax.vjp(lambda p: embed(p, im, tk), params)
    (g,) = vjp((gi, gt))
    return jax.tree.map(jnp.add, acc, g), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, _ = jax.lax.scan(body, zeros, (images, tokens, split(g_zi), split(g_zt)))
  grads = dict(grads)
  grads["logit_scale"] = grads["logit_scale"] + g_scale
  if bias is not None:
    grads["logit_bias"] = grads["logit_bias"] + g_bias
  scale = jnp.minimum(jnp.exp(params["logit_scale"]), config.loss.max_logit_scale)
  return (loss, {"logit_scale": scale}), grads


def make_train_step(s: Run) -> Callable:
  config, model, tx = s.config, s.model, s.tx
  sched = optim.lr_schedule(config)
  max_log_scale = math.log(config.loss.max_logit_scale)

  def step_fn(state: TrainState, batch):
    if config.train.microbatches > 1:
      (loss, aux), grads = microbatched_grads(model, config, state.params, batch, state.step,
                                              s.mesh)
    else:
      grad_fn = jax.value_and_grad(
          lambda p: loss_fn(model, config, p, batch, state.step, s.mesh), has_aux=True)
      (loss, aux), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = dict(params)
    params["logit_scale"] = jnp.minimum(params["logit_scale"], max_log_scale)
    metrics = {"train/loss": loss, "train/lr": sched(state.step),
               "train/grad_norm": optax.tree.norm(grads),
               "train/logit_scale": aux["logit_scale"]}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch_sh = parallel.batch_sharding(s.mesh, s.rules)
  step = jax.jit(step_fn, in_shardings=(s.state_sharding, batch_sh),
                 out_shardings=(s.state_sharding, parallel.replicated(s.mesh)),
                 donate_argnums=(0,))
  return parallel.on_mesh(step, s.mesh)  # the Pallas kernels run per device
