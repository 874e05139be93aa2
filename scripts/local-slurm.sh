#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for trying `bench sweep --launcher slurm` and for
# tests/test_slurm.py: munge + MariaDB + slurmdbd (accounting: without it submitit cannot see
# cancelled or timed-out jobs) + slurmctld + slurmd, from Debian's packages, as root, without systemd.
#
#   scripts/local-slurm.sh start    install what is missing (apt-get), write the config, start what is
#                                   down (idempotent: a second start only checks, ~0.2 s)
#   scripts/local-slurm.sh stop     stop the daemons this script started, by their pid files
#   scripts/local-slurm.sh status   exit 0 when the cluster answers and its node is up, else 1
#
#   SLURM_ROOT  state, spool, logs and pid files (default /tmp/debias-bench-slurm)
#   WITH_DBD=0  no MariaDB/slurmdbd (sacct then fails; submitit cannot see CANCELLED/TIMEOUT states)
#
# Exit status 3 means "SLURM cannot be set up on this machine" (not root, not Debian/apt, the install
# failed, or a SLURM configuration that this script did not write is present and left untouched);
# the test suite skips the SLURM tests on it (and fails on it when CI=true).
#
# Apart from SLURM_ROOT it uses the Debian packages' fixed locations: /etc/slurm, /etc/munge,
# /run/munge, /var/lib/munge, /var/log/munge, /run/mysqld, /var/lib/mysql. Meant for a disposable
# machine (CI, a container, a VM): it refuses to touch a slurm.conf it did not write.
# Recipe and measurements: the project's research note on SLURM feasibility (Debian 12, slurm 22.05).
set -euo pipefail

SLURM_ROOT=${SLURM_ROOT:-/tmp/debias-bench-slurm}
WITH_DBD=${WITH_DBD:-1}
NODE=localhost
PARTITION=debug
MARKER="# written by debias-bench scripts/local-slurm.sh"
CANNOT=3
# munged and mariadbd run as their own users, so their pid files live in their own run folders.
MUNGED_PID=/run/munge/debias-bench-munged.pid
MARIADB_PID=/run/mysqld/debias-bench-mariadbd.pid

T0=$(date +%s%N)
log() { printf '[local-slurm %s] %s\n' "$(awk -v a="$T0" -v b="$(date +%s%N)" 'BEGIN {printf "%.1fs", (b - a) / 1e9}')" "$*"; }
cannot() { echo "local-slurm: cannot set up SLURM here: $*" >&2; exit $CANNOT; }

