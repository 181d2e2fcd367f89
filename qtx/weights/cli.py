"""`python -m qtx.weights CHECKPOINT`: the architecture of a CLIP checkpoint and the qtx.main
flags that load it."""
from __future__ import annotations

import json
import os

from qtx.weights.convert import config_overrides, infer_config
from qtx.weights.files import (_METADATA_KEYS, _OPENAI_MARKERS, DEFAULT_HEAD_DIM,
                               SAFETENSORS_SUFFIX, checkpoint_activation, load_state_dict,
                               write_safetensors)


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
