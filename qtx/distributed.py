"""Multi-host start-up: `jax.distributed.initialize` from the environment.

- SLURM jobs with several tasks, and GKE TPU pods: jax detects the cluster itself.
- Cloud TPU VMs (`launch/tpu_pod.sh`): QTX_DISTRIBUTED=auto makes jax detect the pod from the
  metadata server.
- Anything else (e.g. `launch/local.py`): QTX_COORDINATOR=host:port, QTX_NUM_PROCESSES,
  QTX_PROCESS_ID.
- QTX_LOCAL_DEVICE_IDS="0,1,2,3" restricts a process to those local devices (e.g. one SLURM
  task per node that should drive all of the node's GPUs).
- A single process with none of these set runs as is; QTX_DISTRIBUTED=off disables all of it.
"""
from __future__ import annotations

import os

import jax


def _local_device_ids():
  ids = os.environ.get("QTX_LOCAL_DEVICE_IDS")
  if not ids:
    return None
  try:
    return [int(i) for i in ids.split(",") if i.strip()]
  except ValueError:
    raise ValueError(f"QTX_LOCAL_DEVICE_IDS={ids!r} must be comma-separated integers") from None


def _env_cluster() -> bool:
  if "SLURM_JOB_ID" in os.environ:
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1
  from qtx import tpu_host
  # a TPU pod's worker list means something only on a host with TPU chips (without any, it is
  # qtx.tpu_host's placeholder for compile-only libtpu, perhaps inherited by a child process)
  if ("TPU_WORKER_HOSTNAMES" in os.environ and not tpu_host.placeholder_env()
      and tpu_host.tpu_chips()):
    return True
  return "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize() -> None:
  mode = os.environ.get("QTX_DISTRIBUTED", "")
  if mode == "off":
    return
  local = _local_device_ids()
  coord = os.environ.get("QTX_COORDINATOR")
  if coord:
    try:
      n = int(os.environ["QTX_NUM_PROCESSES"])
      pid = int(os.environ["QTX_PROCESS_ID"])
    except KeyError as e:
      raise ValueError(f"QTX_COORDINATOR is set but {e.args[0]} is not") from None
    jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=pid,
                               local_device_ids=local)
  elif mode == "auto" or _env_cluster():
    jax.distributed.initialize(local_device_ids=local)


def assert_same(what: str, value: str, fix: str = "") -> None:
  """Raises ValueError unless every process of the run passes the same `value` (a short
  string, e.g. a hash of the training data's index); the message names which processes
  differ and `fix`. A no-op in a single-process run."""
  if jax.process_count() == 1:
    return
  import numpy as np
  from jax.experimental import multihost_utils
  data = np.frombuffer(value.encode()[:64].ljust(64, b"\0"), np.uint8)
  everyone = np.asarray(multihost_utils.process_allgather(data)).reshape(-1, 64)
  values = [bytes(row).rstrip(b"\0").decode(errors="replace") for row in everyone]
  if len(set(values)) > 1:
    groups: dict[str, list[int]] = {}
    for pid, v in enumerate(values):
      groups.setdefault(v, []).append(pid)
    seen = "; ".join(f"process(es) {ids} see {v!r}" for v, ids in groups.items())
    raise ValueError(f"{what} differs between the processes of this run ({seen}). "
                     f"{fix}".strip())
