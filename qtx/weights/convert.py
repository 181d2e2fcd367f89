"""OpenAI CLIP / open_clip state_dict -> qtx params: architecture from shapes, the name
mapping, and loading into a model's parameter template (`qtx.weights` documents the mapping)."""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional

import numpy as np
from absl import logging

from qtx.weights.files import (_METADATA_KEYS, DEFAULT_HEAD_DIM, GATE_INIT_MODES,
                               checkpoint_activation, load_state_dict)

# ---------------------------------------------------------------------------------------------
# Architecture from shapes


def _depth(sd: Mapping[str, np.ndarray], prefix: str) -> int:
  pat = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
  ids = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
  if not ids:
    return 0
  if ids != set(range(len(ids))):
    raise ValueError(f"{prefix}transformer.resblocks are not numbered 0..N-1: {sorted(ids)}")
  return len(ids)


def _check_supported(sd: Mapping[str, np.ndarray]) -> None:
  if "visual.conv1.weight" not in sd:
    hints = []
    if any(k.startswith("visual.layer1.") for k in sd):
      hints.append("this is a ResNet CLIP (visual.layer1...); only ViT image towers convert")
    if any(k.startswith("visual.trunk.") for k in sd):
      hints.append("this is a timm image tower (visual.trunk...); only ViT towers convert")
    if any(k.startswith("vision_model.") or k.startswith("text_model.") for k in sd):
      hints.append("this is a Hugging Face transformers CLIPModel; export it in the "
                   "open_clip/OpenAI naming first")
    raise ValueError("not an OpenAI CLIP / open_clip ViT state_dict: 'visual.conv1.weight' is "
                     f"missing{'; ' + '; '.join(hints) if hints else ''} "
                     f"(first keys: {sorted(sd)[:8]})")
  for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight"):
    if key not in sd:
      raise ValueError(f"state_dict has no text tower key {key!r} (first keys: {sorted(sd)[:8]})")


def _heads(width: int, head_dim: int, which: str) -> int:
  if width % head_dim:
    raise ValueError(f"{which} width {width} is not a multiple of head_dim {head_dim}; pass the "
                     f"number of heads explicitly ({which}_heads=...)")
  return width // head_dim


def infer_config(state_dict: Mapping[str, np.ndarray], head_dim: int = DEFAULT_HEAD_DIM,
                 image_heads: Optional[int] = None,
                 text_heads: Optional[int] = None) -> dict[str, Any]:
  """The model architecture of a checkpoint, in the layout of `config.model`:

    {'embed_dim': E,
     'image': {image_size, patch_size, width, depth, heads, mlp_dim, channels, ln_pre},
     'text': {vocab_size, context_length, width, depth, heads, mlp_dim}}

  Shapes do not fix the number of heads: it is width // head_dim (64 for all OpenAI and
  open_clip ViT models) unless given.
  """
  sd = state_dict
  _check_supported(sd)
  conv = sd["visual.conv1.weight"]
  width, channels, patch, patch2 = conv.shape
  if patch != patch2:
    raise ValueError(f"non-square patches {conv.shape[2:]} are not supported")
  tokens = sd["visual.positional_embedding"].shape[0] - 1
  grid = int(round(math.sqrt(tokens)))
  if grid * grid != tokens:
    raise ValueError(f"visual.positional_embedding has {tokens} patch positions, not a square "
                     "grid")
  v_depth = _depth(sd, "visual.")
  t_depth = _depth(sd, "")
  t_width = sd["ln_final.weight"].shape[0]
  if "visual.proj" in sd:
    embed = sd["visual.proj"].shape[1]
  elif "text_projection" in sd:
    embed = sd["text_projection"].shape[1]
  else:
    raise ValueError("state_dict has neither visual.proj nor text_projection")
  return {
      "embed_dim": int(embed),
      "image": {
          "image_size": int(grid * patch), "patch_size": int(patch), "width": int(width),
          "depth": v_depth,
          "heads": int(image_heads or _heads(width, head_dim, "image")),
          "mlp_dim": int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
          "channels": int(channels), "ln_pre": "visual.ln_pre.weight" in sd,
      },
      "text": {
          "vocab_size": int(sd["token_embedding.weight"].shape[0]),
          "context_length": int(sd["positional_embedding"].shape[0]),
          "width": int(t_width), "depth": t_depth,
          "heads": int(text_heads or _heads(t_width, head_dim, "text")),
          "mlp_dim": int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
      },
  }


