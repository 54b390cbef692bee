#!/usr/bin/env bash
# A real single-machine Slurm cluster for trying the multi-node path and for CI tests:
# munge + MariaDB + slurmdbd (accounting, so `sacct` works) + slurmctld + slurmd.
# Built for Debian 12, run as root, without systemd and without cgroups.
#
#   bash scripts/local_slurm.sh start    install missing packages, write config, start the
#                                        daemons not already running, wait until the node is
#                                        idle and sacct works; prints `export SLURM_CONF=...`
#   bash scripts/local_slurm.sh stop     cancel jobs, stop the daemons this script started
#   bash scripts/local_slurm.sh status   daemon states + sinfo; exit 0 if up, 1 if not
#
# Progress goes to stderr; the only line on stdout of `start` is the one clients need, so
#   eval "$(bash scripts/local_slurm.sh start)"
# works. Every command is idempotent: start twice, stop twice, stop without a start are fine.
#
# Environment:
#   SLURM_LAB=/tmp/slurm-lab     config (etc/), state (state/), logs (log/), pid files (pids/)
#   SLURM_LAB_TIMEOUT=60         seconds to wait for each daemon / the node / sacct
#
# State (job ids, accounting DB) survives stop/start; `rm -rf $SLURM_LAB` after stop for a
# clean slate. Without cgroups nothing is contained: set OMP_NUM_THREADS=1 in jobs, and ask
# for no more tasks than the machine has CPUs.
set -euo pipefail

LAB=${SLURM_LAB:-/tmp/slurm-lab}
TIMEOUT=${SLURM_LAB_TIMEOUT:-60}
export SLURM_CONF=$LAB/etc/slurm.conf
PIDS=$LAB/pids
NODE=$(hostname -s)
PATH=$PATH:/usr/sbin:/sbin
# mariadbd runs as `mysql` and must traverse $LAB to reach its data and socket dirs: with a
# restrictive umask (077) it fails with errno 13 / "permission denied" on the socket.
umask 022

# Daemons in start order; stop goes in reverse order.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
# Executables: start-stop-daemon compares these with /proc/PID/exe. slurmctld must be
# started as /usr/sbin/slurmctld (the alternatives link): run as /usr/sbin/slurmctld-wlm,
# slurmctld 22.05.8 segfaults silently when StateSaveLocation is empty (first start).
declare -A EXE=([munged]=/usr/sbin/munged [mariadbd]=/usr/sbin/mariadbd
                [slurmdbd]=/usr/sbin/slurmdbd [slurmctld]=/usr/sbin/slurmctld
                [slurmd]=/usr/sbin/slurmd)
declare -A PORTS=([mariadbd]=3316 [slurmdbd]=6819 [slurmctld]=6817 [slurmd]=6818)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd slurm-wlm-mysql-plugin mariadb-server)

