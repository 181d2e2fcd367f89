"""Multi-host start-up: `jax.distributed.initialize` from the environment.

- TPU pods and SLURM jobs: jax detects the cluster itself (no arguments needed).
- Anything else (e.g. `launch/local.py`): QTX_COORDINATOR=host:port, QTX_NUM_PROCESSES,
  QTX_PROCESS_ID (and optionally QTX_LOCAL_DEVICE_IDS).
- A single process with none of these set runs as is.
"""
from __future__ import annotations

import os

import jax


def _env_cluster() -> bool:
  return any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                       "MEGASCALE_COORDINATOR_ADDRESS"))


def initialize() -> None:
  coord = os.environ.get("QTX_COORDINATOR")
  if coord:
    n = int(os.environ["QTX_NUM_PROCESSES"])
    pid = int(os.environ["QTX_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=pid)
  elif _env_cluster() and os.environ.get("QTX_NO_DISTRIBUTED") != "1":
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
      return
    jax.distributed.initialize()
