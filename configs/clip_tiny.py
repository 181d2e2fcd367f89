"""Tiny CLIP on the embedded synthetic shapes dataset: the CPU smoke/main job.

  python -m qtx.main --config configs/clip_tiny.py --workdir /tmp/qtx_tiny
  python -m qtx.main --config configs/clip_tiny.py:clipped_softmax --workdir ...

The optional argument after ':' picks the attention normalizer of both towers
(softmax | clipped_softmax | gated | softplus).
"""
from qtx import config_lib


def get_config(arg=None):
  return config_lib.tiny_config(arg)
