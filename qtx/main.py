"""qtx command line.

  python -m qtx.main --config configs/clip_tiny.py --workdir /tmp/run [--config.KEY=VALUE ...]

Modes (--config.mode=...):
  train  train (resuming from WORKDIR/checkpoints), evaluate every eval.every_steps and at the end
  eval   zero-shot, retrieval and outliers of config.init_from (or WORKDIR's latest checkpoint)
  ptq    calibrate on quant.calib_batches batches, then evaluate float and fake-quantized models
  sweep  train + ptq per preset of sweep.normalizers and seed of sweep.seeds, one result table
  compile  compile the programs for a TPU topology (compile.topology, e.g. v5e:2x4) on any host:
         memory per chip, cost model, roofline (WORKDIR/compile.json); no data, no TPU

Presets: configs/clip_tiny.py (CPU, embedded data), configs/clip_b16.py and configs/clip_b32.py
(OpenAI ViT-B/16 and B/32 for accelerators; they refuse the embedded data unless 'runlocal').
Config words after ':' (comma-separated): a remedy preset for both towers, softmax |
clipped_softmax | gated | softplus | softmax_sink | gated_mlp | gated_all_heads |
gated_elementwise | registers | muon, and/or runlocal (configs/clip_b16.py:gated,runlocal).

Main config fields: model.{image,text}.attention.{normalizer,gamma,alpha,gate,impl},
model.image.registers, train.optimizer (adamw|muon),
loss.name (clip|siglip|infoloob), data.name, data.path, train.{batch_size,total_steps,lr},
eval.every_steps, checkpoint.{every_steps,keep}, mesh.shape, quant.*.
--print_config prints the resolved config (preset + overrides) and exits; --verbose shows the
traceback of a configuration or input error instead of its one-line message.
Every run appends JSON lines to WORKDIR/metrics.jsonl and writes TensorBoard events beside it.
"""
from __future__ import annotations

import sys

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
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError)


def run(config, workdir: str):
  """Run config.mode in WORKDIR (qtx.modes.run); returns the mode's result."""
  from qtx import modes
  return modes.run(config, workdir)


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
    print(f"qtx: error: {' '.join(str(e).split())}\n(rerun with --verbose for the traceback)",
          file=sys.stderr)
    sys.exit(2)


def _flag_error_line(e: BaseException) -> str:
  """One line for a command-line error: a misspelt key or section (ml_collections' KeyError /
  AttributeError, with its 'Did you mean' hint), a bad config word, a bad value."""
  chain, cur = [], e
  while cur is not None and len(chain) < 8:
    chain.append(cur)
    cur = cur.__cause__ or cur.__context__
  texts = [" ".join(str(x.args[0] if x.args else x).replace("\\n", " ").split()) for x in chain]
  keyish = [x for x in chain if isinstance(x, (KeyError, AttributeError))]
  if keyish:
    name = str(keyish[-1].args[0] if keyish[-1].args else "").strip("'\"").split("'")[0]
    hint = next((t[t.find("Did you mean"):].replace('\\"', '"') for t in texts
                 if "Did you mean" in t), "")
    return (f"unknown config key {name!r} in the command line"
            f"{'; ' + hint.strip(chr(39)) if hint else ''} (--print_config shows every key)")
  inner = next((t for x, t in zip(reversed(chain), reversed(texts))
                if isinstance(x, (ValueError, TypeError)) and t), texts[0])
  return inner


def parse_flags_or_exit(argv) -> list:
  """Parse the flags (config file, its words and overrides) before absl's app.run, so that a
  command-line error is one line and exit code 2 (the traceback with --verbose); returns the
  remaining arguments, which app.run takes instead of parsing a second time."""
  app.define_help_flags()  # --help / --helpshort / --helpfull, as app.run would define them
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - config files raise anything; all are user errors here
    if "--verbose" in argv or "--verbose=true" in argv:
      raise
    print(f"qtx: error: {_flag_error_line(e)}\n(rerun with --verbose for the traceback)",
          file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  from qtx import hostmem
  hostmem.maybe_reuse_freed_memory()  # before JAX starts its CPU threads
  rest = parse_flags_or_exit(sys.argv)
  app.run(main, flags_parser=lambda _argv: rest)
