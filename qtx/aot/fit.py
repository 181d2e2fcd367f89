"""Making the train step fit: microbatches chosen from the compiler's memory plan, and the
largest per-chip batch that fits.

`train.microbatches = 0` (auto, the pod presets' setting) compiles the train step with 1, 2,
4, ... microbatches (qtx.step.microbatched_grads: the exact full-batch contrastive loss with one
microbatch's activations at a time) and takes the fewest whose planned memory stays below
(1 - headroom) of the chip's HBM. Compile mode (compile-only TPU devices) and a real run on
TPUs or GPUs decide the same way; on the CPU, which has no fixed memory, auto is 1.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

from qtx import chips as chips_lib
from qtx import parallel
from qtx import run as run_lib
from qtx.aot import programs as programs_lib
from qtx.aot import report


def batch_devices(config, n_devices: int) -> int:
  """Devices the batch is split over (the mesh's data x fsdp axes)."""
  sizes = dict(zip(parallel.MESH_AXES, parallel.mesh_shape(config.mesh.shape, n_devices)))
  return sizes["data"] * sizes["fsdp"]


def microbatch_candidates(batch: int, split: int) -> list[int]:
  """1, 2, 4, ... : microbatch counts M whose microbatches (batch / M rows) still split evenly
  over `split` devices."""
  out, m = [], 1
  while batch % m == 0 and (batch // m) % split == 0:
    out.append(m)
    m *= 2
  return out


def with_batch(config, batch: int, microbatches: int):
  c = copy.deepcopy(config)
  c.train.batch_size = batch
  c.train.microbatches = microbatches
  return c


def compile_train(config, devices, *, topology: str = "", hosts: int = 1,
                  headroom: float = report.DEFAULT_HEADROOM,
                  chip: Optional[chips_lib.Chip] = None) -> dict:
  """Record (qtx.aot.report) of the train step of `config` as it stands."""
  run = run_lib.build(config, train=True, devices=devices, validate=False)
  prog = programs_lib.train(config, run)
  return report.compile_program(prog, devices, topology=topology, hosts=hosts,
                                microbatches=config.train.microbatches, headroom=headroom,
                                chip=chip)


def choose_microbatches(config, devices, *, log: Callable[[str], None] = print,
                        **kw) -> tuple[int, list[dict]]:
  """(fewest microbatches whose train step fits, the record of every try); ValueError naming the
  compiler's numbers and what to change when none fits."""
  B = config.train.batch_size
  split = batch_devices(config, len(devices))
  tries = []
  cands = microbatch_candidates(B, split)
  if not cands:
    raise ValueError(f"train.batch_size {B} does not split over the {split} devices of the "
                     f"batch axes; make it a multiple of {split}")
  for m in cands:
    rec = compile_train(with_batch(config, B, m), devices, **kw)
    tries.append(rec)
    log(f"qtx: train step with {m} microbatch(es): {_fit_words(rec)}")
    if rec["fits"]:
      return m, tries
  last = tries[-1]
  raise ValueError(
      f"the train step does not fit: batch {B} ({B // len(devices)} per chip) needs "
      f"{_fit_words(last)} even with {last['microbatches']} microbatches. Lower "
      f"train.batch_size, use more chips, or set model.remat=full")


def _fit_words(rec: dict) -> str:
  if rec.get("error"):
    return f"the compiler refused it ({rec['error'][:200]})"
  cap = rec.get("hbm_bytes")
  return (f"{rec['used_bytes'] / 2**30:.2f} GiB planned of "
          f"{'?' if cap is None else f'{cap / 2**30:.2f}'} GiB"
          f" -> {'fits' if rec['fits'] else 'too much'}")


def find_batch(config, devices, *, multiple: int = 8, log: Callable[[str], None] = print,
               **kw) -> tuple[Optional[int], list[dict]]:
  """(largest per-chip batch, a multiple of `multiple`, whose train step fits with the
  config's microbatches (1 when auto), every try's record): doubling from `multiple`, then
  bisection."""
  n = len(devices)
  m = max(int(config.train.microbatches), 1)
  tries = []

  def fits(per_chip):
    rec = compile_train(with_batch(config, per_chip * n, m), devices, **kw)
    tries.append(rec)
    log(f"qtx: batch {per_chip}/chip: {_fit_words(rec)}")
    return bool(rec["fits"])

  good, bad = None, None
  b = multiple
  while bad is None:
    if fits(b):
      good, b = b, b * 2
    else:
      bad = b
    if b > 1 << 16:
      break
  if good is None:
    return None, tries
  while bad is not None and bad - good > multiple:
    mid = (good + bad) // 2 // multiple * multiple
    if mid in (good, bad):
      break
    if fits(mid):
      good = mid
    else:
      bad = mid
  return good, tries


def resolve_for_run(config, run: run_lib.Run, log: Callable[[str], None] = print) -> int:
  """train.microbatches for a real run on `run`'s devices: the configured count, or with 0
  (auto) the fewest that fit on an accelerator of the chip table (1 on the CPU)."""
  m = int(config.train.microbatches)
  if m > 0:
    return m
  devices = list(run.mesh.devices.flat)
  chip = chips_lib.of_device(devices[0])
  if chip is None:
    log("qtx: train.microbatches=auto -> 1 (no fixed device memory on this platform)")
    return 1
  hbm = _device_capacity(devices[0]) or chip.hbm_bytes
  chip = dataclasses.replace(chip, hbm_bytes=hbm)
  m, tries = choose_microbatches(config, devices, chip=chip, log=log)
  log(f"qtx: train.microbatches=auto -> {m} ({_fit_words(tries[-1])})")
  return m


def _device_capacity(device) -> Optional[int]:
  try:
    return int(device.memory_stats()["bytes_limit"])
  except Exception:  # noqa: BLE001 - compile-only devices and some backends have none
    return None
