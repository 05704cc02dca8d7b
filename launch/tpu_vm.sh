#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: every worker runs the same `python -m launch.main`; JAX's
# distributed runtime finds the other workers by itself (transformer/distributed.py).
#
#   launch/tpu_vm.sh STEP... [-- LAUNCH_MAIN_FLAGS...]
#
# STEPs, run in the order given:
#   create   create the TPU VM slice
#   setup    put the code on every worker (copy this checkout's HEAD, or clone CODE_URL) and
#            install it in a venv; mount NFS at SHARED if NFS is set
#   prepare  prepare the dataset and tokenizer once, on worker 0, into DATA_DIR
#   train    run launch.main on all workers at once (--worker=all); resumes from WORKDIR
#   status   show the last lines of each worker's train log
#   delete   delete the slice
#   all      create setup prepare train delete
#
# Settings (environment variables, defaults in brackets):
#   TPU_NAME [transformer]  ZONE [us-central2-b]  ACCELERATOR_TYPE [v4-32]
#   RUNTIME_VERSION [tpu-ubuntu2204-base]  PROJECT [gcloud's default]  SPOT=1: spot capacity
#   CODE_URL: git URL to clone on the workers (default: copy this checkout's committed HEAD)
#   CODE_REF [HEAD's commit]: what to check out from CODE_URL
#   CONFIG [configs/original.py:base]  RUN [the config's name and size]
#   SHARED [/mnt/shared]: a directory that every worker sees (NFS / Filestore), holding
#     WORKDIR [$SHARED/runs/$RUN] (checkpoints are written by all workers together, metrics by
#     worker 0) and DATA_DIR [$SHARED/data]
#   NFS: server:/export to mount at SHARED during setup (e.g. a Filestore instance)
#   DRY_RUN=1: print the commands instead of running them
#
# Preemption (spot VMs, maintenance): every worker gets SIGTERM; all of them finish the current
# step, save a checkpoint at the same step and exit 0. Re-run `create setup train` (the shared
# WORKDIR survives the VMs) and training resumes from that checkpoint.
#
# Example:
#   SPOT=1 NFS=10.0.0.2:/share launch/tpu_vm.sh all -- --config.num_train_steps=100000

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TPU_NAME=${TPU_NAME:-transformer}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
CONFIG=${CONFIG:-configs/original.py:base}
RUN=${RUN:-$(basename "${CONFIG%%:*}" .py)_${CONFIG##*:}}
SHARED=${SHARED:-/mnt/shared}
WORKDIR=${WORKDIR:-$SHARED/runs/$RUN}
DATA_DIR=${DATA_DIR:-$SHARED/data}
REMOTE_DIR=transformer  # in each worker's home directory
JAX_VERSION=$(sed -n 's/^jax==//p' "$ROOT/requirements.txt")

steps=()
while (($#)) && [[ $1 != -- ]]; do steps+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
extra=("$@")  # more launch.main flags, e.g. --config.num_train_steps=1000
((${#steps[@]})) || { sed -n '2,34p' "$0"; exit 2; }

run() {  # Runs (or, with DRY_RUN=1, prints) one command.
  if [[ -n ${DRY_RUN:-} ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

gcloud_tpu() {
  run gcloud compute tpus tpu-vm "$1" "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
    "${@:2}"
}

on_workers() {  # on_workers all|0 'remote bash command'
  gcloud_tpu ssh --worker="$1" --command="$2"
}

quoted() { printf ' %q' "$@"; }  # words, shell-quoted, each after a space
q() { printf '%q' "$1"; }  # one word, shell-quoted

base_flags=(--config="$CONFIG" --config.data_dir="$DATA_DIR")
config_flags=("${base_flags[@]}")  # what launch.prepare_data takes: the config flags only
for flag in ${extra[@]+"${extra[@]}"}; do
  if [[ $flag == --config.* ]]; then config_flags+=("$flag"); fi
done

step_create() {
  gcloud_tpu create --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${SPOT:+--spot}
}

step_setup() {
  local fetch
  if [[ -n ${CODE_URL:-} ]]; then
    fetch="rm -rf $REMOTE_DIR && git clone --quiet $(q "$CODE_URL") $REMOTE_DIR && git -C $REMOTE_DIR checkout --quiet $(q "${CODE_REF:-$(git -C "$ROOT" rev-parse HEAD)}")"
  else
    local archive=/tmp/${TPU_NAME}-code.tar.gz
    run git -C "$ROOT" archive --format=tar.gz --output="$archive" HEAD
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:code.tar.gz" --worker=all \
      --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
    fetch="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf code.tar.gz -C $REMOTE_DIR"
  fi
  local mount="sudo mkdir -p $(q "$SHARED")"
  if [[ -n ${NFS:-} ]]; then
    mount+=" && (mountpoint -q $(q "$SHARED") || sudo mount -t nfs -o vers=3 $(q "$NFS") $(q "$SHARED"))"
  fi
  mount+=" && sudo chmod a+rwx $(q "$SHARED")"
  on_workers all "set -e; $fetch; $mount; cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install --quiet -r requirements.txt 'jax[tpu]==$JAX_VERSION'"
}

step_prepare() {
  on_workers 0 "cd $REMOTE_DIR && .venv/bin/python -m launch.prepare_data$(quoted "${config_flags[@]}")"
}

step_train() {
  on_workers all "cd $REMOTE_DIR && .venv/bin/python -m launch.main$(quoted --workdir="$WORKDIR" "${base_flags[@]}" ${extra[@]+"${extra[@]}"}) 2>&1 | tee -a train.log; exit \${PIPESTATUS[0]}"
}

step_status() {
  on_workers all "hostname; tail -n 5 $REMOTE_DIR/train.log"
}

step_delete() {
  gcloud_tpu delete --quiet
}

for step in "${steps[@]}"; do
  case $step in
    all) for s in create setup prepare train delete; do "step_$s"; done ;;
    create|setup|prepare|train|status|delete) "step_$step" ;;
    *) echo "Unknown step '$step': create | setup | prepare | train | status | delete | all" >&2
       exit 2 ;;
  esac
done
