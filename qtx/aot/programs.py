"""The programs of a config as shapes only: what compile mode lowers and compiles.

Each `Program` is a jitted function (run with the mesh in context, as the modes run it) and
abstract arguments (`jax.ShapeDtypeStruct`s carrying their shardings), built from the config
alone: no data, no parameters, no device memory.

  train         the train step (qtx.step) on the global batch train.batch_size
  encode_image, encode_text       the eval encoders (eval.batch_size)
  ptq_calibrate                   one calibration step of the fake-quantized model (both towers)
  ptq_encode_image, ptq_encode_text   the fake-quantized encoders the PTQ evaluation runs
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtx import flops as flops_lib
from qtx import parallel
from qtx import run as run_lib
from qtx import step as step_lib
from qtx.nn.clip import CLIP

WHAT = {"train": ("train",),
        "eval": ("encode_image", "encode_text"),
        "ptq": ("ptq_calibrate", "ptq_encode_image", "ptq_encode_text")}
WHAT["all"] = WHAT["train"] + WHAT["eval"] + WHAT["ptq"]


@dataclasses.dataclass
class Program:
  name: str
  fn: Callable  # has .lower(*args)
  args: tuple
  batch: int  # global batch the program runs on
  model_flops: Optional[float]  # analytic FLOPs of one execution on the global batch


def names(what: str) -> tuple[str, ...]:
  """Program names of compile.what: train | eval | ptq | all, or a comma-separated list."""
  out = []
  for word in [w.strip() for w in what.split(",") if w.strip()]:
    if word in WHAT:
      out += WHAT[word]
    elif word in WHAT["all"]:
      out.append(word)
    else:
      raise ValueError(f"unknown compile.what {word!r}; choose from {sorted(WHAT)} or program "
                       f"names {WHAT['all']} (comma-separated)")
  return tuple(dict.fromkeys(out))


def abstract_batch(config, run: run_lib.Run, batch: int) -> dict:
  sh = parallel.batch_sharding(run.mesh, run.rules)
  img = config.model.image
  return {"image": jax.ShapeDtypeStruct((batch, img.image_size, img.image_size, img.channels),
                                        jnp.uint8, sharding=sh),
          "tokens": jax.ShapeDtypeStruct((batch, config.model.text.context_length), jnp.int32,
                                         sharding=sh)}


def train(config, run: run_lib.Run) -> Program:
  """The train step of a run built with train=True."""
  B = config.train.batch_size
  return Program("train", step_lib.make_train_step(run),
                 (run.abstract_state, abstract_batch(config, run, B)), B,
                 flops_lib.train_step_flops(config))


def _tower_flops(config, tower: str) -> float:
  m = config.model
  full = flops_lib.clip_forward_flops(config)
  if tower == "image":  # the pair's FLOPs without the text tower's
    tx = m.text
    text = flops_lib.encoder_flops(tx.context_length, tx.width, tx.depth, tx.mlp_dim,
                                   causal=True) + 2 * tx.width * m.embed_dim
    return full - text
  return full - _tower_flops(config, "image")


def encoders(config, run: run_lib.Run, quant: bool = False) -> list[Program]:
  """The eval encoders (float, or fake-quantized with the calibrated statistics) at
  eval.batch_size."""
  B = config.eval.batch_size
  batch = abstract_batch(config, run, B)
  rep = parallel.replicated(run.mesh)
  if not quant:
    enc_i, enc_t = run_lib.make_encoders(run)
    args_i, args_t = (run.abstract_params, batch["image"]), (run.abstract_params, batch["tokens"])
    prefix = ""
  else:
    from qtx.analysis import quantized
    qmodel = run_lib.build_model(config, quantized.quant_config(config))
    stats = _abstract_stats(qmodel, config, rep)
    enc_i, enc_t = quantized.make_quant_encoders(qmodel)
    enc_i, enc_t = parallel.on_mesh(enc_i, run.mesh), parallel.on_mesh(enc_t, run.mesh)
    args_i = (run.abstract_params, stats, batch["image"])
    args_t = (run.abstract_params, stats, batch["tokens"])
    prefix = "ptq_"
  return [Program(prefix + "encode_image", enc_i, args_i, B, B * _tower_flops(config, "image")),
          Program(prefix + "encode_text", enc_t, args_t, B, B * _tower_flops(config, "text"))]


def _abstract_stats(qmodel: CLIP, config, sharding) -> Any:
  from qtx.quant.layers import QUANT_STATS
  images, tokens = run_lib.dummy_inputs(config)
  shapes = jax.eval_shape(lambda r: qmodel.init(r, images, tokens).get(QUANT_STATS, {}),
                          jax.random.key(0))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      nn.meta.unbox(shapes))


def calibrate(config, run: run_lib.Run) -> Program:
  """One calibration step of PTQ (both towers, the statistics updated) on a training batch."""
  from qtx.analysis import quantized
  qmodel = run_lib.build_model(config, quantized.quant_config(config))
  rep = parallel.replicated(run.mesh)
  stats = _abstract_stats(qmodel, config, rep)
  B = config.train.batch_size
  batch = abstract_batch(config, run, B)
  step = parallel.on_mesh(quantized.make_calibrate_step(qmodel), run.mesh)
  return Program("ptq_calibrate", step, (run.abstract_params, stats, batch["image"],
                                         batch["tokens"]), B,
                 B * flops_lib.clip_forward_flops(config))


def build(config, devices, what: str = "train") -> list[Program]:
  """The programs of compile.what for `config` on `devices` (compile-only devices work)."""
  wanted = names(what)
  out = []
  if "train" in wanted:
    out.append(train(config, run_lib.build(config, train=True, devices=devices,
                                           validate=False)))
  rest = [w for w in wanted if w != "train"]
  if rest:
    run = run_lib.build(config, devices=devices, validate=False)
    pool = {}
    if {"encode_image", "encode_text"} & set(rest):
      pool.update({p.name: p for p in encoders(config, run)})
    if {"ptq_encode_image", "ptq_encode_text"} & set(rest):
      pool.update({p.name: p for p in encoders(config, run, quant=True)})
    if "ptq_calibrate" in rest:
      pool["ptq_calibrate"] = calibrate(config, run)
    out += [pool[w] for w in rest]
  return out
