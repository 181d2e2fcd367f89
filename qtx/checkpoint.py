"""Checkpoints: orbax CheckpointManager holding the train state and the data-iterator state.

- async saves every `checkpoint.every_steps` steps and at the end, keep-N policy;
- restore of the latest step onto the current mesh (shardings come from the abstract state, so
  a checkpoint written on one mesh restores onto another);
- SIGTERM (preemption) sets a flag; the loop saves at the current step and exits cleanly.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging


class PreemptionWatcher:
  """Turns SIGTERM into a flag that the training loop polls (main thread only)."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._old = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._old[sig] = signal.signal(sig, self._handler)

  def _handler(self, signum, frame):
    logging.warning("received signal %d: will checkpoint and exit", signum)
    self._event.set()

  def requested(self) -> bool:
    return self._event.is_set()

  def close(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}


def _data_args(data_iter, save: bool):
  try:
    import grain
    if hasattr(data_iter, "get_state"):
      return (grain.checkpoint.CheckpointSave(data_iter) if save
              else grain.checkpoint.CheckpointRestore(data_iter))
  except (ImportError, AttributeError):  # pragma: no cover
    pass
  return None


class Manager:
  """Thin wrapper over ocp.CheckpointManager with items 'state' and 'data'."""

  def __init__(self, directory: str, config, async_save: bool = True):
    self.directory = directory if "://" in str(directory) else os.path.abspath(directory)
    self.every = int(config.checkpoint.every_steps)
    keep = int(config.checkpoint.keep)
    if keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                        enable_async_checkpointing=async_save)
    self._mgr = ocp.CheckpointManager(self.directory, options=opts)

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def latest_step(self) -> Optional[int]:
    return self._mgr.latest_step()

  def save(self, step: int, state, data_iter=None, force: bool = False) -> bool:
    if step in (self._mgr.all_steps() or ()):
      return False
    items = {"state": ocp.args.StandardSave(state)}
    data = _data_args(data_iter, save=True) if data_iter is not None else None
    if data is not None:
      items["data"] = data
    return self._mgr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, data_iter=None):
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    data = _data_args(data_iter, save=False) if data_iter is not None else None
    if data is not None and "data" in self._item_names(step):
      items["data"] = data
    out = self._mgr.restore(step, args=ocp.args.Composite(**items))
    return out["state"]

  def _item_names(self, step):
    from etils import epath
    path = epath.Path(self.directory) / str(step)
    return {p.name for p in path.iterdir()} if path.is_dir() else set()

  def restore_latest(self, abstract_state, data_iter=None):
    step = self.latest_step()
    if step is None:
      return None
    return self.restore(step, abstract_state, data_iter)

  def wait(self):
    self._mgr.wait_until_finished()

  def close(self):
    self._mgr.wait_until_finished()
    self._mgr.close()


def _has_steps(path) -> bool:
  from etils import epath
  p = epath.Path(path)
  return p.is_dir() and any(d.name.isdigit() for d in p.iterdir())


def checkpoint_path(config, workdir: str) -> str:
  """Where a run's params come from: config.init_from, else WORKDIR (its checkpoints/ folder).

  Raises FileNotFoundError naming the path that was looked at when nothing is there.
  """
  if config.init_from:
    path = _abspath(config.init_from)
    if not _exists(path):
      raise FileNotFoundError(f"config.init_from={config.init_from!r}: checkpoint {path!r} does "
                              "not exist")
    return path
  ckpt_dir = os.path.join(_abspath(workdir), "checkpoints")
  if not _has_steps(ckpt_dir):
    raise FileNotFoundError(
        f"no checkpoint to load: config.init_from is empty and {ckpt_dir!r} holds no "
        "checkpoint; train into this workdir first or pass --config.init_from=CKPT")
  return _abspath(workdir)


def _abspath(path: str) -> str:
  return path if "://" in str(path) else os.path.abspath(os.path.expanduser(path))


def _exists(path: str) -> bool:
  from etils import epath
  return epath.Path(path).exists()


def step_folder(path: str) -> str:
  """The step folder a qtx checkpoint path names: the latest step of a workdir or of its
  checkpoints/ folder, or the step folder itself."""
  from etils import epath
  path = _abspath(path)
  if not _exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  for c in (path, os.path.join(path, "checkpoints")):
    if _has_steps(c):
      steps = [int(d.name) for d in epath.Path(c).iterdir() if d.name.isdigit()
               and (d / "state").exists()]
      if steps:
        return os.path.join(c, str(max(steps)))
  if (epath.Path(path) / "state").is_dir():
    return path
  raise FileNotFoundError(f"no qtx checkpoint found under {path!r} (expected step folders, "
                          "a checkpoints/ folder, or a step folder with 'state')")


def restore_params(path: str, abstract_params) -> tuple[Any, int]:
  """(params, step) of a qtx checkpoint (see step_folder), read without the optimizer state:
  only the parameters are loaded, onto the shardings `abstract_params` carries."""
  folder = step_folder(path)
  from qtx import parallel
  mesh = parallel.mesh_of(abstract_params)
  step_sharding = (parallel.replicated(mesh) if mesh is not None
                   else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  item = {"params": abstract_params,
          "step": jax.ShapeDtypeStruct((), jax.numpy.int32, sharding=step_sharding)}
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  out = ckptr.restore(os.path.join(folder, "state"), args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True))
  return out["params"], int(jax.device_get(out["step"]))

