#!/usr/bin/env bash
# Stop the two-node dev cluster started by start.sh: cancel jobs, stop both slurmd daemons,
# slurmctld and munged. Leaves packages, config, logs and state in place (start.sh reuses
# them). Safe to run when nothing is running.
#
# Options:
#   --keep-munge   leave munged running (other munge users on the machine)
set -euo pipefail

KEEP_MUNGE=0
for arg in "$@"; do
    case "$arg" in
        --keep-munge) KEEP_MUNGE=1 ;;
        *) echo "[dev-cluster] ERROR: unknown option '$arg' (only --keep-munge)" >&2; exit 2 ;;
    esac
done

log() { echo "[dev-cluster] $*"; }

pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -s "$pidfile" ]] || return 1
    pid="$(cat "$pidfile")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]
}

# stop_daemon PIDFILE NAME: SIGTERM, wait up to 10 s, then SIGKILL.
stop_daemon() {
    local pidfile=$1 name=$2 pid
    if ! pid_alive "$pidfile" "$name"; then
        log "$name ($pidfile) not running"
        return 0
    fi
    pid="$(cat "$pidfile")"
    log "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) ignored SIGTERM, sending SIGKILL"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

# Cancel jobs first so their steps do not outlive slurmd as orphans.
if command -v scancel >/dev/null 2>&1 && scontrol ping 2>/dev/null | grep -q UP; then
    if [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
        log "cancelling all jobs"
        squeue -h -o %i | xargs -r scancel --quiet || true
        for _ in $(seq 1 50); do [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break; sleep 0.2; done
    fi
fi

for n in n1 n2; do stop_daemon "/run/slurmd-$n.pid" slurmd; done
stop_daemon /run/slurmctld.pid slurmctld

if [[ $KEEP_MUNGE == 0 ]]; then
    stop_daemon /run/munge/munged.pid munged
fi
log "stopped"
