"""Tiny CLIP on the embedded synthetic shapes dataset: the CPU smoke/main job.

  python -m qtx.main --config configs/clip_tiny.py --workdir /tmp/qtx_tiny
  python -m qtx.main --config configs/clip_tiny.py:clipped_softmax --workdir ...

The optional argument after ':' picks a remedy preset for both towers (softmax |
clipped_softmax | gated | gated_mlp | gated_all_heads | gated_elementwise | softplus |
softmax_sink | registers | muon; qtx.config_lib.set_normalizer).
"""
from qtx import config_lib


def get_config(arg=None):
  return config_lib.tiny_config(arg)