alive() { # alive PID: a live process (killed daemons linger as zombies until PID 1 reaps them)
  case "$(ps -o stat= -p "$1" 2>/dev/null)" in Z*|"") return 1 ;; *) return 0 ;; esac
}
alive_pidfile() { [ -s "$1" ] && alive "$(cat "$1")"; }
wait_for() { # wait_for SECONDS DESCRIPTION CMD...
  local t=$1 d=$2; shift 2
  for _ in $(seq 1 $((t * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  log "timed out waiting for $d (logs in $SLURM_ROOT/log)"; return 1
}
node_up() { sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated|completing)'; }

cluster_status() {
  command -v scontrol >/dev/null 2>&1 || return 1
  scontrol ping 2>/dev/null | grep -q UP && node_up
}

start() {
  [ "$(id -u)" = 0 ] || cannot "needs root (it installs Debian packages and starts system daemons)"
  command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1 \
    || cannot "needs a Debian-like system with apt-get"
  if [ -e /etc/slurm/slurm.conf ] && ! grep -qF "$MARKER" /etc/slurm/slurm.conf; then
    cannot "/etc/slurm/slurm.conf exists and was not written by this script; leaving that cluster alone"
  fi

  # 1. packages (Debian bookworm: slurm 22.05, munge 0.5.15, mariadb 10.11). Package scripts do not
  #    start services here (no systemd), so everything is started by hand below.
  local pkgs="munge slurmctld slurmd slurm-client" missing="" p
  [ "$WITH_DBD" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    log "installing:$missing"
    if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit 2>/dev/null)" ]; then
      apt-get update -qq >/dev/null 2>&1 || cannot "apt-get update failed"
    fi
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1 || {
      apt-get update -qq >/dev/null 2>&1 || true   # stale package lists: refresh once and retry
      # shellcheck disable=SC2086
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1 \
        || cannot "apt-get install$missing failed"
    }
  fi
  log "packages ok"

  # 2. config. DefMemPerCPU: without it a job that asks for no memory gets the whole node (jobs then run
  #    one at a time). KillWait=5: submitit ignores SIGTERM, so a cancelled job would otherwise linger
  #    30 s in COMPLETING.
  mkdir -p "$SLURM_ROOT"/{state,spool,log} /etc/slurm
  local cpus mem acct conf conf_changed=0
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.85)}' /proc/meminfo)
  if [ "$WITH_DBD" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux"
  else
    acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  fi
  conf=$(cat <<EOF
$MARKER (SLURM_ROOT=$SLURM_ROOT)
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SLURM_ROOT/state
SlurmdSpoolDir=$SLURM_ROOT/spool
SlurmctldPidFile=$SLURM_ROOT/slurmctld.pid
SlurmdPidFile=$SLURM_ROOT/slurmd.pid
SlurmctldLogFile=$SLURM_ROOT/log/slurmctld.log
SlurmdLogFile=$SLURM_ROOT/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
KillWait=5
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
$acct
JobCompType=jobcomp/none
NodeName=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
  if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$conf" ]; then
    printf '%s\n' "$conf" > /etc/slurm/slurm.conf
    conf_changed=1
  fi

  # 3. munge (authentication between the SLURM daemons and commands)
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f /run/munge/munge.socket.2*   # a stale socket left by a dead munged
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGED_PID"
    wait_for 10 munged sh -c 'munge -n | unmunge'
  fi
  log "munge ok"

  # 4. accounting: MariaDB + slurmdbd (submitit polls sacct for job states)
  if [ "$WITH_DBD" = 1 ]; then
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null 2>&1
    if ! mysqladmin ping >/dev/null 2>&1; then
      setsid nohup /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --pid-file="$MARIADB_PID" \
        >"$SLURM_ROOT/log/mariadb.log" 2>&1 </dev/null &
      wait_for 60 mariadb mysqladmin ping
    fi
    mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    log "mariadb ok"
    local dbd_conf
    dbd_conf=$(cat <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$SLURM_ROOT/log/slurmdbd.log
PidFile=$SLURM_ROOT/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
)
    printf '%s\n' "$dbd_conf" > /etc/slurm/slurmdbd.conf
    chmod 600 /etc/slurm/slurmdbd.conf
    if ! alive_pidfile "$SLURM_ROOT/slurmdbd.pid"; then
      slurmdbd   # daemonizes itself
      wait_for 60 slurmdbd sh -c 'sacctmgr -n list cluster'
    fi
    log "slurmdbd ok"
  fi

  # 5. slurmctld + slurmd (the cluster registers itself with slurmdbd when slurmctld starts)
  if ! alive_pidfile "$SLURM_ROOT/slurmctld.pid"; then
    slurmctld   # daemonizes itself
    wait_for 30 slurmctld scontrol ping
  elif [ "$conf_changed" = 1 ]; then
    scontrol reconfigure
  fi
  log "slurmctld ok"
  if ! alive_pidfile "$SLURM_ROOT/slurmd.pid"; then
    slurmd -N "$NODE"   # daemonizes; -N: the node is "localhost" whatever the hostname is
  fi
  if ! wait_for 30 "node $NODE up" node_up; then
    scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
    wait_for 15 "node $NODE resumed" node_up
  fi
  log "cluster up: partition $PARTITION, node $NODE, $cpus CPUs, ${mem} MB; state in $SLURM_ROOT"
}

drain() { # cancel this cluster's jobs and wait for them to end: job steps left running when slurmd and
           # slurmctld stop would hang on (srun waits for its step to be acknowledged) and outlive the cluster
  alive_pidfile "$SLURM_ROOT/slurmctld.pid" && alive_pidfile "$SLURM_ROOT/slurmd.pid" || return 0
  local jobs
  jobs=$(squeue -h -o %i 2>/dev/null || true)
  [ -z "$jobs" ] && return 0
  echo "cancelling jobs: $(echo $jobs)"
  # shellcheck disable=SC2086
  scancel $jobs 2>/dev/null || true
  wait_for 30 "the cancelled jobs to end" sh -c '[ -z "$(squeue -h 2>/dev/null)" ]' || true
}

stop() { # by pid files only: never by process name, so nothing this script did not start is touched
  local name file p
  drain
  for name in slurmd slurmctld slurmdbd mariadbd munged; do
    case $name in
      mariadbd) file=$MARIADB_PID ;;
      munged) file=$MUNGED_PID ;;
      *) file="$SLURM_ROOT/$name.pid" ;;
    esac
    [ -s "$file" ] || continue
    p=$(cat "$file")
    if alive "$p" && kill "$p" 2>/dev/null; then
      for _ in $(seq 1 60); do alive "$p" || break; sleep 0.25; done
      if alive "$p"; then echo "$name (pid $p) still running" >&2; else echo "stopped $name"; fi
    fi
    rm -f "$file"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) cluster_status ;;
  *) echo "usage: $0 start|stop|status  (SLURM_ROOT=${SLURM_ROOT}, WITH_DBD=${WITH_DBD})" >&2; exit 2 ;;
esac
