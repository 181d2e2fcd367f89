"""OpenAI CLIP ViT-B/32 architecture (image 224/32, width 768 x 12; text 512 x 12, context 77),
the usual CC3M/CC12M baseline. bfloat16, data parallel with full remat and auto microbatches, a
checkpoint every 1000 steps.

  python -m qtx.main --config configs/clip_b32.py:gated --workdir gs://.../run \
      --config.data.name=... --config.data.path=...
  python -m qtx.main --config configs/clip_b32.py:runlocal --workdir /tmp/b32_smoke  # local
"""
from qtx import config_lib


def get_config(arg=None):
  return config_lib.b32_config(arg)
