#!/usr/bin/env bash
# Bring up a real 2-node Slurm cluster on this machine (two slurmd on localhost), for the tests and
# for trying slurm/train_egmf.sh without a cluster. Needs Debian's slurm-wlm and munge installed
# (apt-get install slurmctld slurmd slurm-client munge; .ci/run does it).
#
#   source <(tests/cluster/slurm_up.sh)    # prints `export SLURM_CONF=...`; sbatch/srun/squeue then use it
#   tests/cluster/slurm_down.sh
#
# State, logs and slurm.conf live in $EGMF_SLURM_DIR (default /tmp/egmf-slurm). Needs root (the
# daemons run as root: SlurmUser=root), as on CI. No systemd or cgroups are assumed, so process
# tracking is linuxproc and tasks are not bound to cores.
set -euo pipefail

dir=${EGMF_SLURM_DIR:-/tmp/egmf-slurm}
cpus_per_node=${EGMF_SLURM_CPUS_PER_NODE:-1}
conf=$dir/slurm.conf

log() { echo "slurm_up: $*" >&2; }

for command in slurmctld slurmd munged sbatch; do
    if ! command -v "$command" >/dev/null; then
        log "$command is not installed: apt-get install slurmctld slurmd slurm-client munge"
        exit 1
    fi
done

mkdir -p "$dir"/{state,spool,log}
# Two nodes on one host: the same address, one slurmd port each; %n keeps their files apart.
cat > "$conf" <<CONF
ClusterName=egmf-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
# Finished jobs stay known to scontrol for 10 min (a test reads the restart count after a loaded run);
# a killed step is SIGKILLed 10 s after SIGTERM.
MinJobAge=600
KillWait=10
# A requeued job may start again cred_expire seconds after it stopped (default 120).
AuthInfo=cred_expire=10
SlurmdTimeout=60
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001 CPUs=$cpus_per_node State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17002 CPUs=$cpus_per_node State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
mkdir -p "$dir"/spool/{n1,n2}
export SLURM_CONF=$conf

if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
fi
pgrep -f "slurmctld -f $conf" >/dev/null || slurmctld -f "$conf"
for node in n1 n2; do
    pgrep -f "slurmd -f $conf -N $node" >/dev/null || slurmd -f "$conf" -N "$node"
done

# Ready when both nodes are idle (a node left down by an earlier run is returned to service).
for _ in $(seq 60); do
    idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
    [ "$idle" -ge 2 ] && break
    scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
    sleep 1
done
if [ "$idle" -lt 2 ]; then
    log "the nodes did not come up; see $dir/log"
    sinfo -N >&2 || true
    exit 1
fi
log "2 nodes idle (SLURM_CONF=$conf)"
echo "export SLURM_CONF=$conf"
