#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost, for ecic's cluster tests (tests/slurm.rs) and for trying
# `ecic sweep --executor slurm` on one machine.
#
#   scripts/slurm-local.sh start    install Debian's packages if missing, start munged, slurmctld, slurmd,
#                                   and wait until the node is idle (idempotent: a running cluster is kept)
#   scripts/slurm-local.sh stop     stop the daemons this script started
#   scripts/slurm-local.sh status   print sinfo; exit 0 only if the node answers and takes jobs
#
# Needs root on Debian (no systemd needed: the daemons are started by hand). Everything Slurm writes (state,
# spool, logs, pid files, the job-completion file) lives under one base dir, $ECIC_SLURM_DIR
# (default /var/tmp/ecic-slurm). The config is /etc/slurm/slurm.conf, the path every Slurm client reads by
# default, so `sbatch` works without SLURM_CONF; a slurm.conf this script did not write is never touched.
set -euo pipefail

BASE=${ECIC_SLURM_DIR:-/var/tmp/ecic-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by ecic scripts/slurm-local.sh"
PKGS=(slurmctld slurmd slurm-client munge)

log() { printf 'slurm-local: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"; }

install_packages() {
    local missing=()
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Waits up to $1 seconds for the command "${@:2}" to succeed (polling: synchronisation with a daemon).
wait_for() {
    local deadline=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
    local host node
    host=$(hostname -s)
    # `slurmd -C` prints this machine's node line (CPUs, sockets, cores, memory) as slurmd will see it.
    node=$(slurmd -C | head -n 1)
    case "$node" in NodeName=*) ;; *) die "unexpected \`slurmd -C\` output: $node" ;; esac
    cat <<EOF
$MARK; edits are overwritten by \`start\`
ClusterName=ecic
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# No accounting daemon: sacct does not work, finished jobs stay visible to scontrol for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/jobcomp.txt
MinJobAge=3600
# Without this each dependency step waits for the batch scheduler's delay (~3 s).
SchedulerParameters=batch_sched_delay=0
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create >/dev/null 2>&1 \
        || die "no /etc/munge/munge.key and mungekey failed"
    # munged refuses to run as root.
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 sh -c 'munge -n | unmunge' || die "munged did not come up"
}

node_ready() {
    # The node's state as the controller sees it, e.g. `idle`, `mixed`, `down*`.
    local st
    st=$(sinfo -h -N -o '%t' 2>/dev/null | head -n 1)
    case "$st" in idle|mix|mixed|alloc|allocated|comp|completing) return 0 ;; *) return 1 ;; esac
}

cmd_start() {
    need_root
    install_packages
    mkdir -p "$BASE"/{state,spool,log,run} /etc/slurm
    if [ -e "$CONF" ] && ! head -n 1 "$CONF" | grep -qF "$MARK"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it"
    fi
    local new
    new=$(write_conf)
    if [ ! -e "$CONF" ] || [ "$new" != "$(cat "$CONF")" ]; then
        # A changed config needs the daemons restarted to take effect.
        if pid_alive "$BASE/run/slurmctld.pid" || pid_alive "$BASE/run/slurmd.pid"; then
            log "config changed: restarting the daemons"
            stop_daemons
        fi
        printf '%s\n' "$new" > "$CONF"
    fi
    start_munge
    if ! pid_alive "$BASE/run/slurmctld.pid"; then
        log "starting slurmctld"
        # -i: ignore unreadable state left by an earlier, unclean stop.
        slurmctld -i
        wait_for 20 scontrol ping || die "slurmctld did not answer; see $BASE/log/slurmctld.log"
    fi
    if ! pid_alive "$BASE/run/slurmd.pid"; then
        log "starting slurmd"
        slurmd
    fi
    if ! wait_for 30 node_ready; then
        # A node drained by an earlier failure is not brought back by ReturnToService; resume it once.
        scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
        wait_for 15 node_ready || { sinfo >&2 || true; die "node not idle; see $BASE/log/"; }
    fi
    log "cluster up: $(sinfo -h -N -o '%N %t %c cpus %m MB')"
}

# Sends SIGTERM to the daemon whose pid file is $1 and waits for it to exit.
stop_pidfile() {
    local f=$1 pid
    pid_alive "$f" || { rm -f "$f"; return 0; }
    pid=$(cat "$f")
    kill "$pid"
    wait_for 20 sh -c "! kill -0 $pid" || { log "pid $pid did not stop; killing it"; kill -9 "$pid" || true; }
    rm -f "$f"
}

stop_daemons() {
    stop_pidfile "$BASE/run/slurmd.pid"
    stop_pidfile "$BASE/run/slurmctld.pid"
}

cmd_stop() {
    need_root
    stop_daemons
    stop_pidfile /run/munge/munged.pid
    log "stopped"
}

cmd_status() {
    sinfo || exit 1
    node_ready
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
