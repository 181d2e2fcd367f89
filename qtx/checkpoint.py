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


def restore_params(path: str, abstract_state) -> Any:
  """Train state from a qtx checkpoint directory (a run's workdir, its checkpoints/ folder, or one
  step folder). Raises FileNotFoundError naming the path when nothing is there."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  candidates = [path, os.path.join(path, "checkpoints")]
  for c in candidates:
    if os.path.isdir(c) and any(d.isdigit() for d in os.listdir(c)):
      mgr = ocp.CheckpointManager(c)
      step = mgr.latest_step()
      out = mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
      mgr.close()
      return out["state"]
  if os.path.isdir(os.path.join(path, "state")):
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    return ckptr.restore(path, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]
  raise FileNotFoundError(f"no qtx checkpoint found under {path!r} (expected step folders, "
                          "a checkpoints/ folder, or a step folder with 'state')")


def init_from(path: str, setup, seed: int):
  """Fresh train state whose params come from `path` (qtx checkpoint, or a PyTorch CLIP
  state_dict when qtx.weights is available); optimizer state and step start anew."""
  from qtx import train
  state = train.init_state(setup, seed)
  if os.path.isfile(path) and path.endswith((".pt", ".pth", ".bin", ".safetensors")):
    from qtx import weights
    params = weights.load_into(path, jax.device_get(state.params), setup.config)
  else:
    params = restore_params(path, setup.abstract_state).params
  params = jax.device_put(params, setup.state_sharding.params)
  return state.replace(params=params, opt_state=setup.tx.init(params))
