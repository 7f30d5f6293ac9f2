#!/usr/bin/env bash
# A real single-machine Slurm cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) for tests and
# for trying slurmvision: `devslurm.sh up|down|status|env`. Idempotent; `down` stops exactly the
# processes `up` started (by their pid files). Everything lives under $DEVSLURM_DIR.
#
# Partitions: `low` (preemptible, PriorityTier=1, REQUEUE with a grace time) and `high`
# (PriorityTier=10) on the same node, so a job in `high` really preempts one in `low`.
set -euo pipefail

DEVSLURM_DIR=${DEVSLURM_DIR:-$(cd "$(dirname "$0")/.." && pwd)/.devslurm}
CTLD_PORT=${DEVSLURM_CTLD_PORT:-16817}
SLURMD_PORT=${DEVSLURM_SLURMD_PORT:-16818}
DBD_PORT=${DEVSLURM_DBD_PORT:-16819}
DB_PORT=${DEVSLURM_DB_PORT:-16820}
GRACE_TIME=${DEVSLURM_GRACE_TIME:-30}
CONF="$DEVSLURM_DIR/etc/slurm.conf"
export SLURM_CONF="$CONF"

log() { echo "devslurm: $*" >&2; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local missing=()
  for bin in slurmctld slurmd slurmdbd sinfo munged mariadbd; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$bin")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Slurm, munge and MariaDB (apt; missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q slurmctld slurmd slurm-client munge slurmdbd mariadb-server >/dev/null
}

write_configs() {
  mkdir -p "$DEVSLURM_DIR"/{etc,log,run,spool/ctld,spool/d,db}
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))
  cat >"$CONF" <<EOF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
StateSaveLocation=$DEVSLURM_DIR/spool/ctld
SlurmdSpoolDir=$DEVSLURM_DIR/spool/d
SlurmctldPidFile=$DEVSLURM_DIR/run/slurmctld.pid
SlurmdPidFile=$DEVSLURM_DIR/run/slurmd.pid
SlurmctldLogFile=$DEVSLURM_DIR/log/slurmctld.log
SlurmdLogFile=$DEVSLURM_DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=defer_batch
ReturnToService=2
JobRequeue=1
MpiDefault=none
KillWait=10
MinJobAge=600
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=low Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME OverSubscribe=NO
PartitionName=high Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=10 OverSubscribe=NO
EOF
  cat >"$DEVSLURM_DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DEVSLURM_DIR/run/slurmdbd.pid
LogFile=$DEVSLURM_DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=devslurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DEVSLURM_DIR/etc/slurmdbd.conf"
  cat >"$DEVSLURM_DIR/etc/my.cnf" <<EOF
[mysqld]
datadir=$DEVSLURM_DIR/db
socket=$DEVSLURM_DIR/run/mysqld.sock
pid-file=$DEVSLURM_DIR/run/mariadbd.pid
port=$DB_PORT
bind-address=127.0.0.1
user=root
log-error=$DEVSLURM_DIR/log/mariadb.log
innodb_buffer_pool_size=64M
innodb_lock_wait_timeout=900
EOF
}

start_munge() {
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge: /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge: /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  # munged runs as the munge user and writes its pid where that user may; we keep a copy to stop it.
  su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=/run/munge/devslurm-munged.pid"
  wait_for 10 bash -c "munge -n | unmunge" || { log "munged did not start"; exit 1; }
  cp /run/munge/devslurm-munged.pid "$DEVSLURM_DIR/run/munged.pid"
}

db() { mariadb --defaults-file="$DEVSLURM_DIR/etc/my.cnf" -uroot --socket="$DEVSLURM_DIR/run/mysqld.sock" "$@"; }

start_mariadb() {
  pid_alive "$DEVSLURM_DIR/run/mariadbd.pid" && return 0
  if [ ! -d "$DEVSLURM_DIR/db/mysql" ]; then
    mariadb-install-db --defaults-file="$DEVSLURM_DIR/etc/my.cnf" --user=root \
      --auth-root-authentication-method=normal >"$DEVSLURM_DIR/log/mariadb-install.log" 2>&1
  fi
  setsid mariadbd --defaults-file="$DEVSLURM_DIR/etc/my.cnf" </dev/null >/dev/null 2>&1 &
  for _ in $(seq 100); do db -e "select 1" >/dev/null 2>&1 && break; sleep 0.2; done
  db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'devslurm';
         CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'devslurm';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

wait_for() {  # wait_for SECONDS CMD...
  local n=$(( $1 * 5 )); shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}

start_slurm() {
  if ! pid_alive "$DEVSLURM_DIR/run/slurmdbd.pid"; then
    SLURM_CONF="$CONF" slurmdbd
    wait_for 30 sacctmgr -n list cluster || { log "slurmdbd did not answer; see $DEVSLURM_DIR/log/slurmdbd.log"; exit 1; }
  fi
  sacctmgr -i -n list cluster format=cluster | grep -qw local || sacctmgr -i add cluster local >/dev/null
  if ! pid_alive "$DEVSLURM_DIR/run/slurmctld.pid"; then
    slurmctld
    wait_for 30 scontrol ping || { log "slurmctld did not answer; see $DEVSLURM_DIR/log/slurmctld.log"; exit 1; }
  fi
  if ! pid_alive "$DEVSLURM_DIR/run/slurmd.pid"; then
    slurmd
  fi
  wait_for 30 bash -c "sinfo -h -n localhost -o %t | grep -Eq '^(idle|mix|alloc)'" || {
    scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    wait_for 15 bash -c "sinfo -h -n localhost -o %t | grep -Eq '^(idle|mix|alloc)'" \
      || { log "node did not become idle; see $DEVSLURM_DIR/log/slurmd.log"; exit 1; }
  }
}

up() {
  install_packages
  write_configs
  start_munge
  start_mariadb
  start_slurm
  log "cluster 'local' is up (partitions: low [preemptible], high)"
  echo "export SLURM_CONF=$CONF"
}

stop_pidfile() {
  local f=$1 pid
  pid_alive "$f" || { rm -f "$f"; return 0; }
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

down() {
  [ -d "$DEVSLURM_DIR/run" ] || { log "nothing to stop"; return 0; }
  # Jobs first, so slurmd does not leave job processes behind.
  if pid_alive "$DEVSLURM_DIR/run/slurmctld.pid"; then scancel -u "$(id -un)" >/dev/null 2>&1 || true; fi
  for d in slurmd slurmctld slurmdbd mariadbd munged; do stop_pidfile "$DEVSLURM_DIR/run/$d.pid"; done
  log "stopped"
}

status() {
  for d in munged mariadbd slurmdbd slurmctld slurmd; do
    if pid_alive "$DEVSLURM_DIR/run/$d.pid"; then echo "$d: running ($(cat "$DEVSLURM_DIR/run/$d.pid"))"; else echo "$d: stopped"; fi
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
