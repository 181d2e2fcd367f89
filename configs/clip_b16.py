"""OpenAI CLIP ViT-B/16 architecture (image 224/16, width 768 x 12; text 512 x 12, context 77).
bfloat16, data parallel with full remat and auto microbatches, a checkpoint every 1000 steps; it
refuses the embedded synthetic data unless the config words include 'runlocal'.

  python -m qtx.main --config configs/clip_b16.py:gated --workdir gs://.../run \
      --config.data.name=... --config.data.path=...
  python -m qtx.main --config configs/clip_b16.py:gated,runlocal --workdir /tmp/b16_smoke
"""
from qtx import config_lib


def get_config(arg=None):
  return config_lib.b16_config(arg)
