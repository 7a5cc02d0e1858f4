#!/usr/bin/env bash
# A real two-node SLURM cluster on this one host, for tests and for trying the sbatch templates:
# slurmctld, two slurmd daemons with the node names n1 and n2 (ports 17001/17002, one CPU each) and munge.
#
#   launch/slurm/local_cluster.sh up [DIR]     install Debian's packages if missing (root, apt), write
#                                              DIR/slurm.conf, start the daemons, wait for both nodes
#   launch/slurm/local_cluster.sh down [DIR]   stop the daemons started from DIR
#
# Clients need SLURM_CONF=DIR/slurm.conf (printed by "up"). DIR defaults to /tmp/side4video-slurm; its
# state, spool and logs (DIR/log/) are the cluster's, so a fresh DIR is a fresh cluster.
set -euo pipefail

action=${1:-}
dir=$(realpath -m "${2:-/tmp/side4video-slurm}")
conf="$dir/slurm.conf"
host=$(hostname -s)

die() { echo "local_cluster: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return
    [ "$(id -u)" = 0 ] || die "SLURM is not installed and installing it needs root"
    command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get to install it"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$dir/log/apt.log" 2>&1 || die "apt-get update failed (see $dir/log/apt.log)"
    apt-get install -y -qq slurmctld slurmd slurm-client munge >>"$dir/log/apt.log" 2>&1 \
        || die "apt-get install slurmctld slurmd slurm-client munge failed (see $dir/log/apt.log)"
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey -c -f -k /etc/munge/munge.key
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 0700 /etc/munge /var/log/munge /var/lib/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    if ! munge -n </dev/null >/dev/null 2>&1; then
        runuser -u munge -- munged --force || die "munged did not start"
        for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && return; sleep 0.1; done
        die "munged is not answering"
    fi
}

write_conf() {
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run"
    cat >"$conf" <<CONF
ClusterName=side4video
SlurmctldHost=$host
SlurmctldPort=16817
SlurmdPort=17000
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=30
SlurmdTimeout=60
InactiveLimit=0
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=1 State=UNKNOWN
PartitionName=local Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
}

stop_daemons() {
    for pidfile in "$dir"/run/*.pid; do
        [ -f "$pidfile" ] || continue
        kill "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
    pkill -f "slurm(ctld|d) .*-f $conf" 2>/dev/null || true
    for _ in $(seq 100); do pgrep -f "slurm(ctld|d) .*-f $conf" >/dev/null || return 0; sleep 0.1; done
    die "daemons of $conf did not stop"
}

case "$action" in
up)
    mkdir -p "$dir/log"
    install_packages
    stop_daemons
    for port in 16817 17001 17002; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            die "port $port is in use: is another local cluster up? ($0 down DIR)"
        fi
    done
    write_conf
    start_munge
    export SLURM_CONF=$conf
    slurmctld -f "$conf" -i || die "slurmctld did not start (see $dir/log/slurmctld.log)"
    for node in n1 n2; do
        slurmd -f "$conf" -N "$node" || die "slurmd $node did not start (see $dir/log/slurmd-$node.log)"
    done
    for _ in $(seq 120); do
        idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
        [ "$idle" = 2 ] && { echo "SLURM_CONF=$conf"; exit 0; }
        scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
        sleep 0.5
    done
    sinfo -N >&2 || true
    die "nodes n1 and n2 did not become idle (see $dir/log/)"
    ;;
down)
    stop_daemons
    ;;
*)
    die "usage: $0 up|down [DIR]"
    ;;
esac
