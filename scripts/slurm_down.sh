#!/usr/bin/env bash
# Stop the daemons scripts/slurm_up.sh started, by the PIDs it recorded (never by name).
# A munged that was already running before slurm_up.sh is left alone.
set -uo pipefail
STATE="${LETHE_SLURM_DIR:-/tmp/lethe-slurm}"

stop() {  # stop PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
  local file="$1" pid
  [[ -f "$file" ]] || return 0
  pid="$(cat "$file")"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  fi
  rm -f "$file"
}

# jobs still running belong to the cluster being stopped
if [[ -f "$STATE/slurm.conf" ]] && [[ -f "$STATE/run/slurmctld.pid" ]]; then
  SLURM_CONF="$STATE/slurm.conf" scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
fi
stop "$STATE/run/slurmd.pid"
stop "$STATE/run/slurmctld.pid"
stop "$STATE/run/munged.pid"
echo "slurm_down: stopped the daemons recorded in $STATE/run" >&2
