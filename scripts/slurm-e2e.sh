#!/usr/bin/env bash
# End-to-end check of `sweep slurm` on a real Slurm: installs Debian's slurm-wlm and munge (when
# missing), starts a single-node cluster on this machine, and
#
#   1. submits the job array `sweep slurm` writes for a tiny sweep, waits, and checks that
#      `sweep report` sees every run finished, each trained exactly once;
#   2. submits a fresh copy, kills one array task while it trains a run (SIGKILL), resubmits the
#      same script, and checks that the sweep completes with every run finished once: the killed
#      run resumed from its checkpoint, no finished run trained again.
#
# Needs root (it writes /etc/slurm/slurm.conf and starts munged, slurmctld and slurmd as root) and
# is meant for a throwaway machine or container: it stops the daemons it started on exit.
# Usage: scripts/slurm-e2e.sh [WORKDIR]   (default: a fresh temporary directory)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d /tmp/slurm-e2e.XXXXXX)}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
START=$(date +%s)
log() { echo "[slurm-e2e $(($(date +%s) - START))s] $*"; }
fail() { echo "[slurm-e2e] FAIL: $*" >&2; exit 1; }

# --- Slurm and munge ------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && kill "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT

if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --force 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
chmod 600 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
if ! munge -n >/dev/null 2>&1; then
    log "starting munged"
    if id munge >/dev/null 2>&1; then
        su -s /bin/sh munge -c "munged" || munged --force
    else
        munged --force
    fi
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.2; done
    munge -n >/dev/null 2>&1 || fail "munged does not answer"
fi

HOST="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=e2e
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=2
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=e2e Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

log "starting slurmctld and slurmd on $HOST ($CPUS CPUs)"
pkill_pidfile() { [ -f "$1" ] && kill "$(cat "$1")" 2>/dev/null || true; }
pkill_pidfile /run/slurmctld.pid
pkill_pidfile /run/slurmd.pid
sleep 1
slurmctld -D -i >/var/log/slurm/slurmctld.out 2>&1 &
PIDS+=($!)
sleep 2
slurmd -D >/var/log/slurm/slurmd.out 2>&1 &
PIDS+=($!)
for _ in $(seq 60); do
    state="$(sinfo -h -N -o %t 2>/dev/null | head -1 || true)"
    case "$state" in idle*|mix*|alloc*) break ;; esac
    sleep 1
done
sinfo -h -N -o "%N %t" | grep -Eq "idle|mix|alloc" || {
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    fail "the node did not come up"
}
scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
log "cluster up: $(sinfo -h -o '%P %a %D %t')"

# --- the sweep binary and a tiny sweep ------------------------------------------------------
log "building sweep (release)"
(cd "$ROOT" && cargo build --release --quiet --bin sweep)
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/sweep"
[ -x "$BIN" ] || fail "no sweep binary at $BIN"

write_sweep() { # $1: directory
    mkdir -p "$1"
    cat > "$1/sweep.toml" <<'EOF'
name = "e2e"
runs_dir = "runs"
report_dir = "report"
[base]
threads = 1
[base.model]
preset = "test"
[base.train]
steps = 400
[base.eval]
interval = 20
tokens = 1024
[base.checkpoint]
interval = 10
[[optimizers]]
lr = [3e-3, 1e-2]
config = { name = "adamw" }
[axes]
batch_size = [2, 4, 8]
[targets]
loss = [3.0]
[report]
b0 = 2
EOF
}

wait_job() { # $1: job id
    for _ in $(seq 900); do
        [ -z "$(squeue -h -j "$1" 2>/dev/null)" ] && return 0
        sleep 1
    done
    fail "job $1 did not finish in 15 minutes"
}

check_once() { # $1: sweep directory, $2: "strict" if no run may start from scratch twice
    local dir="$1" planned finished
    (cd "$dir" && "$BIN" report sweep.toml >/dev/null) || fail "sweep report failed in $dir"
    planned=$(python3 -c "import json;print(json.load(open('$dir/report/report.json'))['runs']['planned'])")
    finished=$(python3 -c "import json;print(json.load(open('$dir/report/report.json'))['runs']['finished'])")
    [ "$planned" = "$finished" ] || fail "$finished of $planned runs finished in $dir"
    # Each run id: one 'done' line over all task logs, and no run both started fresh twice.
    local dupes
    dupes=$(cat "$dir"/runs/slurm/*.out | grep -E ': done in ' | awk '{print $2}' | sort | uniq -d)
    [ -z "$dupes" ] || fail "runs trained to completion twice: $dupes"
    local done_count
    done_count=$(cat "$dir"/runs/slurm/*.out | grep -cE ': done in ' || true)
    [ "$done_count" = "$planned" ] || fail "$done_count completions logged for $planned runs"
    if [ "${2:-}" = strict ]; then
        dupes=$(cat "$dir"/runs/slurm/*.out | grep -E ': starting$' | awk '{print $2}' | sort | uniq -d)
        [ -z "$dupes" ] || fail "runs started twice: $dupes"
    fi
    log "$dir: $finished/$planned runs finished, each completed once"
}

# 1. A plain submission.
A="$WORK/plain"
write_sweep "$A"
(cd "$A" && "$BIN" slurm sweep.toml --tasks 3 --cpus-per-task 1 --time 00:15:00 --partition e2e --script job.sbatch >/dev/null)
JOB=$(cd "$A" && sbatch --parsable job.sbatch)
log "submitted job array $JOB (3 tasks, 6 runs)"
wait_job "$JOB"
check_once "$A" strict

# 2. Kill one array task while it trains, then resubmit.
B="$WORK/killed"
write_sweep "$B"
(cd "$B" && "$BIN" slurm sweep.toml --tasks 3 --cpus-per-task 1 --time 00:15:00 --partition e2e --script job.sbatch >/dev/null)
JOB=$(cd "$B" && sbatch --parsable job.sbatch)
log "submitted job array $JOB; waiting for task 1 to train"
for _ in $(seq 600); do
    f=$(ls "$B"/runs/slurm/"${JOB}"_1.out 2>/dev/null || true)
    if [ -n "$f" ] && grep -qE ': (starting|resuming)$' "$f" \
        && ls "$B"/runs/*/checkpoints/step-* >/dev/null 2>&1; then
        break
    fi
    sleep 0.5
done
scancel --signal=KILL "${JOB}_1"
log "killed task ${JOB}_1 mid-run"
wait_job "$JOB"
unfinished=$(cd "$B" && "$BIN" plan sweep.toml | head -1)
log "after the kill: $unfinished"
JOB2=$(cd "$B" && sbatch --parsable job.sbatch)
log "resubmitted as $JOB2"
wait_job "$JOB2"
grep -qE ': resuming$' "$B"/runs/slurm/"${JOB2}"_*.out || log "note: the killed run had no checkpoint yet and restarted"
check_once "$B"
# The killed-and-resumed sweep reports exactly what the plain one does (timing aside).
python3 - "$A/report/report.json" "$B/report/report.json" <<'PY' || fail "the killed sweep's report differs from the plain one's"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
for r in (a, b):
    r.pop("timing", None)
sys.exit(0 if a == b else 1)
PY
log "reports of the plain and the killed sweep are identical"
log "PASS in $(($(date +%s) - START))s"