def set_model_config(config, arch: Mapping[str, Any]) -> None:
  """Writes an `infer_config` result into config.model in place."""
  config.model.embed_dim = arch["embed_dim"]
  for tower in ("image", "text"):
    for k, v in arch[tower].items():
      config.model[tower][k] = v


def config_overrides(arch: Mapping[str, Any]) -> list[str]:
  """Command-line flags that set the architecture, e.g. '--config.model.image.width=768'."""
  flags = [f"--config.model.embed_dim={arch['embed_dim']}"]
  for tower in ("image", "text"):
    flags += [f"--config.model.{tower}.{k}={v}" for k, v in arch[tower].items()]
  return flags


# ---------------------------------------------------------------------------------------------
# Conversion


def _ln(sd, prefix, used):
  used.update((prefix + ".weight", prefix + ".bias"))
  return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}


def _linear(sd, prefix, used):
  used.update((prefix + ".weight", prefix + ".bias"))
  return {"kernel": np.ascontiguousarray(sd[prefix + ".weight"].T), "bias": sd[prefix + ".bias"]}


def convert_block(sd: Mapping[str, np.ndarray], prefix: str, used: set) -> dict:
  """One residual attention block `<prefix>` (e.g. 'visual.transformer.resblocks.3')."""
  w = sd[f"{prefix}.attn.in_proj_weight"]
  b = sd[f"{prefix}.attn.in_proj_bias"]
  used.update((f"{prefix}.attn.in_proj_weight", f"{prefix}.attn.in_proj_bias"))
  if w.shape[0] != 3 * w.shape[1]:
    raise ValueError(f"{prefix}.attn.in_proj_weight has shape {w.shape}, expected (3D, D)")
  d = w.shape[1]
  attn = {name: {"kernel": np.ascontiguousarray(w[i * d:(i + 1) * d].T),
                 "bias": b[i * d:(i + 1) * d]}
          for i, name in enumerate(("query", "key", "value"))}
  attn["out"] = _linear(sd, f"{prefix}.attn.out_proj", used)
  return {"ln_1": _ln(sd, f"{prefix}.ln_1", used), "attn": attn,
          "ln_2": _ln(sd, f"{prefix}.ln_2", used),
          "mlp": {"fc1": _linear(sd, f"{prefix}.mlp.c_fc", used),
                  "fc2": _linear(sd, f"{prefix}.mlp.c_proj", used)}}


def _encoder(sd, prefix, depth, scan, used):
  blocks = [convert_block(sd, f"{prefix}transformer.resblocks.{i}", used) for i in range(depth)]
  if not scan:
    return {f"block_{i}": blk for i, blk in enumerate(blocks)}
  import jax
  return {"blocks": {"block": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}}


def patch_kernel(conv_WxCxPxP: np.ndarray) -> np.ndarray:
  """conv1 weight (W, C, P, P) -> patch_embed kernel (P*P*C, W) over patches flattened in
  (row, col, channel) order (`qtx.nn.vit.patchify`)."""
  W, C, P, _ = conv_WxCxPxP.shape
  return np.ascontiguousarray(conv_WxCxPxP.transpose(2, 3, 1, 0).reshape(P * P * C, W))


