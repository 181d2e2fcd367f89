"""Import pretrained OpenAI CLIP / open_clip ViT checkpoints into qtx params.

  sd = load_state_dict("ViT-B-16.pt")          # {name: float32 numpy array}
  arch = infer_config(sd)                      # architecture read from the shapes
  set_model_config(config, arch)               # or: config_overrides(arch) for the CLI
  params = convert(sd, config)                 # qtx param tree (nested dicts of numpy)
  params = load_into(path, template, config)   # what `config.init_from=<file>` runs

Files: .pt / .pth / .bin (PyTorch; torch is needed only here: `pip install qtx[torch]`),
loaded with `torch.load(weights_only=True)`, which runs no code from the file. OpenAI's original
releases are TorchScript archives: opening one with `torch.jit.load` runs code stored in it, so
qtx refuses them unless asked explicitly (`allow_torchscript=True`; on the command line
`python -m qtx.weights ViT-B-16.pt --allow_torchscript --save ViT-B-16.safetensors` converts
once, and training then reads the .safetensors file). .safetensors files need no torch (the `safetensors` package, or the
small reader here when it is missing). Training checkpoints that wrap the weights
({'state_dict': ...}, 'module.' prefixes) are unwrapped.

Name mapping (torch Linear weights are (out, in); qtx kernels are (in, out), so transposed):

  visual.conv1.weight (W, C, P, P)      -> visual/patch_embed/kernel (P*P*C, W), rows in the
                                           (row, col, channel) order of `vit.patchify`
  visual.class_embedding                -> visual/cls_token
  visual.positional_embedding           -> visual/pos_embed
  visual.ln_pre / ln_post               -> visual/ln_pre / ln_post  {scale, bias}
  visual.proj (W, E)                    -> visual/proj/kernel
  token_embedding.weight                -> textual/token_embed
  positional_embedding                  -> textual/pos_embed
  ln_final                              -> textual/ln_final
  text_projection (W, E)                -> textual/proj/kernel
  logit_scale (, logit_bias)            -> logit_scale (, logit_bias)
  <tower>.transformer.resblocks.N.      -> <tower>/encoder/block_N/  (or the stacked
                                           encoder/blocks/block/ with model.scan)
    ln_1, ln_2                          -> ln_1, ln_2
    attn.in_proj_weight (3D, D) / bias  -> attn/{query,key,value}/{kernel (D, D), bias}
    attn.out_proj                       -> attn/out
    mlp.c_fc, mlp.c_proj                -> mlp/fc1, mlp/fc2

Parameters the checkpoint does not have keep their fresh initialisation: `logit_bias`
(SigLIP loss) and the gates of gated attention. Gates (`gate_init`):

  'preserve' (default)  gate output kernel = 0 and bias = logit(pi_init), so every gate starts
                        at exactly pi_init for every token, and the attention output projection
                        is divided by pi_init, so the imported model computes exactly the
                        checkpoint's function at step 0. A gate of pi_init without the
                        compensation would scale every head's output by pi_init (halve it for
                        the ViT default 0.5) and fine-tuning would first have to undo that
                        damage. The gate bias starts where Bondarenko et al. (2023) initialise
                        it, in the sigmoid's steep region, so heads can learn to close (no-op)
                        quickly; an opened gate (up to 1) then amplifies a head by at most
                        1 / pi_init.
  'fresh'               keep the gates' fresh initialisation (random kernel, bias
                        logit(pi_init)) and the checkpoint's projection: the from-scratch
                        recipe; the imported model starts away from the checkpoint.

Activations: shapes cannot tell QuickGELU from GELU. OpenAI's releases (TorchScript archives, or
state_dicts that keep their metadata scalars input_resolution / context_length / vocab_size)
are recognised and use QuickGELU (`checkpoint_activation`); for any other checkpoint the
activation must be given (`python -m qtx.weights CKPT --activation gelu`, most open_clip
models). `load_into` warns when the model's activation differs from the recognised one, or
when it cannot be confirmed and is the default (tanh-approximate GELU, which no public CLIP
checkpoint uses).
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
from typing import Any, Mapping, Optional

import numpy as np
from absl import logging

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
GATE_INIT_MODES = ("preserve", "fresh")
DEFAULT_HEAD_DIM = 64
# Scalars that OpenAI's TorchScript archives keep beside the weights.
_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask",
                  "visual.attn_mask", "text.attn_mask")
_OPENAI_MARKERS = ("input_resolution", "context_length", "vocab_size")


def is_torchscript(path: str) -> bool:
  """True for a TorchScript archive (a zip with a code/ folder or constants.pkl)."""
  import zipfile
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())


def checkpoint_activation(state_dict: Mapping[str, Any], path: str | None = None
                          ) -> tuple[Optional[str], str]:
  """(activation or None, why): 'quick_gelu' for OpenAI's releases, None where the file cannot
  tell (shapes are the same for QuickGELU and GELU)."""
  if path is not None and os.path.isfile(path) and is_torchscript(path):
    return "quick_gelu", "an OpenAI TorchScript archive (OpenAI CLIP uses QuickGELU)"
  if any(k in state_dict for k in _OPENAI_MARKERS):
    return "quick_gelu", ("OpenAI's metadata keys (input_resolution, context_length, "
                          "vocab_size) are present (OpenAI CLIP uses QuickGELU)")
  return None, ("the file cannot tell QuickGELU from GELU (the shapes are the same); most "
                "open_clip models use gelu, OpenAI's quick_gelu")


# ---------------------------------------------------------------------------------------------
# Reading files


def _torch_to_numpy(obj) -> Any:
  import torch
  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    if t.is_floating_point():
      t = t.float()
    return t.numpy()
  return obj


def _load_torch(path: str, allow_torchscript: bool = False) -> Mapping[str, Any]:
  if is_torchscript(path) and not allow_torchscript:
    raise ValueError(
        f"{path} is a TorchScript archive (OpenAI's release format); reading it runs code "
        "stored in the file. Convert it once, if you trust it: python -m qtx.weights "
        f"{path} --allow_torchscript --save {os.path.splitext(path)[0]}.safetensors, then use "
        "the .safetensors file")
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path!r} needs PyTorch: pip install 'qtx[torch]' (or convert "
                      "the checkpoint to .safetensors, which needs no torch)") from e
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except RuntimeError as e:
    if "TorchScript" not in str(e) and "jit" not in str(e):
      raise
    if not allow_torchscript:
      raise ValueError(f"{path} is a TorchScript archive; pass allow_torchscript=True "
                       "(--allow_torchscript) to read it, which runs code from the file") from e
    logging.warning("%s is a TorchScript archive (OpenAI CLIP format): loading it with "
                    "torch.jit.load, which runs code from the file", path)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      obj = torch.jit.load(path, map_location="cpu").state_dict()
  return obj


def _safetensors_dtypes():
  import ml_dtypes
  return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Minimal reader of the safetensors format (8-byte little-endian header size, a JSON
  header of {name: {dtype, shape, data_offsets}}, then the raw little-endian data); handles
  bf16 and fp8, which numpy alone cannot."""
  dtypes = _safetensors_dtypes()
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    if meta["dtype"] not in dtypes:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']!r}; "
                       f"supported: {sorted(dtypes)}")
    begin, end = meta["data_offsets"]
    dt = np.dtype(dtypes[meta["dtype"]]).newbyteorder("<")
    out[name] = np.frombuffer(data[begin:end], dt).reshape(meta["shape"]).copy()
  return out


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file
  except ImportError:
    return read_safetensors(path)
  try:
    return load_file(path)
  except (TypeError, ValueError) as e:  # e.g. bf16, which numpy has no dtype for
    logging.info("safetensors.numpy could not read %s (%s); using the built-in reader", path, e)
    return read_safetensors(path)


