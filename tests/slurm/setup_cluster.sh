#!/usr/bin/env bash
# A one-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd with a minimal configuration (no
# cgroups, no accounting). Needs root and Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge).
#
#   tests/slurm/setup_cluster.sh start DIR   # writes DIR/slurm.conf, starts the daemons, waits for the node;
#                                            # prints `export SLURM_CONF=DIR/slurm.conf` (clients need it)
#   tests/slurm/setup_cluster.sh stop DIR    # stops the daemons this script started for DIR
#
# CPUS (default: this machine's) and the ports (SLURMCTLD_PORT 16817, SLURMD_PORT 16818, away from a real cluster's
# 6817/6818) can be set. Exit status 3: not root or a package missing (the reason on stderr).
set -euo pipefail
ACTION="${1:?usage: setup_cluster.sh start|stop DIR}"
DIR="$(mkdir -p "${2:?usage: setup_cluster.sh start|stop DIR}" && cd "$2" && pwd)"
CONF="$DIR/slurm.conf"

stop() {
    for daemon in slurmd slurmctld; do
        if [[ -f "$DIR/$daemon.pid" ]]; then
            kill "$(cat "$DIR/$daemon.pid")" 2>/dev/null || true
            rm -f "$DIR/$daemon.pid"
        fi
    done
    # munged is shared by whatever else uses munge on this machine: left running.
}

if [[ "$ACTION" == stop ]]; then
    stop
    exit 0
fi
[[ "$ACTION" == start ]] || { echo "setup_cluster.sh: unknown action $ACTION (start|stop)" >&2; exit 2; }

if [[ "$(id -u)" != 0 ]]; then
    echo "setup_cluster.sh: needs root (slurmd runs jobs as their users; munged's key is root's)" >&2
    exit 3
fi
for binary in munged slurmctld slurmd sbatch sinfo; do
    if ! command -v "$binary" > /dev/null; then
        echo "setup_cluster.sh: $binary not found: apt-get install -y slurm-wlm munge" >&2
        exit 3
    fi
done

# munge authenticates Slurm's messages; its package creates the key, it runs as its own user.
if ! pgrep -x munged > /dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- munged
fi

stop  # a cluster left from an earlier start of this DIR
mkdir -p "$DIR/state" "$DIR/spool"
cat > "$CONF" <<EOF
ClusterName=vime-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-16817}
SlurmdPort=${SLURMD_PORT:-16818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# No cgroups: processes are tracked through /proc, tasks are not confined or bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# scancel: SIGTERM, then SIGKILL this much later; time for a preempted run to save at its next step boundary.
KillWait=120
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${CPUS:-$(nproc)} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

slurmctld -f "$CONF"
slurmd -f "$CONF" -N localhost
export SLURM_CONF="$CONF"
for _ in $(seq 60); do
    if [[ "$(sinfo --noheader --nodes localhost --format %t 2>/dev/null)" == idle ]]; then
        echo "export SLURM_CONF=$CONF"
        exit 0
    fi
    sleep 1
done
echo "setup_cluster.sh: the node did not become idle in 60 s; see $DIR/slurmctld.log and $DIR/slurmd.log" >&2
sinfo >&2 || true
exit 1
