"""Start N qtx processes on this machine, each with K simulated CPU devices (one global mesh).

  python launch/local.py --processes 2 --devices_per_process 4 -- \\
      --config configs/clip_tiny.py --workdir /tmp/run [--config.KEY=VALUE ...]

Everything after the launcher's own flags (an optional `--` separates them) goes to
`python -m qtx.main` (or `--module`). Each process gets, in its environment:

  QTX_COORDINATOR=127.0.0.1:<free port>  QTX_NUM_PROCESSES=N  QTX_PROCESS_ID=i
  JAX_PLATFORMS=cpu  JAX_NUM_CPU_DEVICES=K  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo

`qtx.distributed.initialize` reads the QTX_* variables; jax reads the JAX_* ones itself (the
gloo collectives let the CPU devices of different processes talk to each other). Output is
streamed line by line with a `[pI]` prefix. When a process fails, the others are stopped and the
launcher exits with the failing process's code; SIGINT/SIGTERM are forwarded to all processes
(SIGTERM is qtx's preemption signal: each saves a checkpoint and exits).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def free_port(host: str = "127.0.0.1") -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def process_env(base: dict, process_id: int, num_processes: int, devices_per_process: int,
                coordinator: str, collectives: str = "gloo") -> dict:
  """The environment of process `process_id` (pure: returns a new dict)."""
  env = dict(base)
  env.update({
      "QTX_COORDINATOR": coordinator,
      "QTX_NUM_PROCESSES": str(num_processes),
      "QTX_PROCESS_ID": str(process_id),
      "JAX_PLATFORMS": "cpu",
      "JAX_NUM_CPU_DEVICES": str(devices_per_process),
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": collectives,
      "PYTHONUNBUFFERED": "1",
  })
  # an inherited device-count flag would contradict JAX_NUM_CPU_DEVICES
  xla_flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  else:
    env.pop("XLA_FLAGS", None)
  path = env.get("PYTHONPATH", "")
  env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + path if path else "")
  # SLURM / TPU variables would make qtx.distributed ask jax to detect a cluster instead
  for k in [k for k in env if k.startswith("SLURM_")] + ["TPU_WORKER_HOSTNAMES",
                                                         "MEGASCALE_COORDINATOR_ADDRESS"]:
    env.pop(k, None)
  return env


def _pump(stream, prefix: str, out, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
      out.flush()
  stream.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
  """SIGTERM the still-running processes, then SIGKILL whatever is left after grace_s."""
  running = [p for p in procs if p.poll() is None]
  for p in running:
    _signal_group(p, signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in running:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      _signal_group(p, signal.SIGKILL)
      p.wait()


def _exit_code(rc: int) -> int:
  return 128 - rc if rc < 0 else rc  # killed by signal s -> 128 + s, like a shell


def launch(args: Sequence[str], processes: int, devices_per_process: int,
           module: str = "qtx.main", port: Optional[int] = None,
           timeout_s: Optional[float] = None, grace_s: float = 5.0, out=None,
           collectives: str = "gloo") -> int:
  """Run `python -m module *args` in `processes` processes; returns the exit code (0 = all ok)."""
  if processes < 1:
    raise ValueError(f"--processes must be >= 1, got {processes}")
  if devices_per_process < 1:
    raise ValueError(f"--devices_per_process must be >= 1, got {devices_per_process}")
  out = out or sys.stdout
  coordinator = f"127.0.0.1:{port or free_port()}"
  cmd = [sys.executable, "-u", "-m", module, *args]
  lock = threading.Lock()
  with lock:
    out.write(f"[launch] {processes} processes x {devices_per_process} CPU devices, "
              f"coordinator {coordinator}: {shlex.join(cmd)}\n")
    out.flush()
  procs, pumps = [], []
  for i in range(processes):
    env = process_env(os.environ, i, processes, devices_per_process, coordinator, collectives)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, text=True, bufsize=1,
                         start_new_session=True)  # own group: stopping it stops its children
    procs.append(p)
    t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}]", out, lock), daemon=True)
    t.start()
    pumps.append(t)

  forwarded = []

  def forward(signum, frame):
    forwarded.append(signum)
    for p in procs:
      if p.poll() is None:
        _signal_group(p, signum)

  old = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGINT, signal.SIGTERM):
      old[sig] = signal.signal(sig, forward)
  code = 0
  failed = None
  try:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
      rcs = [p.poll() for p in procs]
      bad = [(i, rc) for i, rc in enumerate(rcs) if rc not in (None, 0)]
      if bad:
        failed = bad[0]
        code = _exit_code(failed[1])
        break
      if all(rc == 0 for rc in rcs):
        break
      if deadline is not None and time.monotonic() > deadline:
        failed, code = ("timeout", None), 124
        break
      time.sleep(0.1)
  finally:
    if failed is not None or forwarded:
      # a forwarded SIGTERM asks for a checkpoint: give that time before SIGKILL
      _stop(procs, grace_s if not forwarded else max(grace_s, 120.0))
    for p in procs:
      if p.poll() is None:
        p.wait()
    for t in pumps:
      t.join(timeout=5.0)
    for sig, handler in old.items():
      signal.signal(sig, handler)
  with lock:
    if failed is not None and failed[0] == "timeout":
      out.write(f"[launch] timed out after {timeout_s} s; stopped all processes\n")
    elif failed is not None:
      out.write(f"[launch] process {failed[0]} exited with code {failed[1]}; stopped the "
                f"others\n")
    out.flush()
  return code


def parse_args(argv: Sequence[str]):
  parser = argparse.ArgumentParser(
      description="Start N local processes of one multi-process JAX job on CPU devices.",
      allow_abbrev=False)
  parser.add_argument("--processes", type=int, default=2, help="number of processes (N)")
  parser.add_argument("--devices_per_process", type=int, default=4,
                      help="simulated CPU devices in each process (K)")
  parser.add_argument("--module", default="qtx.main", help="python module to run (-m)")
  parser.add_argument("--port", type=int, default=None,
                      help="coordinator port on 127.0.0.1 (default: a free one)")
  parser.add_argument("--timeout", type=float, default=None,
                      help="stop everything after this many seconds (exit code 124)")
  parser.add_argument("--grace", type=float, default=5.0,
                      help="seconds between SIGTERM and SIGKILL when one process failed and "
                           "the others are stopped")
  parser.add_argument("--collectives", default="gloo", choices=("gloo", "mpi"),
                      help="jax CPU collectives implementation")
  known, rest = parser.parse_known_args(argv)
  if rest and rest[0] == "--":
    rest = rest[1:]
  return known, rest


def main(argv: Optional[Sequence[str]] = None) -> int:
  known, rest = parse_args(sys.argv[1:] if argv is None else argv)
  return launch(rest, known.processes, known.devices_per_process, module=known.module,
                port=known.port, timeout_s=known.timeout, grace_s=known.grace,
                collectives=known.collectives)


if __name__ == "__main__":
  sys.exit(main())
