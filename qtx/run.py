"""The run builder: everything a mode needs, built once from a validated config.

    run = build(config)                 # eval, PTQ, analysis: mesh, model, parameter shardings
    run = build(config, train=True)     # training: also the optimizer and the train state
    model = build_model(config, quant)  # the CLIP module of a config (float, or fake-quantized)
    params, step = load_params(config, workdir, run)   # parameters only, never Adam moments

Parameters and (when training) the optimizer state carry the shardings that the model's
logical axis names and `mesh.rules` give; the optimizer's moments are sharded like the
parameters they belong to.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
import optax

from qtx import checkpoint as ckpt_lib
from qtx import config_lib, losses, optim, parallel
from qtx.nn import clip
from qtx.nn.clip import CLIP
from qtx.quant.layers import QuantConfig
from qtx.weights.files import SAFETENSORS_SUFFIX, TORCH_SUFFIXES

# files init_from reads as a PyTorch / safetensors CLIP state_dict (qtx.weights)
WEIGHT_FILE_SUFFIXES = TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass
class Run:
  """A built run. `tx`, `state_sharding` and `abstract_state` are None unless train=True."""
  config: Any
  model: CLIP
  mesh: jax.sharding.Mesh
  rules: tuple
  params_sharding: Any
  abstract_params: Any
  tx: Optional[optax.GradientTransformation] = None
  state_sharding: Any = None
  abstract_state: Any = None


def build_model(config, quant: Optional[QuantConfig] = None) -> CLIP:
  """CLIP module from a full run config (model + loss blocks)."""
  m = config.model
  clip.check_model_config(m)
  loss = losses.get(config.loss.name)
  if config.loss.init_logit_scale >= 0:
    scale = float(config.loss.init_logit_scale)
  else:
    scale = loss.init_logit_scale
  bias = float(config.loss.init_logit_bias) if loss.uses_bias else None
  return CLIP(image=clip.tower_kwargs(m.image, clip.IMAGE_KEYS),
              text=clip.tower_kwargs(m.text, clip.TEXT_KEYS), embed_dim=m.embed_dim,
              init_logit_scale=scale, init_logit_bias=bias, dtype=clip.DTYPES[m.dtype],
              quant=quant, scan=m.scan, remat=m.remat)


def dummy_inputs(config, batch: int = 1):
  """(images, tokens) of zeros with the config's shapes, for init and tracing."""
  img = config.model.image
  images = jnp.zeros((batch, img.image_size, img.image_size, img.channels), jnp.uint8)
  tokens = jnp.zeros((batch, config.model.text.context_length), jnp.int32)
  return images, tokens


def _with_sharding(abstract, sharding):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, sharding)


def build(config, train: bool = False, devices=None, validate: bool = True) -> Run:
  """Mesh, model and shardings of `config` (validated first unless validate=False: the modes
  validate once at their entry); the optimizer and train state only when `train`."""
  if validate:
    config_lib.validate(config)
  if devices is None and config.mesh.num_devices > 0:
    devices = jax.devices()[:config.mesh.num_devices]
  mesh = parallel.make_mesh(config.mesh.shape, devices)
  rules = parallel.rules_from_config(config)
  model = build_model(config)
  tx = optim.make_optimizer(config) if train else None

  def init_fn(rng):
    params = model.init(rng, *dummy_inputs(config))["params"]
    if tx is None:
      return params
    # the moments are built from the boxed parameters, so they keep the parameters' axis names
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  boxed = jax.eval_shape(init_fn, jax.random.key(0))
  sharding = parallel.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
  abstract = _with_sharding(nn.meta.unbox(boxed), sharding)
  params_sharding = sharding.params if train else sharding
  abstract_params = abstract.params if train else abstract
  parallel.check_fsdp(params_sharding, abstract_params, mesh)
  if not train:
    return Run(config, model, mesh, rules, params_sharding, abstract_params)
  return Run(config, model, mesh, rules, params_sharding, abstract_params, tx=tx,
             state_sharding=sharding, abstract_state=abstract)


def init_params(run: Run, seed: int):
  """Freshly initialised parameters, placed with the run's shardings."""
  model, config = run.model, run.config
  fn = lambda rng: nn.meta.unbox(model.init(rng, *dummy_inputs(config))["params"])
  return jax.jit(fn, out_shardings=run.params_sharding)(jax.random.key(seed))


