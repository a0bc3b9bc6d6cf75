#!/usr/bin/env bash
# Train EGMF on a Slurm cluster: srun starts one rank per GPU on every node (no SSH, no per-node launcher).
#
#   sbatch slurm/train_egmf.sh --config launch/recipes/mosei.toml --llm.path=/models/Qwen2.5-7B-Instruct
#   sbatch --nodes=4 --time=2-00:00:00 slurm/train_egmf.sh --config ...     # any #SBATCH line can be overridden
#   EGMF_CPU=1 sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=4 slurm/train_egmf.sh   # CPU-only
#
# Submit from the project root (or set EGMF_HOME). Arguments after the script go to launch/train.py; with
# none it trains the embedded demo. docs/cluster.md explains every variable below.
#
# Preemption: Slurm sends SIGUSR1 to the ranks 300 s before the time limit (--signal). They agree to stop at
# the next step boundary, save a checkpoint and exit 138; this script then requeues the job, which resumes
# from that checkpoint (checkpoint.resume=auto) into the same MLflow run. SIGTERM (scancel, preemption by
# the scheduler) also saves a checkpoint; the ranks exit 143. A warning that arrives before the first step
# (start-up longer than its lead time) is not requeued (exit 1): it would recur in every requeue.
#
#SBATCH --job-name=egmf
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@300
#SBATCH --requeue

set -euo pipefail

# `scancel --full --signal=USR1 JOB` (how many sites send the warning by hand) signals this shell too, whose
# default for USR1 is to die: the job would end FAILED instead of being requeued. The ranks get it as well and
# act on it; here it only needs to be survived.
trap 'echo "egmf: SIGUSR1 reached the batch script; the ranks checkpoint and stop, then the job is requeued"' USR1

# ---- the project and its Python environment ------------------------------------------------------
# The batch script runs from a copy in Slurm's spool, so the project is found from the submit directory.
EGMF_HOME=${EGMF_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/env.sh
source "$EGMF_HOME/slurm/env.sh"

# ---- rendezvous: rank 0 runs on the first node ---------------------------------------------------
# Use the node's address from Slurm, not its name: node names need not resolve on the compute network.
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR=${MASTER_ADDR:-$first_node}
# This script runs on the first node, so a port free here is free for rank 0 (a new one after a requeue).
export MASTER_PORT=${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}

# ---- devices ------------------------------------------------------------------------------------
train_args=()
if [ "${EGMF_CPU:-0}" = 1 ]; then
    train_args+=(--train.device=cpu)  # gloo collectives; submit with --gpus-per-node=0
else
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # A failed or timed-out NCCL collective aborts the rank (after train.collective_timeout_s) instead of
    # hanging the job until its time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # On InfiniBand clusters NCCL finds the HCAs itself. If it picks a wrong interface for its bootstrap,
    # set e.g. NCCL_SOCKET_IFNAME=ib0 (or eth0) before sbatch; NCCL_IB_DISABLE=1 forces TCP.
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

echo "egmf: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
    "${SLURM_NTASKS} ranks, rendezvous ${MASTER_ADDR}:${MASTER_PORT}"

# ---- train ---------------------------------------------------------------------------------------
# A rank that dies makes its peers' next collective fail (or time out after train.collective_timeout_s);
# --wait bounds how long the other ranks may outlive the first one to exit. Healthy ranks leave together.
rc=0
srun --label --kill-on-bad-exit=0 --wait="${EGMF_EXIT_WAIT:-120}" \
    python launch/train.py "$@" "${train_args[@]}" || rc=$?

case $rc in
    0 | 2) ;;  # finished; or a bad configuration, reported before anything started
    138)
        if [ "${SLURM_RESTART_COUNT:-0}" -ge "${EGMF_MAX_REQUEUES:-50}" ]; then
            # A job that keeps being stopped still makes progress each time, but a bound keeps a mistake cheap.
            echo "egmf: requeued ${SLURM_RESTART_COUNT:-0} times already (EGMF_MAX_REQUEUES=${EGMF_MAX_REQUEUES:-50});" \
                "not requeueing again: resubmit it to continue from its checkpoint"
            python launch/train.py "$@" "${train_args[@]}" --close-run=KILLED || true
        else
            echo "egmf: stopped before the time limit with a checkpoint; requeueing job ${SLURM_JOB_ID}"
            scontrol requeue "$SLURM_JOB_ID"  # ends this script; the job starts again and resumes
        fi
        ;;
    *)
        # A rank killed outright (out of memory, SIGKILL) cannot end its MLflow run; do it here.
        status=FAILED
        [ "$rc" = 143 ] && status=KILLED
        python launch/train.py "$@" "${train_args[@]}" --close-run="$status" || true
        ;;
esac
exit "$rc"
