#!/usr/bin/env bash
# Run qtx on every worker of a Cloud TPU VM (a single host or a whole pod slice).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=/mnt/shared/qtx_b16 \
#     launch/tpu_pod.sh all --config.train.total_steps=10000
#
# Actions (first argument; default `all`):
#   install   copy the committed source tree (git archive HEAD) to every worker and pip-install
#             it with jax[tpu] into a virtualenv there
#   run       start `python -m qtx.main --config $CONFIG --workdir $WORKDIR [ARGS...]` on every
#             worker at once, in the background (nohup); log in ~/qtx-run.log on each worker
#   all       install, then run
#   logs      follow the log of worker $LOG_WORKER (default 0)
#   stop      send SIGTERM to the run on every worker: qtx saves a checkpoint and exits; the
#             next `run` with the same WORKDIR resumes from it
#   status    show whether the run is alive on each worker
#
# Variables (environment):
#   TPU_NAME   (required)  the TPU VM name        ZONE     (required)  its zone
#   PROJECT    GCP project (default: gcloud's configured project)
#   CONFIG     config file and optional ':arg' (default: configs/clip_b16.py)
#   WORKDIR    (required for run) metrics + checkpoints. Every worker writes its shards of each
#              checkpoint there, so it must be the same shared directory on all workers (a
#              Filestore/NFS mount, or a GCS bucket mounted with gcsfuse at the same path).
#   REMOTE_DIR source tree on the workers (default: qtx)      VENV  (default: qtx-venv)
#   JAX_SPEC   what pip installs for jax (default: jax[tpu])
#   FOREGROUND=1  run attached (output of all workers streamed by gcloud) instead of nohup
#   DRY_RUN=1     print the gcloud commands instead of running them
#
# Multi-host start-up needs nothing from this script: on a TPU VM, libtpu finds the other
# workers of the slice, and every worker runs the same command. The TPU slice shape decides
# the number of devices; CONFIG's mesh.shape (e.g. fsdp=-1) lays them out.
set -euo pipefail

ACTION="${1:-all}"
if [[ $# -gt 0 ]]; then shift; fi

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
CONFIG="${CONFIG:-configs/clip_b16.py}"
REMOTE_DIR="${REMOTE_DIR:-qtx}"
VENV="${VENV:-qtx-venv}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
LOG_WORKER="${LOG_WORKER:-0}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then GCLOUD_FLAGS+=(--project="$PROJECT"); fi

run_cmd() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

on_workers() {  # on_workers WORKER COMMAND: one shell command on the given worker(s)
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker="$1" \
    --command="$2"
}

do_install() {
  local archive commit
  archive="$(mktemp -d)/qtx-src.tar.gz"
  commit="$(git -C "$REPO_ROOT" rev-parse --short HEAD)"
  if [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
    echo "note: uncommitted changes are not copied (the workers get commit $commit)" >&2
  fi
  git -C "$REPO_ROOT" archive --format=tar.gz -o "$archive" HEAD
  run_cmd gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:qtx-src.tar.gz" \
    "${GCLOUD_FLAGS[@]}" --worker=all
  on_workers all "set -e
    rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar xzf ~/qtx-src.tar.gz -C ~/$REMOTE_DIR
    echo $commit > ~/$REMOTE_DIR/COMMIT
    [ -d ~/$VENV ] || python3 -m venv ~/$VENV
    . ~/$VENV/bin/activate
    pip install -q -U pip
    pip install -q -U '$JAX_SPEC'
    pip install -q -e ~/$REMOTE_DIR
    python -c 'import jax, qtx; print(jax.__version__, jax.local_device_count(), \"local devices\")'"
}

do_run() {
  : "${WORKDIR:?set WORKDIR to a directory shared by all workers}"
  local args cmd
  args="$(printf '%q ' --config "$CONFIG" --workdir "$WORKDIR" "$@")"
  # exec: the pid that `stop` signals is the python process itself
  cmd="cd ~/$REMOTE_DIR && . ~/$VENV/bin/activate && QTX_DISTRIBUTED=auto exec python -m qtx.main $args"
  if [[ "${FOREGROUND:-0}" == "1" ]]; then
    on_workers all "set -e; $cmd"
  else
    # one run per worker at a time; the pid file lets `stop` signal exactly this run
    on_workers all "set -e
      if [ -f ~/qtx-run.pid ] && kill -0 \$(cat ~/qtx-run.pid) 2>/dev/null; then
        echo \"worker \$(hostname): a run is still alive (pid \$(cat ~/qtx-run.pid))\" >&2; exit 1
      fi
      nohup bash -c $(printf '%q' "$cmd") > ~/qtx-run.log 2>&1 < /dev/null &
      echo \$! > ~/qtx-run.pid
      echo \"worker \$(hostname): started pid \$(cat ~/qtx-run.pid), log ~/qtx-run.log\""
  fi
}

do_stop() {
  on_workers all "if [ -f ~/qtx-run.pid ] && kill -0 \$(cat ~/qtx-run.pid) 2>/dev/null; then
      kill -TERM \$(cat ~/qtx-run.pid)
      echo \"worker \$(hostname): SIGTERM sent (qtx checkpoints and exits)\"
    else echo \"worker \$(hostname): no run alive\"; fi"
}

case "$ACTION" in
  install) do_install ;;
  run) do_run "$@" ;;
  all) do_install; do_run "$@" ;;
  logs) on_workers "$LOG_WORKER" "tail -n 200 -f ~/qtx-run.log" ;;
  stop) do_stop ;;
  status) on_workers all "if [ -f ~/qtx-run.pid ] && kill -0 \$(cat ~/qtx-run.pid) 2>/dev/null;
      then echo \"worker \$(hostname): running (pid \$(cat ~/qtx-run.pid))\";
      else echo \"worker \$(hostname): not running\"; fi; tail -n 3 ~/qtx-run.log 2>/dev/null || true" ;;
  *) echo "unknown action '$ACTION'; choose one of install, run, all, logs, stop, status" >&2
     exit 2 ;;
esac
