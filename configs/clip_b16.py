"""OpenAI CLIP ViT-B/16 architecture (image 224/16, width 768 x 12; text 512 x 12, context 77).

  python -m qtx.main --config configs/clip_b16.py:gated --workdir gs://.../run
"""
from qtx import config_lib


def get_config(arg=None):
  return config_lib.b16_config(arg)
