#!/usr/bin/env bash
# Stop the local 2-node Slurm cluster of slurm_up.sh (its state stays in $EGMF_SLURM_DIR).
set -uo pipefail
dir=${EGMF_SLURM_DIR:-/tmp/egmf-slurm}
export SLURM_CONF=$dir/slurm.conf
[ -f "$SLURM_CONF" ] || exit 0
scontrol shutdown >/dev/null 2>&1
for _ in $(seq 20); do
    pgrep -f "slurm(ctld|d) -f $SLURM_CONF" >/dev/null || exit 0
    sleep 0.5
done
pkill -9 -f "slurm(ctld|d) -f $SLURM_CONF" || true
