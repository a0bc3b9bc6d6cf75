#!/usr/bin/env bash
# One seed of an egmf-sweep per Slurm array task. egmf-sweep submits it (do not sbatch it by hand):
#
#   egmf-sweep --slurm --config launch/recipes/mosei.toml --seeds 1111,2222,3333,4444,5555 --llm.path=...
#   egmf-sweep --slurm --sbatch=--nodes=1 --sbatch=--time=12:00:00 --config ...   # options for every task
#
# Task i trains the sweep's seed number i (in ROOT/seed_S, as a child of the sweep's MLflow run) with
# slurm/train_egmf.sh, so each task is stopped, saved and requeued exactly like a single training job. The
# task that ends with every seed finished writes the report (ROOT/report.md) and ends the parent run.
#
#SBATCH --job-name=egmf-sweep
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@300
#SBATCH --requeue

set -euo pipefail

root=${1:?usage: sweep_egmf.sh SWEEP_ROOT (submitted by egmf-sweep --slurm)}
EGMF_HOME=${EGMF_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/env.sh
source "$EGMF_HOME/slurm/env.sh"

mapfile -d '' seed_args < <(python -m egmf.train.sweep --task "$root:$SLURM_ARRAY_TASK_ID")
if [ "${#seed_args[@]}" = 0 ]; then
    echo "egmf-sweep: no seed for task ${SLURM_ARRAY_TASK_ID} in $root/sweep.json; submit with egmf-sweep --slurm" >&2
    exit 2
fi
echo "egmf-sweep: array task ${SLURM_ARRAY_TASK_ID} (job ${SLURM_JOB_ID}): ${seed_args[*]}"

rc=0
bash slurm/train_egmf.sh "${seed_args[@]}" || rc=$?  # a requeue (exit 138) ends this script there
if [ "$rc" = 0 ]; then
    python -m egmf.train.sweep --finish "$root"
fi
exit "$rc"
