#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (munge + slurmctld + slurmd), for the
# sweep integration tests and for trying `lethe sweep executor=slurm` on a laptop.
#
#   scripts/slurm_up.sh            # installs slurm-wlm + munge with apt-get when absent
#   eval "$(scripts/slurm_up.sh)"  # last stdout line is `export SLURM_CONF=...`
#   scripts/slurm_down.sh          # stops exactly the daemons this script started (by PID)
#
# Everything lives in $LETHE_SLURM_DIR (default /tmp/lethe-slurm): slurm.conf, spool and state
# folders, logs and PID files. Our own slurm.conf on non-default ports leaves a system SLURM
# installation (if any) untouched; clients find it through SLURM_CONF.
# Exit codes: 0 cluster up (idempotent: a cluster already started here is reused),
#             3 SLURM cannot be installed on this machine (callers skip), 1 anything else.
set -euo pipefail

STATE="${LETHE_SLURM_DIR:-/tmp/lethe-slurm}"
CTLD_PORT="${LETHE_SLURMCTLD_PORT:-16817}"
SLURMD_PORT="${LETHE_SLURMD_PORT:-16818}"
HOST="$(hostname -s)"
CONF="$STATE/slurm.conf"

say() { echo "slurm_up: $*" >&2; }
cannot_install() { say "cannot install SLURM: $*"; exit 3; }

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# --- packages ----------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  command -v apt-get >/dev/null || cannot_install "slurmctld is absent and there is no apt-get"
  [[ "$(id -u)" == 0 ]] || cannot_install "slurmctld is absent and installing it needs root"
  say "installing slurm-wlm and munge with apt-get (once per machine)"
  export DEBIAN_FRONTEND=noninteractive
  apt_opts=(-q -y -o DPkg::Lock::Timeout=600)
  if ! apt-get "${apt_opts[@]}" install --no-install-recommends slurm-wlm munge >"$STATE.apt.log" 2>&1; then
    apt-get -q -o DPkg::Lock::Timeout=600 update >>"$STATE.apt.log" 2>&1 \
      || cannot_install "apt-get update failed (see $STATE.apt.log)"
    apt-get "${apt_opts[@]}" install --no-install-recommends slurm-wlm munge >>"$STATE.apt.log" 2>&1 \
      || cannot_install "apt-get install slurm-wlm munge failed (see $STATE.apt.log)"
  fi
  command -v slurmctld >/dev/null || cannot_install "slurmctld still absent after apt-get install"
fi

mkdir -p "$STATE"/{spool/slurmctld,spool/slurmd,log,run}

# --- munge (authentication between the daemons and the clients) ---------------------------
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey -c -f -k /etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  # no systemd in containers: the socket folder is not created for us
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- munged
  for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$STATE/run/munged.pid"   # ours: slurm_down.sh stops it
  munge -n </dev/null | unmunge >/dev/null || { say "munged started but does not answer"; exit 1; }
fi

# --- slurm.conf --------------------------------------------------------------------------
# GNU nproc honours OMP_NUM_THREADS (often 1 in test runs): ask without it. At least 2 CPUs are
# declared (config_overrides: slurmd accepts more than it finds; task/none binds nothing) so
# a 2-task job, one data-parallel run of two ranks, can be scheduled on a 1-core machine too.
CPUS="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
[ "$CPUS" -ge 2 ] || CPUS=2
MEM_MB="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
cat >"$CONF.new" <<CONF
# written by lethe scripts/slurm_up.sh: a one-node cluster for tests
ClusterName=lethe
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$STATE/spool/slurmctld
SlurmdSpoolDir=$STATE/spool/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ReturnToService=2
SlurmdParameters=config_overrides
# short grace period between SIGTERM and SIGKILL: requeue/cancel in tests take seconds
KillWait=5
# a requeued job waits cred_expire+1 s before it may start again (default 120 s)
AuthInfo=cred_expire=10
# look at pending (e.g. just requeued) jobs every few seconds instead of every minute
SchedulerParameters=sched_interval=5,bf_interval=5
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$CONF"
stop() {  # a PID file of ours: SIGTERM, wait, SIGKILL
  local pid; pid="$(cat "$1" 2>/dev/null)" || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}
if ! cmp -s "$CONF.new" "$CONF"; then  # a changed config: restart our daemons on it
  stop "$STATE/run/slurmd.pid"
  stop "$STATE/run/slurmctld.pid"
fi
mv "$CONF.new" "$CONF"

# --- daemons -----------------------------------------------------------------------------
if ! alive "$STATE/run/slurmctld.pid"; then
  slurmctld -c          # -c: a clean cluster, no jobs left over from an earlier session
fi
if ! alive "$STATE/run/slurmd.pid"; then
  slurmd
fi

for i in $(seq 60); do
  state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1 || true)"
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    down*|drain*|fail*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1 || true)"
case "$state" in
  idle|mixed|allocated|completing) ;;
  *) say "node $HOST is '${state:-unreachable}' (see $STATE/log/slurmctld.log and slurmd.log)"; exit 1 ;;
esac
say "cluster up: partition debug, node $HOST, $CPUS CPUs; state in $STATE"
echo "export SLURM_CONF=$CONF"