T0=$(date +%s%N)
log() {
  local ms=$(( ($(date +%s%N) - T0) / 1000000 ))
  printf '[local_slurm %3d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*" >&2
}
die() {
  log "ERROR: $*"
  local f
  for f in "$LAB"/log/slurm*.log "$LAB"/log/*.out "$LAB"/state/mysql-run/mariadb.err; do
    [ -s "$f" ] && { echo "== tail $f" >&2; tail -n 20 "$f" >&2; }
  done
  exit 1
}
need_root() { [ "$(id -u)" = 0 ] || { echo "local_slurm.sh $1: must run as root" >&2; exit 1; }; }

# waitfor DESC DAEMON CMD... : poll CMD every 0.25 s for up to $TIMEOUT s, die with DESC
# otherwise. DAEMON (or -): die at once if that daemon has exited instead of waiting it out.
waitfor() {
  local desc=$1 daemon=$2 i; shift 2
  for ((i = 0; i < TIMEOUT * 4; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    if [ "$daemon" != - ] && ! running "$daemon"; then
      die "$daemon exited while waiting for $desc (see $LAB/log/$daemon.out)"
    fi
    sleep 0.25
  done
  die "timed out after ${TIMEOUT}s waiting for $desc"
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# running NAME: the pid file names a live process running that daemon's executable.
# PID 1 here does not reap orphans, so a dead daemon can linger as a zombie and `kill -0`
# would call it alive; start-stop-daemon --status checks /proc/PID/exe instead.
running() {
  [ -f "$PIDS/$1.pid" ] &&
    start-stop-daemon --status --pidfile "$PIDS/$1.pid" --exec "${EXE[$1]}" >/dev/null 2>&1
}

# launch NAME USER ARGS... : start the daemon in its foreground mode, detached by
# start-stop-daemon, which writes the pid file (no daemon double-fork to chase).
launch() {
  local name=$1 user=$2; shift 2
  if running "$name"; then
    log "$name already running (pid $(cat "$PIDS/$name.pid"))"
    return 0
  fi
  # Someone else on our port (another Slurm, a leftover daemon) would make ours die at bind.
  if [ -n "${PORTS[$name]:-}" ] && port_open "${PORTS[$name]}"; then
    die "port ${PORTS[$name]} for $name is already in use by another process"
  fi
  start-stop-daemon --start --background --make-pidfile --pidfile "$PIDS/$name.pid" \
    --chuid "$user" --output "$LAB/log/$name.out" --exec "${EXE[$name]}" -- "$@"
  # Right after the fork, /proc/PID/exe is still start-stop-daemon, so `running` is false
  # for a moment: wait for the exec before anyone treats "not running" as "exited".
  local i
  for ((i = 0; i < 40; i++)); do
    running "$name" && { log "started $name (pid $(cat "$PIDS/$name.pid"))"; return 0; }
    sleep 0.05
  done
  die "$name did not start (see $LAB/log/$name.out)"
}

# ------------------------------------------------------------------------------ packages
ensure_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null)" = "ii " ] || missing+=("$p")
  done
  [ ${#missing[@]} = 0 ] && return 0
  log "installing ${missing[*]} (apt log: $LAB/log/apt.log)"
  # Without this, the maintainer scripts start munge and MariaDB with their stock config
  # (MariaDB on 3306, munged outside our pid files). Only remove it if we created it.
  local policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  local rc=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
  } > "$LAB/log/apt.log" 2>&1 || rc=$?
  if [ "$policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  [ "$rc" = 0 ] || { tail -n 30 "$LAB/log/apt.log" >&2; die "apt-get failed (rc=$rc)"; }
  log "installed: $(dpkg-query -W -f='${Package}=${Version} ' "${PACKAGES[@]}")"
}

# ------------------------------------------------------------------------------ config
ensure_hostname() {
  # Slurm (SlurmctldHost/NodeName) and torch.distributed (MASTER_ADDR = node name) need the
  # short host name to resolve.
  if ! getent hosts "$NODE" >/dev/null; then
    echo "127.0.0.1 $NODE" >> /etc/hosts
    log "added '127.0.0.1 $NODE' to /etc/hosts"
  fi
}

# write_config: (re)write slurm.conf and slurmdbd.conf; returns 0 if slurm.conf changed.
write_config() {
  # Build the node line from what slurmd itself detects: a hand-written one that disagrees
  # gives "Node reconfigured socket/core boundaries" and a drained node. RealMemory is set
  # to 90% of the detected value: above what slurmd sees, the node is drained.
  local hw kv node_line=""
  read -r -a hw <<< "$(slurmd -C | head -n1)"
  for kv in "${hw[@]}"; do
    case $kv in
      NodeName=*) ;;
      RealMemory=*) node_line+=" RealMemory=$(( ${kv#RealMemory=} * 9 / 10 ))" ;;
      *) node_line+=" $kv" ;;
    esac
  done
  cat > "$SLURM_CONF.new" <<EOF
# generated by scripts/local_slurm.sh - rewritten on every start
ClusterName=lab
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire (default 120 s) is also how long a requeued job must wait before it may start
# again; 10 s plus sched_interval=2 brings preemption -> requeue -> restart to ~12 s.
AuthInfo=cred_expire=10
CredType=cred/munge
SlurmctldPort=${PORTS[slurmctld]}
SlurmdPort=${PORTS[slurmd]}
StateSaveLocation=$LAB/state/ctld
SlurmdSpoolDir=$LAB/state/d
SlurmctldPidFile=$LAB/run/slurmctld.pid
SlurmdPidFile=$LAB/run/slurmd.pid
SlurmctldLogFile=$LAB/log/slurmctld.log
SlurmdLogFile=$LAB/log/slurmd.log
# no cgroups here: track processes via /proc, no task binding/containment
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5
# batch jobs may be requeued (preemption / submitit checkpoint-and-requeue)
JobRequeue=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=${PORTS[slurmdbd]}
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# the default MailProg (/bin/mail) is not installed: "Configured MailProg is invalid"
MailProg=/bin/true
# a node that was down (e.g. slurmd stopped first) comes back by itself when it registers
ReturnToService=2
InactiveLimit=0
KillWait=10
MinJobAge=300
Waittime=0
NodeName=${NODE} NodeAddr=127.0.0.1${node_line} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$LAB/etc/slurmdbd.conf" <<EOF
# generated by scripts/local_slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=${PORTS[slurmdbd]}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=${PORTS[mariadbd]}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$LAB/run/slurmdbd.pid
LogFile=$LAB/log/slurmdbd.log
EOF
  chmod 600 "$LAB/etc/slurmdbd.conf"   # slurmdbd refuses a config others can read
  if cmp -s "$SLURM_CONF.new" "$SLURM_CONF"; then
    rm -f "$SLURM_CONF.new"
    return 1
  fi
  mv "$SLURM_CONF.new" "$SLURM_CONF"
  return 0
}

# ------------------------------------------------------------------------------ daemons
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
  if ! running munged && munge_works; then
    log "using the munged that is already running on this machine"
    return 0
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --force
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
  fi
  # Without systemd nobody creates /run/munge (tmpfiles.d); munged needs it for its socket.
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
  launch munged munge --foreground
  waitfor "munged (munge -n | unmunge)" munged munge_works
}

DB=$LAB/state/mysql
DBRUN=$LAB/state/mysql-run
SQL=(mariadb --no-defaults -S "$DBRUN/mysqld.sock" -uroot)

start_mariadbd() {
  # Our own instance on 127.0.0.1:3316 with data, socket, pid and error log in dirs owned
  # by mysql (the stock /run/mysqld does not exist without systemd -> errno 13).
  install -d -o mysql -g mysql "$DB" "$DBRUN"
  if [ ! -d "$DB/mysql" ]; then
    log "initialising MariaDB data dir $DB"
    mariadb-install-db --user=mysql --datadir="$DB" --auth-root-authentication-method=socket \
      --skip-test-db > "$LAB/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed"
  fi
  launch mariadbd mysql --no-defaults --user=mysql --datadir="$DB" \
    --socket="$DBRUN/mysqld.sock" --pid-file="$DBRUN/mariadbd.pid" \
    --log-error="$DBRUN/mariadb.err" --bind-address=127.0.0.1 --port="${PORTS[mariadbd]}" \
    --skip-log-bin --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900
  waitfor "mariadbd (select 1)" mariadbd "${SQL[@]}" -e 'select 1'
  "${SQL[@]}" -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
                  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
  # slurmdbd has no -f option: it reads slurmdbd.conf from the directory of $SLURM_CONF.
  launch slurmdbd root -D
  waitfor "slurmdbd (port ${PORTS[slurmdbd]})" slurmdbd port_open "${PORTS[slurmdbd]}"
}

start_slurmctld() {
  # slurmctld registers the cluster "lab" in slurmdbd by itself on first start.
  launch slurmctld root -D -f "$SLURM_CONF"
  waitfor "slurmctld (scontrol ping)" slurmctld scontrol ping
}

start_slurmd() {
  launch slurmd root -D -f "$SLURM_CONF" -N "$NODE"
  waitfor "slurmd (port ${PORTS[slurmd]})" slurmd port_open "${PORTS[slurmd]}"
}

node_state() { sinfo -h -n "$NODE" -o '%T' 2>/dev/null; }   # '*' suffix = not responding

wait_node_idle() {
  local i st
  for ((i = 0; i < TIMEOUT * 4; i++)); do
    st=$(node_state) || true
    case $st in
      idle | mixed | allocated) log "node $NODE is $st"; return 0 ;;
      # left drained/down by an earlier unclean stop or a config change: put it back
      drain* | drained* | down*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.25
  done
  die "timed out after ${TIMEOUT}s: node $NODE is '$(node_state)', not idle"
}

# End-to-end check: a 1 node x 2 task job runs, and its record reaches the accounting DB
# (sacct answering is not enough: the job must also be stored, which needs the cluster
# registered in slurmdbd).
smoke_test() {
  local out job
  out=$(timeout "$TIMEOUT" srun -N1 -n2 -t 1 -J local_slurm_smoke bash -c 'echo "$SLURM_JOB_ID"') ||
    die "smoke test 'srun -N1 -n2' failed"
  job=$(head -n1 <<< "$out")
  log "srun -N1 -n2 ok (job $job); waiting for sacct to record it"
  waitfor "sacct to report job $job" - bash -c "sacct -n -X -j '$job' -o State | grep -q COMPLETED"
}

# ------------------------------------------------------------------------------ commands
cmd_start() {
  need_root start
  mkdir -p "$LAB"/{etc,state/ctld,state/d,run,log,pids}
  ensure_packages
  ensure_hostname
  # Fail before starting anything if another process holds one of our ports.
  local name
  for name in "${!PORTS[@]}"; do
    if ! running "$name" && port_open "${PORTS[$name]}"; then
      die "port ${PORTS[$name]} (for $name) is in use by another process; stop it first"
    fi
  done
  local was_up=0 changed=0
  running slurmctld && running slurmd && was_up=1
  write_config && changed=1
  start_munged
  start_mariadbd
  start_slurmdbd
  start_slurmctld
  start_slurmd
  if [ "$was_up" = 1 ] && [ "$changed" = 1 ]; then
    log "slurm.conf changed: scontrol reconfigure"
    scontrol reconfigure || true
  fi
  wait_node_idle
  smoke_test
  sinfo >&2
  log "cluster up; clients need:"
  echo "export SLURM_CONF=$SLURM_CONF"
}

# pids of slurmstepd processes that are alive (not zombies: PID 1 here does not reap them)
live_stepds() { ps -C slurmstepd -o pid=,stat= 2>/dev/null | awk '$2 !~ /^Z/ {printf "%s ", $1}'; }

cmd_stop() {
  need_root stop
  local i
  # Cancel jobs first: without cgroups, their slurmstepd/task processes would outlive slurmd.
  if running slurmctld && [ -f "$SLURM_CONF" ]; then
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ') || true
    if [ -n "${jobs// /}" ]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel --full $jobs 2>/dev/null || true
      for ((i = 0; i < TIMEOUT * 4; i++)); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.25
      done
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] || log "WARNING: jobs still listed: $(squeue -h -o '%i %T' | tr '\n' ' ')"
    fi
  fi
  # A job leaves squeue before its slurmstepd has finished killing the tasks; give the
  # step daemons a moment, since stopping slurmd under them can leave tasks behind.
  if running slurmd; then
    for ((i = 0; i < 40; i++)); do
      [ -z "$(live_stepds)" ] && break
      sleep 0.25
    done
  fi
  local name pf stopped=0
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    name=${DAEMONS[i]}
    pf=$PIDS/$name.pid
    [ -f "$pf" ] || continue
    if running "$name"; then
      # TERM, up to 30 s for a clean shutdown (MariaDB flushes, slurmctld saves state), then
      # KILL; --exec makes sure the pid still belongs to that program.
      start-stop-daemon --stop --quiet --pidfile "$pf" --exec "${EXE[$name]}" \
        --retry TERM/30/KILL/5 || true
      log "stopped $name (pid $(cat "$pf"))"
      stopped=$((stopped + 1))
    fi
    rm -f "$pf"
  done
  if [ -n "$(live_stepds)" ]; then
    log "WARNING: slurmstepd processes are still running: $(live_stepds)"
  fi
  if [ "$stopped" = 0 ]; then
    log "nothing was running"
  else
    log "stopped (state kept in $LAB)"
  fi
}

cmd_status() {
  local up=0 name
  for name in "${DAEMONS[@]}"; do
    if running "$name"; then
      printf '%-10s running (pid %s)\n' "$name" "$(cat "$PIDS/$name.pid")"
    elif [ "$name" = munged ] && command -v munge >/dev/null && munge_works; then
      printf '%-10s running (not started by this script)\n' "$name"
    else
      printf '%-10s stopped\n' "$name"
      up=1
    fi
  done
  if [ "$up" = 0 ] && [ -f "$SLURM_CONF" ] && scontrol ping >/dev/null 2>&1; then
    sinfo
    echo "export SLURM_CONF=$SLURM_CONF"
    return 0
  fi
  echo "cluster is down (SLURM_LAB=$LAB)"
  return 1
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status   (SLURM_LAB=${LAB})" >&2; exit 2 ;;
esac