def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
  """Training checkpoints keep the weights under 'state_dict' (or 'model', 'module')."""
  for _ in range(3):  # at most a few levels of nesting
    if not isinstance(obj, Mapping) or any(_is_array(v) for v in obj.values()):
      break
    inner = next((obj[k] for k in ("state_dict", "model", "module", "params")
                  if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      break
    obj = inner
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state_dict (a mapping of names to tensors), got "
                     f"{type(obj).__name__}")
  return obj


def _is_array(v) -> bool:
  return hasattr(v, "shape") and hasattr(v, "dtype")


def _strip_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  for k, v in sd.items():
    k = k[len("module."):] if k.startswith("module.") else k
    k = k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k
    out[k] = v
  # open_clip's CustomTextCLIP keeps the text tower under 'text.'.
  if "text.token_embedding.weight" in out and "token_embedding.weight" not in out:
    out = {(k[len("text."):] if k.startswith("text.") else k): v for k, v in out.items()}
  return out


def load_state_dict(path: str, allow_torchscript: bool = False) -> dict[str, np.ndarray]:
  """{name: numpy array} of a .pt/.pth/.bin/.safetensors checkpoint; floating tensors as
  float32 (OpenAI ships fp16), wrappers and 'module.' prefixes removed. TorchScript archives
  only with allow_torchscript (reading one runs code from the file)."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
  if path.endswith(SAFETENSORS_SUFFIX):
    raw: Mapping[str, Any] = _load_safetensors(path)
  elif path.endswith(TORCH_SUFFIXES):
    raw = _unwrap(_load_torch(path, allow_torchscript), path)
    raw = {k: _torch_to_numpy(v) for k, v in raw.items()}
  else:
    raise ValueError(f"unsupported checkpoint file {path!r}; expected one of "
                     f"{TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)}")
  out = {}
  for k, v in _strip_prefixes(raw).items():
    if not _is_array(v):
      continue
    a = np.asarray(v)
    if np.issubdtype(a.dtype, np.floating) or a.dtype.name in ("bfloat16",) or \
       a.dtype.name.startswith("float8"):
      a = a.astype(np.float32)
    out[k] = a
  return out


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
  checkpoint lacks (gates, logit_bias) kept from `template` (then gates set by `gate_init`)."""
  if gate_init not in GATE_INIT_MODES:
    raise ValueError(f"unknown gate_init {gate_init!r}; choose one of {GATE_INIT_MODES}")
  flat_c = _flatten(converted)
  flat_t = _flatten(template)
  if "logit_bias" in {p[0] for p in flat_c} and ("logit_bias",) not in flat_t:
    logging.warning("%s has a logit_bias (SigLIP) but the model has none (loss.name=%r): "
                    "dropping it", source, config.loss.name)
    flat_c.pop(("logit_bias",))
  extra = sorted(_name(p) for p in flat_c if p not in flat_t)
  missing = sorted(_name(p) for p in flat_t
                   if p not in flat_c and not _is_gate(p) and p != ("logit_bias",))
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


def write_safetensors(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
  """Writes {name: array} as a .safetensors file (float32 / float16 / int tensors)."""
  codes = {"float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "bool": "BOOL"}
  header, blobs, offset = {}, [], 0
  for k in sorted(state_dict):
    a = np.ascontiguousarray(state_dict[k])
    if a.dtype.name not in codes:
      a = a.astype(np.float32)
    b = a.tobytes()
    header[k] = {"dtype": codes[a.dtype.name], "shape": list(a.shape),
                 "data_offsets": [offset, offset + len(b)]}
    blobs.append(b)
    offset += len(b)
  h = json.dumps(header, separators=(",", ":")).encode()
  h += b" " * (-len(h) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for b in blobs:
      f.write(b)


def main(argv=None) -> int:
  """`python -m qtx.weights CHECKPOINT [--head_dim 64] [--activation A]`: prints the
  architecture read from the checkpoint and every qtx.main flag the model needs."""
  import argparse
  import sys
  parser = argparse.ArgumentParser(prog="python -m qtx.weights", description=main.__doc__)
  parser.add_argument("checkpoint", help="a .pt, .pth, .bin or .safetensors CLIP state_dict")
  parser.add_argument("--head_dim", type=int, default=DEFAULT_HEAD_DIM,
                      help="attention head width (heads = width // head_dim)")
  from qtx.nn.transformer import ACTIVATIONS
  parser.add_argument("--activation", choices=tuple(ACTIVATIONS), default=None,
                      help="the MLP activation the checkpoint was trained with; needed unless "
                           "the file is recognisably OpenAI's (QuickGELU)")
  parser.add_argument("--allow_torchscript", action="store_true",
                      help="read a TorchScript archive (runs code stored in the file)")
  parser.add_argument("--save", default=None,
                      help="also write the weights as this .safetensors file (needs no torch "
                           "and runs no code when read)")
  args = parser.parse_args(argv)
  try:
    sd = load_state_dict(args.checkpoint, allow_torchscript=args.allow_torchscript)
    arch = infer_config(sd, head_dim=args.head_dim)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  known, why = checkpoint_activation(sd, args.checkpoint)
  if args.activation and known and args.activation != known:
    print(f"error: --activation={args.activation}, but the checkpoint is {why}",
          file=sys.stderr)
    return 2
  activation = args.activation or known
  source = os.path.abspath(args.checkpoint)
  if args.save:
    if not args.save.endswith(SAFETENSORS_SUFFIX):
      print(f"error: --save needs a {SAFETENSORS_SUFFIX} path, got {args.save!r}",
            file=sys.stderr)
      return 2
    # OpenAI's metadata scalars stay (they mark the file as OpenAI's: QuickGELU); the attention
    # masks are derived data and are dropped
    write_safetensors(args.save, {k: v for k, v in sd.items()
                                  if k not in _METADATA_KEYS or k in _OPENAI_MARKERS})
    source = os.path.abspath(args.save)
  print(json.dumps({**arch, "activation": activation}, indent=2))
  flags = config_overrides(arch)
  if activation:
    flags += [f"--config.model.{t}.activation={activation}" for t in ("image", "text")]
  else:
    print(f"note: {why}; rerun with --activation gelu|quick_gelu to get the activation flags",
          file=sys.stderr)
  print(" ".join(flags + [f"--config.init_from={source}"]))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())


_OPTIONAL_IMPORTS = ("torchvision", "torchvision.ops", "torchvision.ops.misc",
                     "torchvision.transforms", "torchvision.transforms.functional", "ftfy")


def open_clip_model_class():
  """open_clip's CLIP model class, importable without torchvision and ftfy.

  open_clip imports them at module load only for image transforms and text cleaning, which
  conversions and benchmarks do not use; missing ones are replaced by placeholder modules for
  the duration of the import and removed again. Needs torch and open_clip_torch installed
  (`pip install torch open_clip_torch --no-deps`).
  """
  import sys
  import types

  class _Anything(type):
    def __getattr__(cls, attr):
      if attr.startswith("__"):
        raise AttributeError(attr)
      return cls

  class _Stub(metaclass=_Anything):
    def __init__(self, *a, **k):
      pass

  def _attr(attr):
    if attr.startswith("__"):
      raise AttributeError(attr)
    return _Stub

  added = []
  for name in _OPTIONAL_IMPORTS:
    if name in sys.modules:
      continue
    try:
      __import__(name)
      continue
    except ImportError:
      pass
    m = types.ModuleType(name)
    m.__getattr__ = _attr
    m.__path__ = []
    sys.modules[name] = m
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
      setattr(sys.modules[parent], child, m)
    added.append(name)
  try:
    from open_clip.model import CLIP
  finally:
    for name in added:
      sys.modules.pop(name, None)
  return CLIP
