"""Checkpoint files: PyTorch (.pt/.pth/.bin, TorchScript only on request) and .safetensors
reading and writing, OpenAI release detection, and open_clip's model class for comparisons.
`qtx.weights` documents the whole import."""
from __future__ import annotations

import json
import os
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
