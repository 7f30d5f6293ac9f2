#!/usr/bin/env bash
# A real Slurm cluster on this machine (munge, MariaDB, slurmdbd, slurmctld, slurmd) for tests and
# for trying slurmvision: `devslurm.sh up [--nodes N] | down | status | env`. Idempotent; `down`
# stops exactly the processes `up` started (by their pid files) and removes the network it made.
# Everything else lives under $DEVSLURM_DIR.
#
# One host (the default): node `localhost` with partitions `low` (preemptible: PriorityTier=1,
# REQUEUE with a grace time) and `high` (PriorityTier=10), so a job in `high` preempts one in `low`.
#
# Several hosts (`up --nodes 2`, or DEVSLURM_NODES=2): `localhost` and its partitions stay, and
# hosts node1..nodeN join, each a slurmd in its own network, UTS and mount namespace: its own
# hostname, its own address on a bridge this script creates ($DEVSLURM_SUBNET.1 is the bridge,
# nodeK is .(10+K)), and a private /etc/hosts, bind-mounted for that host only, that names every
# node and the controller. Job steps inherit the three namespaces, so a task on node2 sees the
# hostname node2 and reaches node1 by name: a real two-host rendezvous. Partitions `multi`
# (preemptible, like `low`) and `multi-high` (like `high`) span node1..nodeN. The root
# namespace's /etc/hosts is untouched and nothing is routed off the machine: the bridge joins
# the namespaces and this host only (no default route inside, no forwarding rule). slurmd
# enters its network namespace through nsenter: `ip netns exec` remounts /sys, and slurmd then
# finds no /sys/fs/cgroup.
set -euo pipefail

DEVSLURM_DIR=${DEVSLURM_DIR:-$(cd "$(dirname "$0")/.." && pwd)/.devslurm}
CTLD_PORT=${DEVSLURM_CTLD_PORT:-16817}
SLURMD_PORT=${DEVSLURM_SLURMD_PORT:-16818}
DBD_PORT=${DEVSLURM_DBD_PORT:-16819}
DB_PORT=${DEVSLURM_DB_PORT:-16820}
GRACE_TIME=${DEVSLURM_GRACE_TIME:-30}
# Short, as a busy real cluster may have it: a finished job leaves squeue's memory MinJobAge
# after its end (300 s by default), and whatever watches a run must decide from accounting.
MIN_JOB_AGE=${DEVSLURM_MIN_JOB_AGE:-30}
NODES=${DEVSLURM_NODES:-1}
SUBNET=${DEVSLURM_SUBNET:-10.213.7}
BRIDGE=${DEVSLURM_BRIDGE:-svbr0}
CONF="$DEVSLURM_DIR/etc/slurm.conf"
export SLURM_CONF="$CONF"

log() { echo "devslurm: $*" >&2; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# The namespaced hosts: node1..nodeN when N > 1, none for one host.
hosts() { [ "$NODES" -gt 1 ] && seq -f "node%g" 1 "$NODES" || true; }
host_addr() { echo "$SUBNET.$((10 + ${1#node}))"; }

install_packages() {
  local missing=()
  for bin in slurmctld slurmd slurmdbd sinfo munged mariadbd nsenter ip; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$bin")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Slurm, munge and MariaDB (apt; missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q slurmctld slurmd slurm-client munge slurmdbd mariadb-server iproute2 util-linux >/dev/null
}

slurm_conf() {
  local cpus mem_mb ctld_host="localhost" dbd_host="localhost" host
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))
  # The namespaced hosts reach the controller and slurmdbd (sacct from a job) at the bridge's address.
  if [ "$NODES" -gt 1 ]; then ctld_host="localhost($SUBNET.1)"; dbd_host="$SUBNET.1"; fi
  cat <<EOF
ClusterName=local
SlurmctldHost=$ctld_host
SlurmUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
StateSaveLocation=$DEVSLURM_DIR/spool/ctld
SlurmdSpoolDir=$DEVSLURM_DIR/spool/%n
SlurmctldPidFile=$DEVSLURM_DIR/run/slurmctld.pid
SlurmdPidFile=$DEVSLURM_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DEVSLURM_DIR/log/slurmctld.log
SlurmdLogFile=$DEVSLURM_DIR/log/slurmd-%n.log
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
MinJobAge=$MIN_JOB_AGE
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$dbd_host
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
EOF
  # node1..N before localhost: slurmctld takes any unknown name for `localhost` while that is
  # its only node, and would then refuse node1 as a duplicate.
  [ "$NODES" -gt 1 ] && for host in $(hosts); do
    # Each may run two 1-CPU tasks (the tasks_per_node=2 runs); all share the machine's cores.
    echo "NodeName=$host NodeAddr=$(host_addr "$host") CPUs=2 RealMemory=$(( mem_mb / NODES )) State=UNKNOWN"
  done
  cat <<EOF
NodeName=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=low Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME OverSubscribe=NO
PartitionName=high Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=10 OverSubscribe=NO
EOF
  [ "$NODES" -gt 1 ] || return 0
  cat <<EOF
PartitionName=multi Nodes=node[1-$NODES] MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME OverSubscribe=NO
PartitionName=multi-high Nodes=node[1-$NODES] MaxTime=INFINITE State=UP PriorityTier=10 OverSubscribe=NO
EOF
}

