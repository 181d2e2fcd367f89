"""qtx command line.

  python -m qtx.main --config configs/clip_tiny.py --workdir /tmp/run [--config.KEY=VALUE ...]

config.mode:
  train  train (resuming from WORKDIR/checkpoints), evaluate every eval.every_steps and at the end
  eval   zero-shot and retrieval of config.init_from (or WORKDIR's latest checkpoint)
  ptq    calibrate on quant.calib_batches batches, then evaluate float and fake-quantized models

Presets: configs/clip_tiny.py (CPU, embedded data), configs/clip_b16.py (OpenAI ViT-B/16);
a normalizer preset after ':' sets both towers: softmax | clipped_softmax | gated | softplus
(configs/clip_tiny.py:gated).

Main config fields: model.{image,text}.attention.{normalizer,gamma,alpha,gate,impl},
loss.name (clip|siglip|infoloob), data.name, data.path, train.{batch_size,total_steps,lr},
eval.every_steps, checkpoint.{every_steps,keep}, mesh.shape, quant.*.
--print_config prints the resolved config (preset + overrides) and exits; --verbose shows the
traceback of a configuration or input error instead of its one-line message.
Every run appends JSON lines to WORKDIR/metrics.jsonl and writes TensorBoard events beside it.
"""
from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py), optionally with ':arg'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and figures.")
_PRINT = flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")
_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "Show tracebacks of configuration and input errors.")
flags.mark_flags_as_required(["config"])

# Errors that mean "the configuration or the input is wrong": one line for people.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def run(config, workdir: str) -> dict:
  """Dispatch on config.mode; returns the final metrics."""
  from qtx import config_lib
  config_lib.validate(config)
  from etils import epath
  from qtx.metrics import is_remote
  if not is_remote(workdir):
    workdir = os.path.abspath(os.path.expanduser(workdir))
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if config.mode == "train" and jax.process_index() == 0:
    for line in resume_changes(config, workdir):
      print(f"qtx: warning: {line}", file=sys.stderr, flush=True)
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


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


# Keys that define which sample comes next (the checkpointed data position) or the model: a
# resume that changes one is refused instead of continuing with a different meaning.
DATA_ORDER_KEYS = ("seed", "data.name", "data.path", "data.eval_path", "data.num_workers",
                   "data.augment", "data.augment_scale", "train.batch_size", "data.image_size")


def resume_changes(config, workdir: str) -> list[str]:
  """Lines naming every config key that differs from the run this workdir holds, when training
  resumes from its checkpoints (empty for a new run). Raises ValueError when a key of
  DATA_ORDER_KEYS or model.* changed."""
  import json
  from etils import epath
  from qtx import config_lib
  wd = epath.Path(workdir)
  saved = wd / "config.json"
  ckpts = wd / "checkpoints"
  if not (saved.exists() and ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
    return []
  # the JSON round trip makes legacy tuples compare like the saved lists
  old = _flat(json.loads(json.dumps(config_lib.fill_legacy(json.loads(saved.read_text())))))
  new = _flat(json.loads(config.to_json_best_effort()))
  changed = [k for k in sorted(set(old) | set(new))
             if k not in ("mode", "init_from") and old.get(k, "<absent>") != new.get(k, "<absent>")]
  if not changed:
    return []
  order = [k for k in changed if k in DATA_ORDER_KEYS or k.startswith("model.")]
  if order:
    raise ValueError(
        f"resuming {workdir}: {', '.join(f'{k} {old.get(k)!r} -> {new.get(k)!r}' for k in order)}"
        " changed since the run was started; the saved data position (or the model) would not "
        "mean the same any more. Use a new --workdir, or resume with the old values")
  head = (f"resuming {workdir} with a config that differs from the one it was trained with "
          f"({len(changed)} key(s)); the run continues from its checkpoint with the new values:")
  return [head] + [f"  {k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
                   for k in changed]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _PRINT.value:
    print(_CONFIG.value)
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (where metrics, checkpoints and figures go)")
  from qtx import distributed
  distributed.initialize()
  logging.set_verbosity(logging.WARNING)
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except USER_ERRORS as e:
    if _VERBOSE.value:
      raise
    print(f"qtx: error: {e}\n(rerun with --verbose for the traceback)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