def convert(state_dict: Mapping[str, np.ndarray], config) -> dict:
  """qtx params (nested dicts of float32 numpy arrays) from an OpenAI/open_clip state_dict.

  Raises ValueError naming the checkpoint keys that have no place in qtx (e.g. layer scale,
  attention pooling), so nothing is dropped silently.
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  _check_supported(sd)
  used: set[str] = set()
  scan = bool(config.model.scan)

  def take(key):
    used.add(key)
    return sd[key]

  visual = {
      "patch_embed": {"kernel": patch_kernel(take("visual.conv1.weight"))},
      "cls_token": take("visual.class_embedding"),
      "pos_embed": take("visual.positional_embedding"),
      "encoder": _encoder(sd, "visual.", _depth(sd, "visual."), scan, used),
      "ln_post": _ln(sd, "visual.ln_post", used),
      "proj": {"kernel": take("visual.proj")},
  }
  if "visual.ln_pre.weight" in sd:
    visual["ln_pre"] = _ln(sd, "visual.ln_pre", used)
  if "text_projection" in sd:
    text_proj = take("text_projection")
  elif "text_projection.weight" in sd:
    text_proj = np.ascontiguousarray(take("text_projection.weight").T)
  else:
    raise ValueError("state_dict has no text_projection")
  textual = {
      "token_embed": take("token_embedding.weight"),
      "pos_embed": take("positional_embedding"),
      "encoder": _encoder(sd, "", _depth(sd, ""), scan, used),
      "ln_final": _ln(sd, "ln_final", used),
      "proj": {"kernel": text_proj},
  }
  params = {"visual": visual, "textual": textual}
  if "logit_scale" in sd:
    params["logit_scale"] = np.asarray(take("logit_scale"), np.float32).reshape(())
  if "logit_bias" in sd:
    params["logit_bias"] = np.asarray(take("logit_bias"), np.float32).reshape(())
  unused = sorted(k for k in sd if k not in used and k not in _METADATA_KEYS)
  if unused:
    raise ValueError(f"checkpoint parts that qtx's ViT CLIP has no place for: {unused[:12]}"
                     f"{' ...' if len(unused) > 12 else ''} ({len(unused)} keys; layer scale, "
                     "attention pooling, q/k norms and similar variants are not supported)")
  return params


# ---------------------------------------------------------------------------------------------
# Loading into a model


def _flatten(tree, prefix=()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def _name(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def _is_gate(path: tuple) -> bool:
  return "gate" in path


def _tower_attention(config, path: tuple):
  return config.model["image" if path[0] == "visual" else "text"].attention


def init_gates(flat: dict, config, mode: str) -> None:
  """Initialises the gate parameters (in `flat`, in place) for fine-tuning; see the module
  docstring for the modes."""
  if mode not in GATE_INIT_MODES:
    raise ValueError(f"unknown gate_init {mode!r}; choose one of {GATE_INIT_MODES}")
  if mode == "fresh":
    return
  gate_paths = [p for p in flat if _is_gate(p)]
  attn_paths = sorted({p[:p.index("gate")] for p in gate_paths})
  for attn in attn_paths:
    pi = float(_tower_attention(config, attn).gate_pi_init)
    bias = math.log(pi / (1.0 - pi))
    flat[attn + ("gate", "kernel")] = np.zeros_like(flat[attn + ("gate", "kernel")])
    flat[attn + ("gate", "bias")] = np.full_like(flat[attn + ("gate", "bias")], bias)
    out_kernel = attn + ("out", "kernel")
    flat[out_kernel] = (flat[out_kernel] / pi).astype(flat[out_kernel].dtype)


def merge_into_template(converted: Mapping, template: Mapping, config,
                        gate_init: str = "preserve", source: str = "checkpoint") -> dict:
  """Checkpoint params placed into the model's param tree: every shape checked, params the
  checkpoint lacks (gates, logit_bias, attention sink logits, register tokens) kept from
  `template` (then gates set by `gate_init`)."""
  if gate_init not in GATE_INIT_MODES:
    raise ValueError(f"unknown gate_init {gate_init!r}; choose one of {GATE_INIT_MODES}")
  flat_c = _flatten(converted)
  flat_t = _flatten(template)
  if "logit_bias" in {p[0] for p in flat_c} and ("logit_bias",) not in flat_t:
    logging.warning("%s has a logit_bias (SigLIP) but the model has none (loss.name=%r): "
                    "dropping it", source, config.loss.name)
    flat_c.pop(("logit_bias",))
  extra = sorted(_name(p) for p in flat_c if p not in flat_t)
  sinks = [p for p in flat_t if p not in flat_c and p[-1] == "sink"]
  if sinks:
    logging.warning("%s has no attention sink logits: the %d sink parameter(s) keep their "
                    "initial value (attention.sink_init), which moves the imported model away "
                    "from the checkpoint's function", source, len(sinks))
  registers = [p for p in flat_t if p not in flat_c and p[-1] == "registers"]
  if registers:
    logging.warning("%s has no register tokens: model.image.registers keeps its freshly "
                    "initialised tokens, which moves the imported model away from the "
                    "checkpoint's function until they are trained", source)
  missing = sorted(_name(p) for p in flat_t
                   if p not in flat_c and not _is_gate(p) and p != ("logit_bias",)
                   and p not in sinks and p not in registers)
  mismatched = sorted(f"{_name(p)}: checkpoint {tuple(np.shape(v))} vs model "
                      f"{tuple(np.shape(flat_t[p]))}"
                      for p, v in flat_c.items() if p in flat_t
                      and tuple(np.shape(v)) != tuple(np.shape(flat_t[p])))
  if extra or missing or mismatched:
    lines = [f"{source} does not fit the configured model:"]
    if mismatched:
      lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:10]))
    if missing:
      lines.append(f"  missing in the checkpoint ({len(missing)}): {missing[:10]}")
    if extra:
      lines.append(f"  not in the model ({len(extra)}): {extra[:10]}")
    lines.append("  set the model config from the checkpoint: qtx.weights.infer_config(...) "
                 "and set_model_config(config, arch), or on the command line the flags of "
                 "qtx.weights.config_overrides(arch)")
    raise ValueError("\n".join(lines))
  out = {}
  for p, t in flat_t.items():
    v = flat_c.get(p)
    out[p] = np.asarray(t) if v is None else np.asarray(v, dtype=np.asarray(t).dtype)
  init_gates(out, config, gate_init)
  return _unflatten(out)


def activation_warnings(config, known: Optional[str], why: str) -> list[str]:
  """Warnings for the model's activations against the checkpoint's (None: not known)."""
  out = []
  for tower in ("image", "text"):
    act = config.model[tower].get("activation", "gelu_tanh")
    if known is not None and act != known:
      out.append(f"model.{tower}.activation={act}, but the checkpoint is {why}: set "
                 f"--config.model.{tower}.activation={known} or the imported model computes "
                 "another function")
    elif known is None and act == "gelu_tanh":
      out.append(f"model.{tower}.activation=gelu_tanh (the default) cannot be confirmed: "
                 f"{why}; set --config.model.{tower}.activation=gelu or =quick_gelu to match "
                 "the checkpoint")
  return out


def _warn_differences(config, known: Optional[str] = None, why: str = "") -> None:
  for msg in activation_warnings(config, known, why):
    logging.warning("%s", msg)
  for tower in ("image", "text"):
    t = config.model[tower]
    if t.attention.normalizer != "softmax":
      logging.warning("model.%s.attention.normalizer=%r: the checkpoint was trained with "
                      "softmax, so the imported model starts away from it", tower,
                      t.attention.normalizer)


def load_into(path: str, params_template: Mapping, config, gate_init: str = "preserve") -> dict:
  """Params of the configured model with weights from the checkpoint file `path` (used by
  `config.init_from=<file>`). `params_template` is a freshly initialised param tree; its
  shapes are checked against the checkpoint's and it supplies the params the checkpoint
  lacks."""
  sd = load_state_dict(path)
  converted = convert(sd, config)
  params = merge_into_template(converted, params_template, config, gate_init, source=path)
  _warn_differences(config, *checkpoint_activation(sd, path))
  logging.info("imported %d tensors from %s", len(sd), path)
  return params
