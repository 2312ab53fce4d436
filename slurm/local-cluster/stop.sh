#!/usr/bin/env bash
# Stop what slurm/local-cluster/start.sh started: jobs, slurmctld+slurmd, slurmdbd, mariadb, munged.
# Only PIDs from the daemons' own pid files are signalled. PURGE_STATE=1 also deletes job state + DB.
set -uo pipefail
stop_pid() {  # stop_pid NAME PIDFILE
  local f=$2 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { echo "$1 ($pid) still alive, SIGKILL"; kill -9 "$pid"; }
  fi
  rm -f "$f"; echo "stopped $1"
}
if [ -f /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null; then
  pids="$(cat /run/slurmctld.pid) $(cat /run/slurmd.pid 2>/dev/null)"
  scancel --user="$(id -un)" 2>/dev/null || true   # so no job is recovered on the next start
  scontrol shutdown && echo "scontrol shutdown sent (slurmctld + slurmd)"
  for _ in $(seq 1 100); do   # exited daemons stay zombies ~1-2 s until PID 1 reaps them
    still=""; for p in $pids; do kill -0 "$p" 2>/dev/null && still="$still $p"; done
    [ -z "$still" ] && break; sleep 0.2
  done
fi
stop_pid slurmd /run/slurmd.pid
stop_pid slurmctld /run/slurmctld.pid
stop_pid slurmdbd /run/slurmdbd.pid
if [ "${PURGE_STATE:-0}" = 1 ] && mariadb-admin ping >/dev/null 2>&1; then
  mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db" && echo "dropped slurm_acct_db"
fi
stop_pid mariadb /run/slurm-local-mariadb.pid
stop_pid munged /run/munge/munged.pid
if [ "${PURGE_STATE:-0}" = 1 ]; then
  rm -rf /var/spool/slurm /var/log/slurm
  echo "purged slurm state"
fi