write_configs() {
  mkdir -p "$DEVSLURM_DIR"/{etc,log,run,spool/ctld,db}
  local host
  for host in localhost $(hosts); do mkdir -p "$DEVSLURM_DIR/spool/$host"; done
  slurm_conf >"$CONF.new"
  # A running cluster started with another layout restarts its Slurm daemons (jobs survive in
  # the state directory); slurmctld reads new nodes only at start.
  if [ -f "$CONF" ] && ! cmp -s "$CONF" "$CONF.new" && pid_alive "$DEVSLURM_DIR/run/slurmctld.pid"; then
    log "the cluster's layout changed: restarting slurmctld and slurmd"
    stop_slurm_daemons
  fi
  mv "$CONF.new" "$CONF"
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

# The bridge, one namespace per host with a veth into the bridge, and each host's hosts file.
start_network() {
  [ "$NODES" -gt 1 ] || { stop_network; return 0; }
  local host ns addr
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  {
    echo "127.0.0.1 localhost"
    echo "$SUBNET.1 $(hostname) devslurm-controller"
    for host in $(hosts); do echo "$(host_addr "$host") $host"; done
  } >"$DEVSLURM_DIR/etc/hosts"
  for host in $(hosts); do
    ns="sv-$host"
    addr=$(host_addr "$host")
    ip netns list | grep -qw "$ns" || ip netns add "$ns"
    if ! ip link show "sv-$host-br" >/dev/null 2>&1; then
      ip link add "sv-$host-br" type veth peer name "sv-$host"
      ip link set "sv-$host" netns "$ns"
      ip link set "sv-$host-br" master "$BRIDGE" up
      nsenter --net="/var/run/netns/$ns" ip addr add "$addr/24" dev "sv-$host"
    fi
    nsenter --net="/var/run/netns/$ns" ip link set lo up
    nsenter --net="/var/run/netns/$ns" ip link set "sv-$host" up
  done
}

stop_network() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^sv-node[0-9]+$/ {print $1}'); do
    ip link del "$ns-br" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  rm -f "$DEVSLURM_DIR/etc/hosts"
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

node_usable() { sinfo -h -n "$1" -o %t | grep -Eq '^(idle|mix|alloc)'; }

start_slurmd() {  # start_slurmd HOST
  local host=$1
  pid_alive "$DEVSLURM_DIR/run/slurmd-$host.pid" && return 0
  if [ "$host" = localhost ]; then
    slurmd -N localhost
  else
    # Its own hostname and hosts file, seen only inside its UTS and mount namespaces.
    nsenter --net="/var/run/netns/sv-$host" unshare --uts --mount --propagation private sh -c \
      "hostname $host && mount --bind '$DEVSLURM_DIR/etc/hosts' /etc/hosts && exec slurmd -N $host"
  fi
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
  local host
  for host in localhost $(hosts); do
    start_slurmd "$host"
  done
  for host in localhost $(hosts); do
    wait_for 30 node_usable "$host" || {
      scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
      wait_for 15 node_usable "$host" || { log "node $host did not become idle; see $DEVSLURM_DIR/log/slurmd-$host.log"; exit 1; }
    }
  done
}

up() {
  install_packages
  write_configs
  start_network
  start_munge
  start_mariadb
  start_slurm
  if [ "$NODES" -gt 1 ]; then
    log "cluster 'local' is up: localhost (partitions low [preemptible], high) and $(hosts | paste -sd, -)" \
        "(partitions multi [preemptible], multi-high)"
  else
    log "cluster 'local' is up (partitions: low [preemptible], high)"
  fi
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

stop_slurm_daemons() {
  local f
  for f in "$DEVSLURM_DIR"/run/slurmd-*.pid "$DEVSLURM_DIR/run/slurmd.pid"; do [ -e "$f" ] && stop_pidfile "$f"; done
  stop_pidfile "$DEVSLURM_DIR/run/slurmctld.pid"
}

down() {
  if [ -d "$DEVSLURM_DIR/run" ]; then
    # Jobs first, so slurmd does not leave job processes behind.
    if pid_alive "$DEVSLURM_DIR/run/slurmctld.pid"; then scancel -u "$(id -un)" >/dev/null 2>&1 || true; fi
    stop_slurm_daemons
    for d in slurmdbd mariadbd munged; do stop_pidfile "$DEVSLURM_DIR/run/$d.pid"; done
  fi
  stop_network
  log "stopped"
}

status() {
  local f
  for d in munged mariadbd slurmdbd slurmctld; do
    if pid_alive "$DEVSLURM_DIR/run/$d.pid"; then echo "$d: running ($(cat "$DEVSLURM_DIR/run/$d.pid"))"; else echo "$d: stopped"; fi
  done
  for f in "$DEVSLURM_DIR"/run/slurmd-*.pid; do
    [ -e "$f" ] || continue
    d=$(basename "$f" .pid)
    if pid_alive "$f"; then echo "$d: running ($(cat "$f"))"; else echo "$d: stopped"; fi
  done
}

command=${1:-}
shift || true
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=${2:?--nodes needs a number}; shift 2 ;;
    --nodes=*) NODES=${1#--nodes=}; shift ;;
    *) echo "usage: $0 up [--nodes N] | down | status | env" >&2; exit 2 ;;
  esac
done
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || { echo "devslurm: --nodes must be 1 to 99, not '$NODES'" >&2; exit 2; }

case "$command" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up [--nodes N] | down | status | env" >&2; exit 2 ;;
esac
