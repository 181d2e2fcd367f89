"""Where does a model trained on the embedded shapes task go wrong? Colour vs shape errors,
shape accuracy per size, and two probes of the text side:

- in-distribution shape probe: for every eval image, six captions (template 0) with the image's
  true colour, size and position and each shape; the model picks one. High accuracy here with
  low zero-shot accuracy means the image tower knows the shape but the prompts do not reach it.
- attribute ensemble: zero-shot with every class prompted by all its size x position x template
  captions (mean embedding), instead of the 7 generic templates.

  python scripts/shape_probe.py runs/sweep/softmax/seed0
"""
from __future__ import annotations

import sys

import numpy as np
from qtx import run as run_lib


def main(workdir: str) -> None:
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  from qtx import evaluate
  from qtx.data import pipeline, synthetic as syn, tokenizer as tok

  cfg, s, params, step = run_lib.load_run(workdir)
  enc_i, enc_t = run_lib.make_encoders(s)
  text = lambda x: enc_t(params, x)
  ctx = cfg.model.text.context_length
  task = pipeline.eval_task(cfg)
  src = syn.SyntheticShapes("eval", cfg.model.image.image_size, cfg.seed, size=len(task.labels))
  n, S = len(task.labels), len(syn.SHAPES)
  zi = evaluate.encode_batched(lambda x: enc_i(params, x), task.images, 250)
  ct = evaluate.class_embeddings(text, task.prompt_tokens(ctx), 250)
  pred, lab = np.argmax(zi @ ct.T, -1), task.labels
  attrs = [src.attributes(i) for i in range(n)]
  print(f"{workdir} (step {step}): zero-shot top-1 {np.mean(pred == lab):.3f} | colour "
        f"{np.mean(pred // S == lab // S):.3f} | shape {np.mean(pred % S == lab % S):.3f}")
  for size in syn.SIZES:
    m = np.array([a["size"] == size for a in attrs])
    print(f"  shape accuracy, {size}: {np.mean(pred[m] % S == lab[m] % S):.3f}")

  caps = [syn.caption({**a, "shape": sh}, template=0) for a in attrs for sh in syn.SHAPES]
  zt = evaluate.encode_batched(text, tok.tokenize(caps, ctx).astype(np.int32), 300)
  sp = np.argmax(np.einsum("nd,nsd->ns", zi, zt.reshape(n, S, -1)), -1)
  print(f"  in-distribution shape probe: {np.mean(sp == lab % S):.3f}")

  prompts = [syn.caption({"color": c, "shape": sh, "size": sz, "position": pos}, template=t)
             for c in syn.COLORS for sh in syn.SHAPES for sz in syn.SIZES
             for pos in syn.POSITIONS for t in range(len(syn.CAPTION_TEMPLATES))]
  prompt_tokens = tok.tokenize(prompts, ctx).astype(np.int32).reshape(
      len(syn.CLASS_NAMES), -1, ctx)
  ce = evaluate.class_embeddings(text, prompt_tokens, 1000)
  print(f"  attribute-ensemble zero-shot top-1: {np.mean(np.argmax(zi @ ce.T, -1) == lab):.3f}")


if __name__ == "__main__":
  for wd in sys.argv[1:] or ["runs/sweep/softmax/seed0"]:
    main(wd)
