#!/usr/bin/env bash
# Start or stop a real single-node SLURM cluster on this machine (Debian slurm-wlm + munge).
#
#   slurm/local-cluster.sh start [STATE_DIR]   # prints `export SLURM_CONF=...`
#   slurm/local-cluster.sh stop  [STATE_DIR]
#   slurm/local-cluster.sh status [STATE_DIR]
#
# Must run as root (slurmctld/slurmd run as SlurmUser=root; munged runs as the munge
# user). All state, spool, log and pid files live under STATE_DIR (default
# ${TMPDIR:-/tmp}/megatron-sz-slurm), so stopping the cluster and deleting that folder
# leaves the machine as it was. Partitions: solver (default), teacher, generator, all on
# this one node. Why these settings: see ../shared/design/ENVIRONMENT.md (no systemd, no
# cgroups in containers -> proctrack/linuxproc + task/none; no slurmdbd -> no sacct, so
# finished jobs go to a jobcomp/filetxt log).
#
# If /etc/slurm/slurm.conf does not exist, it is pointed at this cluster's config (a
# symlink removed again by `stop`), so sbatch/squeue work without SLURM_CONF.
set -euo pipefail

cmd=${1:-}
STATE=${2:-${MSZ_SLURM_STATE:-${TMPDIR:-/tmp}/megatron-sz-slurm}}
CONF="$STATE/slurm.conf"
NODE=$(hostname -s)

die() { echo "local-cluster: $*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (slurmctld/slurmd and munged are started by hand)"
  for b in slurmctld slurmd munged sinfo; do
    command -v "$b" >/dev/null 2>&1 || die "$b not found; install with: apt-get install -y slurm-wlm munge"
  done
}

write_conf() {
  local cpus mem_mb
  cpus=$(nproc)
  # RealMemory must not exceed what slurmd detects; leave 10% headroom.
  mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  mkdir -p "$STATE"/{state,spool,log,run}
  cat > "$CONF" <<EOF
# Written by megatron-sz slurm/local-cluster.sh -- single-node test cluster.
ClusterName=msz-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=${MSZ_SLURMCTLD_PORT:-6817}
SlurmdPort=${MSZ_SLURMD_PORT:-6818}
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
KillWait=10
MaxArraySize=10001
DefMemPerCPU=1024
# A stage that exits with 75 (EX_TEMPFAIL, preempted after a checkpoint) requeues itself.
RequeueExit=75
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=solver Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName=teacher Nodes=$NODE MaxTime=INFINITE State=UP
PartitionName=generator Nodes=$NODE MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if pgrep -u munge -x munged >/dev/null 2>&1; then return; fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return; sleep 0.1; done
  die "munged did not come up"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  need_root
  write_conf
  start_munge
  if [ ! -e /etc/slurm/slurm.conf ]; then
    mkdir -p /etc/slurm
    ln -s "$CONF" /etc/slurm/slurm.conf
  fi
  export SLURM_CONF="$CONF"
  pid_alive "$STATE/run/slurmctld.pid" || slurmctld -f "$CONF"
  pid_alive "$STATE/run/slurmd.pid" || slurmd -f "$CONF"
  for _ in $(seq 100); do
    if sinfo -h -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
      echo "export SLURM_CONF=$CONF"
      return
    fi
    sleep 0.2
  done
  scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
  sinfo -h -o '%T' | grep -Eq '^(idle|mixed|allocated)' \
    || die "node not idle; see $STATE/log/slurmctld.log and slurmd.log"
  echo "export SLURM_CONF=$CONF"
}

stop() {
  need_root
  export SLURM_CONF="$CONF"
  if [ -f "$CONF" ]; then scancel --full --quiet --user=root >/dev/null 2>&1 || true; fi
  for d in slurmd slurmctld; do
    f="$STATE/run/$d.pid"
    if pid_alive "$f"; then
      p=$(cat "$f"); kill "$p" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$p" 2>/dev/null || true
    fi
  done
  if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
    rm -f /etc/slurm/slurm.conf
  fi
  # munged is shared machine state; leave it running (harmless, and other users may need it).
  echo "stopped cluster in $STATE"
}

status() {
  export SLURM_CONF="$CONF"
  if pid_alive "$STATE/run/slurmctld.pid"; then
    sinfo; squeue
  else
    echo "not running (state dir $STATE)"; exit 1
  fi
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status [STATE_DIR]" >&2; exit 2 ;;
esac
