"""Train-step time of the working tree against an earlier commit, both in one process.

  python -m benchmarks.vs_commit --base db99856 --config configs/clip_tiny.py --rounds 10 \
      --set model.image.activation=gelu --set model.text.activation=gelu

The base commit's `qtx` package and configs are exported with `git archive` into a temporary
directory and imported as the package `qtx_base` (every `qtx` module reference rewritten), so
the two versions build, compile and run side by side under the same process-wide settings
(host memory, XLA flags, threads). After warming both up, each round times `--steps` steps of
one side and then of the other, the order reversed every round; it prints each side's step time
(median, min-max) and the median of the per-round speedups base / working tree. Separate
processes on a shared 2-core machine differ by +-10% from run to run, more than most changes
are worth; alternating in one process cancels that drift.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile

BASE_PACKAGE = "qtx_base"
_REF = re.compile(r"(?<![\w/])qtx(?=[.\s])")


def export_commit(rev: str, root: str, repo: str = ".") -> str:
  """Writes `rev`'s qtx package (as BASE_PACKAGE) and configs under `root`; returns root."""
  data = subprocess.run(["git", "-C", repo, "archive", "--format=tar", rev, "qtx", "configs"],
                        check=True, capture_output=True).stdout
  tar_path = os.path.join(root, "base.tar")
  with open(tar_path, "wb") as f:
    f.write(data)
  with tarfile.open(tar_path) as tf:
    tf.extractall(root, filter="data")
  os.rename(os.path.join(root, "qtx"), os.path.join(root, BASE_PACKAGE))
  for d in (BASE_PACKAGE, "configs"):
    for dirpath, _, files in os.walk(os.path.join(root, d)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(dirpath, name)
          with open(path) as f:
            text = f.read()
          with open(path, "w") as f:
            f.write(_REF.sub(BASE_PACKAGE, text))
  return root


def stepper(package: str, config_path: str, batch: int | None, sets: list[str],
            devices: int = 1):
  """A callable running one train step of `package` data-parallel over `devices` devices,
  blocked on its result."""
  from benchmarks.vs_open_clip import qtx_stepper
  config_lib = importlib.import_module(f"{package}.config_lib")
  config = config_lib.load_config_file(config_path)
  config.mesh.num_devices = devices
  config.mesh.shape = {"data": devices, "fsdp": 1, "tensor": 1}
  if batch:
    config.train.batch_size = batch
  for kv in sets:
    config_lib.override(config, kv)
  return qtx_stepper(config, package)


def alternate(steppers: dict, steps: int, rounds: int, warmup: int = 5) -> dict:
  """{name: [ms per step, one value per round]}, the order reversed every round
  (vs_open_clip.alternate, in milliseconds per step)."""
  from benchmarks import vs_open_clip
  per_s = vs_open_clip.alternate(steppers, 1, steps, rounds, warmup)
  return {k: [1e3 / x for x in v] for k, v in per_s.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--base", required=True, help="git revision to compare against")
  p.add_argument("--config", default="configs/clip_tiny.py")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--steps", type=int, default=8, help="steps per side per round")
  p.add_argument("--rounds", type=int, default=10)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override applied to both sides (repeatable)")
  p.add_argument("--devices", type=int, default=1,
                 help="split the batch over this many CPU devices on both sides "
                      "(vs_open_clip --devices)")
  args = p.parse_args(argv)
  import jax
  if args.devices > 1:
    jax.config.update("jax_num_cpu_devices", args.devices)
  rev = subprocess.run(["git", "rev-parse", "--short", args.base], check=True,
                       capture_output=True, text=True).stdout.strip()
  with tempfile.TemporaryDirectory() as root:
    export_commit(args.base, root)
    sys.path.insert(0, root)
    base_config = os.path.join(root, args.config)
    steppers = {f"base {rev}": stepper(BASE_PACKAGE, base_config, args.batch, args.set,
                                                   args.devices),
                "working tree": stepper("qtx", args.config, args.batch, args.set,
                                             args.devices)}
    res = alternate(steppers, args.steps, args.rounds)
  (base_name, base), (_, new) = res.items()
  speedups = [b / n for b, n in zip(base, new)]
  print(f"device {jax.devices()[0].device_kind} | jax {jax.__version__} | config {args.config} "
        f"{' '.join(args.set)} | {args.devices} device(s) | {args.rounds} rounds of {args.steps} steps per side")
  for name, v in res.items():
    print(f"{name:14s} {statistics.median(v):7.1f} ms/step (min {min(v):.1f}, max {max(v):.1f})")
  print(f"speedup of the working tree over {base_name}: {statistics.median(speedups):.3f} "
        f"(rounds: {', '.join(f'{x:.2f}' for x in speedups)})")
  return res


if __name__ == "__main__":
  from qtx import hostmem
  hostmem.maybe_reuse_freed_memory()  # as python -m qtx.main does on the CPU
  main()
