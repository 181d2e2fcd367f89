"""Modes: what a run does with its config (`config.mode`), one module each.

  train   train (resuming from WORKDIR/checkpoints), evaluate every eval.every_steps and at the end
  eval    zero-shot, retrieval and outlier statistics of config.init_from (or WORKDIR's checkpoint)
  ptq     calibrate on quant.calib_batches batches, evaluate the float and fake-quantized models
  sweep   train + PTQ for each preset of sweep.normalizers and seed of sweep.seeds, one table
  compile the programs compiled for a TPU topology on any host (qtx.aot), shapes only

`run(config, workdir)` is the entry point (the CLI calls it): it validates the config once,
prepares the workdir (a changed config on resume is reported, or refused where it would change
the data order or the model), saves WORKDIR/config.json and runs the mode.
"""
from __future__ import annotations

import importlib
import os
import sys

import jax
from etils import epath

from qtx import config_lib

MODES = config_lib.MODES


def run(config, workdir: str):
  """Validate, prepare WORKDIR, dispatch on config.mode; returns the mode's result."""
  config_lib.validate(config)
  module = importlib.import_module(f"qtx.modes.{config.mode}")
  from qtx.metrics import is_remote
  if not is_remote(workdir):
    workdir = os.path.abspath(os.path.expanduser(workdir))
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    check = getattr(module, "resume_changes", None)
    for line in (check(config, workdir) if check else []):
      print(f"qtx: warning: {line}", file=sys.stderr, flush=True)
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
  return module.run(config, workdir)
