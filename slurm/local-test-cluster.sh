#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for tests and for trying `lmforge submit slurm`.
#
#   slurm/local-test-cluster.sh [start]   install (apt) if missing, configure, start, wait idle
#   slurm/local-test-cluster.sh stop      stop slurmd, slurmctld and munged
#   slurm/local-test-cluster.sh status    sinfo
#
# Idempotent: `start` on a running cluster only checks that the node is idle. Needs root
# (it installs packages and starts daemons); Debian/Ubuntu (Slurm 22.05 on bookworm).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
HOST="$(hostname -s)"
WAIT_S="${LMFORGE_SLURM_WAIT_S:-60}"

die() { echo "local-test-cluster: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process named in PIDFILE is running
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [[ $EUID -eq 0 ]] || die "Slurm is not installed and installing it needs root"
    echo "local-test-cluster: installing slurmctld slurmd slurm-client munge (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    local cpus mem_mb tmp
    # nproc honours OMP_NUM_THREADS, which test runners set to 1.
    cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
    # Leave memory for everything else on the machine; slurmd refuses a node that claims
    # more than it has.
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
    tmp="$(mktemp)"
    cat >"$tmp" <<EOF
# Written by lmforge slurm/local-test-cluster.sh: one node, this machine.
ClusterName=lmforge-test
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
# Requeued jobs wait cred_expire seconds before they may start again (default 120).
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=30
SchedulerType=sched/backfill
# Start eligible jobs (e.g. requeued ones) within seconds rather than a minute.
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${cpus} CoresPerSocket=${cpus} ThreadsPerCore=1 RealMemory=${mem_mb}
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF
    mkdir -p "$CONF_DIR"
    if ! cmp -s "$tmp" "$CONF"; then
        mv "$tmp" "$CONF"
        chmod 644 "$CONF"
        CONF_CHANGED=1
    else
        rm -f "$tmp"
    fi
}

start_daemons() {
    mkdir -p /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR" /run/munge /etc/munge
    chown slurm:slurm /var/spool/slurmctld "$LOG_DIR"
    chown munge:munge /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    alive /run/munge/munged.pid || su -s /bin/sh munge -c /usr/sbin/munged
    if [[ "${CONF_CHANGED:-0}" == 1 ]]; then  # some settings (AuthInfo) need a restart
        stop_pidfile /run/slurmd.pid
        stop_pidfile /run/slurmctld.pid
    fi
    alive /run/slurmctld.pid || /usr/sbin/slurmctld
    alive /run/slurmd.pid || /usr/sbin/slurmd
}

wait_idle() {
    local state deadline=$((SECONDS + WAIT_S))
    while (( SECONDS < deadline )); do
        state="$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null || true)"
        case "$state" in
            idle|mixed|allocated) echo "local-test-cluster: node $HOST is $state"; return 0 ;;
            drain*|down*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    die "node $HOST not idle after ${WAIT_S}s (state '${state}'); see $LOG_DIR/slurmctld.log"
}

stop_pidfile() {  # stop_pidfile PIDFILE: stop that daemon and wait until it is gone
    local pid i
    alive "$1" || return 0
    pid="$(cat "$1")"
    kill "$pid"
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    die "process $pid ($1) did not stop"
}

stop_daemons() {
    stop_pidfile /run/slurmd.pid
    stop_pidfile /run/slurmctld.pid
    stop_pidfile /run/munge/munged.pid
    echo "local-test-cluster: stopped"
}

case "${1:-start}" in
    start)
        install_packages
        write_conf
        start_daemons
        wait_idle
        ;;
    stop) stop_daemons ;;
    status) sinfo ;;
    *) die "usage: $0 [start|stop|status]" ;;
esac
