#!/usr/bin/env bash
#SBATCH --job-name=transformer
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# Train on a SLURM GPU cluster: `srun` starts the same `python -m launch.main` on every task;
# JAX reads its place in the job from SLURM's variables (transformer/distributed.py).
#
#   sbatch [--nodes=N] launch/slurm.sh --config=configs/original.py:base --workdir=/shared/runs/b \
#       [--config.FIELD=VALUE ...]
#
# --workdir and --config.data_dir must be on a filesystem that every node sees: checkpoints are
# written by all tasks together, metrics by task 0 only.
#
# Settings (environment variables, defaults in brackets):
#   PER [gpu]: gpu = one process per GPU (each task uses GPU $SLURM_LOCALID);
#              node = one process per node, using all of its GPUs
#   GPUS_PER_NODE [$SLURM_GPUS_ON_NODE or 8]   VENV [.venv]: the Python environment
#   DRY_RUN=1: print the commands instead of running them (works outside SLURM too)
#
# First one task prepares the dataset and tokenizer (launch.prepare_data), then all tasks train.
# Preemption and time limit: 300 s before the limit SLURM sends USR1 to this script, which
# passes SIGTERM on to every task: they finish the current step, save a checkpoint at the same
# step and exit 0; the job is then requeued and resumes from that checkpoint. A job preempted
# by the scheduler (SIGTERM to every task) does the same.

set -euo pipefail

if [[ -n ${SLURM_SUBMIT_DIR:-} ]]; then
  cd "$SLURM_SUBMIT_DIR"  # sbatch runs a copy of this script: use the directory it came from
else
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
fi
PER=${PER:-gpu}
NODES=${SLURM_JOB_NUM_NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
PYTHON=${VENV:-.venv}/bin/python

(($#)) || { sed -n '13,32p' "$0"; exit 2; }
config_flags=()  # what launch.prepare_data takes: the config flags only
for flag in "$@"; do
  if [[ $flag == --config* ]]; then config_flags+=("$flag"); fi
done

case $PER in
  gpu) tasks_per_node=$GPUS_PER_NODE ;;  # JAX then uses GPU $SLURM_LOCALID in each task
  node) tasks_per_node=1
        JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))
        export JAX_LOCAL_DEVICE_IDS ;;
  *) echo "PER must be gpu or node, got '$PER'." >&2; exit 2 ;;
esac

run() {  # Runs (or, with DRY_RUN=1, prints) one command.
  if [[ -n ${DRY_RUN:-} ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

[[ -n ${DRY_RUN:-} && $PER == node ]] && echo "+ export JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"
run srun --nodes=1 --ntasks=1 "$PYTHON" -m launch.prepare_data ${config_flags[@]+"${config_flags[@]}"}

train=(srun --nodes="$NODES" --ntasks-per-node="$tasks_per_node" --kill-on-bad-exit=1
       "$PYTHON" -m launch.main "$@")
if [[ -n ${DRY_RUN:-} ]]; then
  run "${train[@]}"
  exit 0
fi

stopping=0
stop() {  # USR1 (time limit near) or TERM (preemption): every task saves and exits, then requeue.
  stopping=1
  kill -TERM "$srun_pid" 2>/dev/null || true
}
trap stop USR1 TERM
"${train[@]}" &
srun_pid=$!
status=0
wait "$srun_pid" || status=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # `wait` returns early when a signal is trapped
  status=0
  wait "$srun_pid" || status=$?
done
if ((stopping)) && ((status == 0)) && [[ -n ${SLURM_JOB_ID:-} ]]; then
  echo "Stopped for the time limit or preemption at a checkpoint; requeueing job $SLURM_JOB_ID."
  scontrol requeue "$SLURM_JOB_ID" || true
fi
exit "$status"
