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
  return any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))


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