def init_state(run: Run, seed: int, params=None) -> TrainState:
  """A train state at step 0: fresh parameters (or `params`) and a fresh optimizer state."""
  if run.tx is None:
    raise ValueError("init_state needs a run built with train=True")
  if params is None:
    params = init_params(run, seed)
  tx = run.tx
  fn = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))
  return jax.jit(fn, out_shardings=run.state_sharding)(params)


def make_encoders(run: Run, variables_extra: Optional[dict] = None, model: Optional[CLIP] = None):
  """Jitted (params, images) and (params, tokens) -> normalised embeddings."""
  model = model or run.model
  extra = variables_extra or {}
  enc_i = jax.jit(lambda p, x: model.apply({"params": p, **extra}, x, method=CLIP.encode_image))
  enc_t = jax.jit(lambda p, x: model.apply({"params": p, **extra}, x, method=CLIP.encode_text))
  # with the run's mesh in context the Pallas kernels run per device
  return parallel.on_mesh(enc_i, run.mesh), parallel.on_mesh(enc_t, run.mesh)


# ----------------------------------------------------------------------------- parameters

def params_from(path: str, run: Run, seed: int):
  """Parameters of the checkpoint or weights file at `path`, with the run's shardings: a qtx
  checkpoint (a workdir, its checkpoints/ folder or one step folder) or a PyTorch / safetensors
  CLIP state_dict (imported into freshly initialised parameters, which supply what the
  state_dict lacks, e.g. gates)."""
  if os.path.isfile(path) and path.endswith(WEIGHT_FILE_SUFFIXES):
    from qtx import weights
    params = weights.load_into(path, jax.device_get(init_params(run, seed)), run.config)
    return jax.device_put(params, run.params_sharding), 0
  warn_model_differences(path, run.config)
  try:
    return ckpt_lib.restore_params(path, run.abstract_params)
  except ValueError as e:  # orbax: stored shapes differ from this config's model
    raise ValueError(f"checkpoint {path!r} does not match the model of this config (same "
                     f"model.* settings as the run that wrote it?): {e}") from e


def warn_model_differences(path: str, config) -> list[str]:
  """Warns (and returns the lines) when the qtx run that wrote the checkpoint at `path` had other
  model.* settings than `config`: settings that are not parameters (clipped softmax's alpha, a
  normalizer with the same parameters) load without error but evaluate another model."""
  root = os.path.abspath(path)
  for _ in range(3):  # the workdir, its checkpoints/ folder or one step folder
    if os.path.isfile(os.path.join(root, "config.json")):
      break
    root = os.path.dirname(root)
  else:
    return []
  try:
    with open(os.path.join(root, "config.json")) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return []
  lines = [f"{k}: {a!r} (trained) -> {b!r}"
           for k, (a, b) in config_lib.differences(saved, config, both=True).items()
           if k.startswith("model.") and not k.endswith((".impl", ".scan", ".remat"))]
  if lines:
    msg = (f"qtx: warning: {path} was trained with other model settings; this run uses "
           f"its parameters with these: " + "; ".join(lines))
    logging.warning(msg)
    print(msg, flush=True)
  return lines


def load_params(config, workdir: str, run: Optional[Run] = None):
  """(params, step) of the checkpoint `checkpoint.checkpoint_path` picks (config.init_from, else
  WORKDIR's latest), placed with the run's shardings; step is 0 for a PyTorch state_dict."""
  run = run or build(config)
  return params_from(ckpt_lib.checkpoint_path(config, workdir), run, config.seed)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json of a run qtx wrote, with the keys it predates filled in."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} does not exist: {workdir!r} is not a qtx workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(config_lib.fill_legacy(json.load(f)))


def load_run(workdir: str, step: int | str | None = None):
  """(config, run, params, step) of a run qtx wrote: WORKDIR/config.json and the checkpoint of
  training step `step` (the latest when None)."""
  config = load_config(workdir)
  if step is not None:
    config.init_from = os.path.join(workdir, "checkpoints", str(step))
  run = build(config)
  params, at = load_params(config, workdir, run)
  return config, run, params, at

