#!/usr/bin/env bash
# A real two-node Slurm on this one machine, for dodo's tests (and for trying dodo's Slurm
# backend on a laptop): slurmctld plus one slurmd per virtual node (n1, n2), authenticated by
# munge, no accounting database.
#
#   hpc/testcluster/slurm-testcluster.sh start    # install if missing, configure, start, wait idle
#   hpc/testcluster/slurm-testcluster.sh status   # exit 0 when both nodes answer
#   hpc/testcluster/slurm-testcluster.sh stop     # stop the daemons (state is kept)
#   hpc/testcluster/slurm-testcluster.sh stop-node n2 | start-node n2
#
# Needs root (apt-get, /etc/slurm, /etc/hosts, /run/munge). It refuses to overwrite an
# /etc/slurm/slurm.conf that it did not write. Why a fact is set as it is:
#   - two slurmd on one host: `slurmd -N <node>` with distinct ports and %n in the spool, pid
#     and log paths; the node names resolve through "127.0.0.1 n1 n2" in /etc/hosts.
#   - proctrack/linuxproc, task/none: no cgroups needed (containers, CI sandboxes).
#   - AccountingStorageType=accounting_storage/none: no slurmdbd, so sacct fails; dodo reads
#     job state from squeue/scontrol and from the run directory instead.
#   - AuthInfo=cred_expire=10: a requeued job may start again 10 s later (default 120 s).
#   - KillWait=5: a cancelled or requeued job's processes get SIGTERM, then SIGKILL 5 s later.
set -euo pipefail

MARK="# written by dodo hpc/testcluster/slurm-testcluster.sh"
CONF=/etc/slurm/slurm.conf
BASE=${DODO_SLURM_BASE:-/var/lib/dodo-slurm}
LOGS=$BASE/log
NODES=(n1 n2)
PORTS=(17001 17002)
CTLD_PORT=${DODO_SLURMCTLD_PORT:-16817}
STATUS_FILE=${DODO_SLURM_STATUS:-/tmp/dodo-slurm-testcluster.status}

say() { echo "slurm-testcluster: $*" >&2; }
fail() {
  say "$*"
  mkdir -p "$(dirname "$STATUS_FILE")"
  echo "$*" >"$STATUS_FILE"
  exit 1
}

need_root() {
  [ "$(id -u)" -eq 0 ] || fail "needs root to install packages and start daemons (run it with sudo)"
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
  command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
  command -v munged >/dev/null 2>&1 || missing+=(munge)
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq || fail "apt-get update failed; install ${missing[*]} by hand"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]} failed"
}

write_config() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    fail "$CONF exists and was not written by this script; this machine already has a Slurm: use it, or move that file away"
  fi
  mkdir -p /etc/slurm "$BASE/state" "$LOGS" /run/dodo-slurm
  local host; host=$(hostname -s)
  cat >"$CONF" <<EOF
$MARK
ClusterName=dodotest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool-%n
SlurmctldPidFile=/run/dodo-slurm/slurmctld.pid
SlurmdPidFile=/run/dodo-slurm/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
MaxArraySize=1001
NodeName=${NODES[0]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=${PORTS[0]} CPUs=1 RealMemory=4000 State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=${PORTS[1]} CPUs=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
  grep -qE "^127\.0\.0\.1[[:space:]].*\bn1\b.*\bn2\b" /etc/hosts \
    || echo "127.0.0.1 ${NODES[*]}" >>/etc/hosts
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  su -s /bin/sh munge -c "munged --force" 2>>"$LOGS/munged.log" || fail "munged did not start; see $LOGS/munged.log"
  for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "munged started but does not answer; see $LOGS/munged.log"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_ctld() {
  pid_alive /run/dodo-slurm/slurmctld.pid && return 0
  slurmctld || fail "slurmctld did not start; see $LOGS/slurmctld.log"
}

start_node() {
  local node=$1
  pid_alive "/run/dodo-slurm/slurmd-$node.pid" && return 0
  slurmd -N "$node" || fail "slurmd -N $node did not start; see $LOGS/slurmd-$node.log"
}

wait_idle() {
  local state=""
  for _ in $(seq 120); do
    state=$(sinfo -h -N -o "%N %t" 2>/dev/null | sort -u | tr '\n' ' ')
    # Nodes left DOWN/DRAIN by an earlier stop come back on their own (ReturnToService=2);
    # nudge them in case the controller still holds the old reason.
    if echo "$state" | grep -qE "down|drain"; then
      scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
    fi
    if [ "$(sinfo -h -N -t idle,mix,alloc -o '%N' 2>/dev/null | sort -u | wc -l)" -eq ${#NODES[@]} ]; then
      return 0
    fi
    sleep 0.5
  done
  fail "nodes not idle after 60 s (sinfo: ${state:-no answer}); see $LOGS/"
}

stop_all() {
  for node in "${NODES[@]}"; do stop_node "$node"; done
  if pid_alive /run/dodo-slurm/slurmctld.pid; then
    kill "$(cat /run/dodo-slurm/slurmctld.pid)" 2>/dev/null || true
  fi
  for _ in $(seq 50); do pid_alive /run/dodo-slurm/slurmctld.pid || return 0; sleep 0.1; done
}

stop_node() {
  local pidfile=/run/dodo-slurm/slurmd-$1.pid
  pid_alive "$pidfile" || return 0
  kill "$(cat "$pidfile")" 2>/dev/null || true
  for _ in $(seq 50); do pid_alive "$pidfile" || return 0; sleep 0.1; done
  kill -9 "$(cat "$pidfile")" 2>/dev/null || true
}

case "${1:-}" in
  start)
    need_root
    rm -f "$STATUS_FILE"
    install_packages
    write_config
    start_munge
    start_ctld
    for node in "${NODES[@]}"; do start_node "$node"; done
    wait_idle
    say "up: $(sinfo -h -N -o '%N %t' | sort -u | tr '\n' ' ')"
    ;;
  stop) stop_all ;;
  status)
    [ "$(sinfo -h -N -t idle,mix,alloc -o '%N' 2>/dev/null | sort -u | wc -l)" -eq ${#NODES[@]} ]
    ;;
  stop-node) stop_node "${2:?node name}" ;;
  start-node) start_node "${2:?node name}"; wait_idle ;;
  *) echo "usage: $0 start|stop|status|stop-node NODE|start-node NODE" >&2; exit 2 ;;
esac
