#!/usr/bin/env bash
# Stop what slurm/local-cluster/start.sh started: jobs, slurmctld+slurmd, slurmdbd, mariadb, munged.
#   stop.sh                  all of them
#   stop.sh NAME...          only these (names as start.sh writes them to STARTED_FILE: munged mariadb slurmdbd
#                            slurmctld slurmd), e.g. what the test fixture started itself
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
ONLY=" $* "
wanted() { [ "$ONLY" = "  " ] || case "$ONLY" in *" $1 "*) true ;; *) false ;; esac; }
for name in "$@"; do
  case $name in munged|mariadb|slurmdbd|slurmctld|slurmd) ;; *) echo "stop.sh: unknown daemon $name" >&2; exit 2 ;; esac
done
if wanted slurmctld && [ -f /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null; then
  scancel --user="$(id -un)" 2>/dev/null || true   # so no job is recovered on the next start
  if wanted slurmd; then
    pids="$(cat /run/slurmctld.pid) $(cat /run/slurmd.pid 2>/dev/null)"
    scontrol shutdown && echo "scontrol shutdown sent (slurmctld + slurmd)"
    for _ in $(seq 1 100); do   # exited daemons stay zombies ~1-2 s until PID 1 reaps them
      still=""; for p in $pids; do kill -0 "$p" 2>/dev/null && still="$still $p"; done
      [ -z "$still" ] && break; sleep 0.2
    done
  fi
fi
wanted slurmd && stop_pid slurmd /run/slurmd.pid
wanted slurmctld && stop_pid slurmctld /run/slurmctld.pid
wanted slurmdbd && stop_pid slurmdbd /run/slurmdbd.pid
if wanted mariadb && [ "${PURGE_STATE:-0}" = 1 ] && mariadb-admin ping >/dev/null 2>&1; then
  mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db" && echo "dropped slurm_acct_db"
fi
wanted mariadb && stop_pid mariadb /run/slurm-local-mariadb.pid
wanted munged && stop_pid munged /run/munge/munged.pid
if [ "${PURGE_STATE:-0}" = 1 ]; then
  rm -rf /var/spool/slurm /var/log/slurm
  echo "purged slurm state"
fi
