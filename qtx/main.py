"""qtx command line.

  python -m qtx.main --config configs/clip_tiny.py --workdir /tmp/run [--config.KEY=VALUE ...]

config.mode:
  train  train (resuming from WORKDIR/checkpoints), evaluate every eval.every_steps and at the end
  eval   zero-shot and retrieval of config.init_from (or WORKDIR's latest checkpoint)
  ptq    calibrate on quant.calib_batches batches, then evaluate float and fake-quantized models

Main config fields: model.{image,text}.attention.{normalizer,gamma,alpha,gate,impl},
loss.name (clip|siglip|infoloob), data.name, data.path, train.{batch_size,total_steps,lr},
eval.every_steps, checkpoint.{every_steps,keep}, mesh.shape, quant.*.
Every run appends JSON lines to WORKDIR/metrics.jsonl and writes TensorBoard events beside it.
"""
from __future__ import annotations

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py), optionally with ':arg'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and figures.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str) -> dict:
  """Dispatch on config.mode; returns the final metrics."""
  from qtx import config_lib
  config_lib.validate(config)
  from etils import epath
  from qtx.metrics import is_remote
  if not is_remote(workdir):
    workdir = os.path.abspath(os.path.expanduser(workdir))
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
  if config.mode == "train":
    from qtx import train
    return train.train_and_evaluate(config, workdir)
  if config.mode == "eval":
    from qtx import eval_run
    return eval_run.run_eval(config, workdir)
  if config.mode == "ptq":
    from qtx.quant import ptq
    return ptq.run_ptq(config, workdir)
  raise ValueError(f"unknown mode {config.mode!r}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from qtx import distributed
  distributed.initialize()
  logging.set_verbosity(logging.WARNING)
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
