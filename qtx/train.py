"""Train state, optimizer, jitted sharded train step, and the training loop.

Flow: config -> grain pipeline (per host) -> global sharded batch -> jitted step
(model + loss + AdamW) -> metrics.jsonl / TensorBoard / checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from qtx import checkpoint as ckpt_lib
from qtx import config_lib, evaluate, losses, parallel
from qtx import flops as flops_lib
from qtx.data import pipeline
from qtx.data import sources as data_sources
from qtx.metrics import MetricsWriter
from qtx.nn.clip import CLIP, build_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf; the last good checkpoint is left untouched."""


def lr_schedule(config) -> optax.Schedule:
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


def _dummy_inputs(config, batch: int = 1):
  img = config.model.image
  images = jnp.zeros((batch, img.image_size, img.image_size, img.channels), jnp.uint8)
  tokens = jnp.zeros((batch, config.model.text.context_length), jnp.int32)
  return images, tokens


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built once from the config."""
  config: Any
  model: CLIP
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  rules: tuple
  state_sharding: Any
  abstract_state: Any


def setup(config, devices=None) -> Setup:
  config_lib.validate(config)
  if devices is None and config.mesh.num_devices > 0:
    devices = jax.devices()[:config.mesh.num_devices]
  mesh = parallel.make_mesh(config.mesh.shape, devices)
  rules = parallel.rules_from_config(config)
  model = build_model(config)
  tx = make_optimizer(config)

  def init_fn(rng):
    images, tokens = _dummy_inputs(config)
    params = model.init(rng, images, tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(nn.meta.unbox(params)))

  boxed = jax.eval_shape(init_fn, jax.random.key(0))
  logical = nn.get_partition_spec(boxed)
  state_sharding = parallel.logical_to_sharding(logical, mesh, rules)
  abstract = nn.meta.unbox(boxed)
  parallel.check_fsdp(state_sharding.params, abstract.params, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, state_sharding)
  return Setup(config, model, tx, mesh, rules, state_sharding, abstract)


def init_state(s: Setup, seed: int) -> TrainState:
  config, model, tx = s.config, s.model, s.tx

  def init_fn(rng):
    images, tokens = _dummy_inputs(config)
    params = nn.meta.unbox(model.init(rng, images, tokens)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return jax.jit(init_fn, out_shardings=s.state_sharding)(jax.random.key(seed))


def embedding_loss(config, zi, zt, scale, bias, mesh=None):
  """Contrastive loss of (global) embeddings; the ring variant when loss.sharded is set."""
  if config.loss.get("sharded", False) and mesh is not None:
    from qtx import sharded_losses
    return sharded_losses.sharded_loss(config.loss.name, zi, zt, scale, bias, mesh,
                                       config.loss.max_logit_scale)
  return losses.compute(config.loss.name, zi, zt, scale, bias, config.loss.max_logit_scale,
                        config.loss.impl)


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


def make_train_step(s: Setup) -> Callable:
  config, model, tx = s.config, s.model, s.tx
  sched = lr_schedule(config)
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
  return jax.jit(step_fn, in_shardings=(s.state_sharding, batch_sh),
                 out_shardings=(s.state_sharding, parallel.replicated(s.mesh)),
                 donate_argnums=(0,))


def make_encoders(s: Setup, variables_extra: Optional[dict] = None, model: Optional[CLIP] = None):
  """Jitted (params -> fn(images)), (params -> fn(tokens)) returning normalised embeddings."""
  model = model or s.model
  extra = variables_extra or {}
  enc_i = jax.jit(lambda p, x: model.apply({"params": p, **extra}, x, method=CLIP.encode_image))
  enc_t = jax.jit(lambda p, x: model.apply({"params": p, **extra}, x, method=CLIP.encode_text))
  return enc_i, enc_t


def _progress(total, initial):
  try:
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=jax.process_index() != 0, mininterval=2.0)
  except ImportError:  # pragma: no cover
    return None


def train_and_evaluate(config, workdir: str) -> dict:
  """Train (resuming from WORKDIR/checkpoints if present), evaluate, return final metrics."""
  s = setup(config)
  writer = MetricsWriter(workdir)
  mgr = ckpt_lib.Manager(os.path.join(workdir, "checkpoints"), config)
  data_iter = iter(pipeline.train_dataset(config, jax.process_index(), jax.process_count()))
  state = None
  restored = mgr.restore_latest(s.abstract_state, data_iter)
  if restored is not None:
    state = restored
    logging.info("resumed from step %d", int(state.step))
  elif config.init_from:
    state = ckpt_lib.init_from(config.init_from, s, config.seed)
  if state is None:
    state = init_state(s, config.seed)
  start = int(state.step)
  total = config.train.total_steps
  step_fn = make_train_step(s)
  enc_i, enc_t = make_encoders(s)
  task = pipeline.eval_task(config) if config.eval.every_steps >= 0 else None
  extra_tasks = zeroshot_tasks(config)
  outliers_every = int(config.quant.outliers_every_steps)
  outlier_fn = None
  if outliers_every > 0 and task is not None:
    from qtx import eval_run
    n_probe = min(config.eval.batch_size, len(task.images))
    probe = (task.images[:n_probe], task.tokens[:n_probe])
    tower_fns = {t: eval_run.make_outlier_fn(s.model, t) for t in ("image", "text")}
    outlier_fn = lambda p, im, tk: eval_run.outlier_metrics(s.model, p, im, tk, n_probe,
                                                            fns=tower_fns)
  step_flops = flops_lib.train_step_flops(config)
  peak = flops_lib.peak_tflops(s.mesh.devices.flat[0])
  n_dev = s.mesh.devices.size
  sps_hist = []
  last: dict = {}
  bar = _progress(total, start)
  t_log, n_log = time.perf_counter(), 0
  pending = None  # (step, metrics) of the previous step, checked after the next dispatch
  interrupted = ckpt_lib.PreemptionWatcher()
  try:
    for step in range(start, total):
      batch = parallel.global_batch(next(data_iter), s.mesh, s.rules)
      state, metrics = step_fn(state, batch)
      if pending is not None:
        _check_finite(*pending)
      pending = (step + 1, metrics)
      n_log += 1
      done = step + 1
      if done % config.train.log_every == 0 or done == total:
        _check_finite(*pending)
        m = jax.device_get(metrics)
        dt = time.perf_counter() - t_log
        sps = n_log * config.train.batch_size / dt
        if done > start + config.train.log_every:  # skip the interval with compilation
          sps_hist.append(sps)
        m["train/samples_per_sec"] = sps
        m["data/skipped"] = data_sources.SKIPPED.count
        tflops = n_log * step_flops / dt / n_dev / 1e12
        m["perf/tflops_per_sec_per_device"] = tflops
        if peak:
          m["perf/mfu"] = tflops / peak
        writer.write(done, m)
        last.update(m)
        if bar is not None:
          bar.set_postfix(loss=f"{float(m['train/loss']):.3f}", sps=f"{sps:.0f}")
        t_log, n_log = time.perf_counter(), 0
      if bar is not None:
        bar.update(1)
      if outlier_fn is not None and done % outliers_every == 0:
        writer.write(done, jax.device_get(outlier_fn(state.params, *probe)))
        t_log = time.perf_counter()
      if task is not None and config.eval.every_steps > 0 and (
          done % config.eval.every_steps == 0) and done != total:
        ev = evaluate_all(enc_i, enc_t, state.params, task, extra_tasks, config)
        writer.write(done, ev)
        last.update(ev)
        t_log = time.perf_counter()
      if mgr.should_save(done) or interrupted.requested():
        _check_finite(*pending)
        mgr.save(done, state, data_iter)
        if interrupted.requested():
          mgr.wait()
          logging.warning("preemption signal: checkpoint saved at step %d, exiting", done)
          print(f"qtx: preempted, checkpoint saved at step {done}", flush=True)
          last["preempted_at"] = done
          return last
    if pending is not None:
      _check_finite(*pending)
    final_step = int(state.step)
    ev = {}
    if sps_hist:
      ev["train/samples_per_sec_steady"] = float(np.median(sps_hist))
    if task is not None:
      ev.update(evaluate_all(enc_i, enc_t, state.params, task, extra_tasks, config))
    if ev:
      writer.write(final_step, ev)
      last.update(ev)
    mgr.save(final_step, state, data_iter, force=True)
    mgr.wait()
  finally:
    interrupted.close()
    if bar is not None:
      bar.close()
    writer.close()
    mgr.close()
  summary = _summary(final_step, last)
  if jax.process_index() == 0:
    print(summary, flush=True)
  return last


def zeroshot_tasks(config) -> dict:
  """Extra evaluators from eval.zeroshot ("name[@path],..."), each an EvalTask."""
  spec = config.eval.get("zeroshot", "")
  if not spec:
    return {}
  out = {}
  for item in (x.strip() for x in spec.split(",") if x.strip()):
    name, _, path = item.partition("@")
    task = None
    if data_sources.is_streamed_classification(name):  # whole split, streamed
      task = data_sources.make_classification_stream(config, name, path or None)
    out[name] = task or data_sources.make_eval_task(config, name, path or None)
  return out


def evaluate_all(enc_i, enc_t, params, task, extra_tasks, config) -> dict:
  """The training data's eval split under eval/, each extra evaluator under eval/<name>/."""
  fi = lambda x: enc_i(params, x)
  ft = lambda x: enc_t(params, x)
  out = evaluate.evaluate(fi, ft, task, config.eval.batch_size)
  for name, t in extra_tasks.items():
    out.update(evaluate.evaluate(fi, ft, t, config.eval.batch_size, prefix=f"eval/{name}/",
                                 context_length=config.model.text.context_length))
  return out


def _check_finite(step, metrics):
  loss = float(jax.device_get(metrics["train/loss"]))
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f"training loss is {loss} at step {step}; stopping. The last checkpoint saved before "
        f"this step is intact; lower train.lr or check the data.")


def _summary(step, m) -> str:
  from qtx.metrics import summary_line
  return summary_line("qtx", step, m)
