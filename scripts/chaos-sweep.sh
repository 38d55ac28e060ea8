#!/usr/bin/env bash
# Chaos test of the sweep runner: kill -9 of workers at random moments, then the result must be
# exactly that of an uninterrupted sweep.
#
#   scripts/chaos-sweep.sh [--trials N] [--kills K] [--seed S] [--config FILE] [--keep]
#
# The sweep is experiments/configs/chaos.toml (12 short runs of the `test` decoder). The script
# first runs it uninterrupted with two workers (the reference). Each trial then starts the sweep
# afresh with two workers and, K times (default 20), waits a random moment, kills one of the two
# workers picked at random with SIGKILL (no destructor, no flush, no lock release) and restarts
# it at once; after the last kill both workers run to the end. Even trials run the two workers
# of `sweep run --jobs 2` (`--shard 0/2` and `--shard 1/2`); odd trials run two workers over the
# whole sweep, which meet through the run locks. A trial is identical when
#
# - `report.json` equals the reference's (without its wall-clock `timing` object),
# - every run directory holds exactly one complete run: `summary.json`, no `failed.json`, the
#   reference's metrics lines (without `elapsed`) with no line missing or doubled, exactly one
#   checkpoint (complete, at the last step), no temporary files left,
# - no run is left unfinished, no worker reported an error, and every run lock is released
#   except the last one a killed worker took (SIGKILL leaves it behind, stale).
#
# The kill moments come from --seed (default 1), so a seed replays the same schedule of delays
# and victims (what the workers are doing at each moment still depends on the machine's speed).
# It prints one line per trial and `N/T trials identical`; the exit status is 0 only when every
# trial is identical.
set -euo pipefail

trials=20
kills=20
seed=1
config=experiments/configs/chaos.toml
keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        --trials) trials="$2"; shift 2 ;;
        --kills) kills="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        --config) config="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --quiet --bin sweep
bin="$root/target/release/sweep"
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
work=$(mktemp -d "${TMPDIR:-/tmp}/chaos-sweep.XXXXXX")
cleanup() {
    for p in $(jobs -p); do kill -9 "$p" 2>/dev/null || true; done
    if [ "$keep" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# A small deterministic generator (xorshift64 on bash integers): `next` sets $r in [0, 2^31).
state=$(( (seed * 2654435761 + 88172645463325252) & 0x7fffffffffffffff ))
[ "$state" -eq 0 ] && state=1
next() {
    state=$(( state ^ ((state << 13) & 0x7fffffffffffffff) ))
    state=$(( state ^ (state >> 7) ))
    state=$(( state ^ ((state << 17) & 0x7fffffffffffffff) ))
    r=$(( (state >> 20) & 0x7fffffff ))
}

now_ms() { date +%s%3N; }
# Whether process $1 runs (a worker that exited but is not waited for yet is a zombie: not alive).
alive() { [ -r "/proc/$1/stat" ] && ! grep -q '^[0-9]* (.*) Z' "/proc/$1/stat" 2>/dev/null; }

echo "chaos sweep: $(basename "$config"), $trials trials, $kills kills each, seed $seed"
echo "machine: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$([ -z "$(git status --porcelain 2>/dev/null)" ] || echo ' (uncommitted changes)')"

# The reference: uninterrupted, the two workers of --jobs 2.
t0=$(now_ms)
"$bin" run "$config" --runs "$work/ref/runs" --jobs 2 --quiet
"$bin" report "$config" --runs "$work/ref/runs" --out "$work/ref/report" >/dev/null
ref_ms=$(( $(now_ms) - t0 ))
echo "reference: uninterrupted sweep in $(( ref_ms / 1000 )).$(( ref_ms % 1000 / 100 ))s"

# Compares a trial with the reference; prints what differs, exits 1 if anything does.
check() {
    python3 - "$work/ref" "$1" <<'PY'
import json, os, re, sys
ref, got = sys.argv[1], sys.argv[2]
bad = []

def report(d):
    with open(os.path.join(d, "report", "report.json")) as f:
        v = json.load(f)
    v.pop("timing", None)
    return v

def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        out = []
        for line in f:
            v = json.loads(line)
            v.pop("elapsed", None)
            out.append(v)
        return out

if report(ref) != report(got):
    bad.append("report.json differs")
rr, gr = os.path.join(ref, "runs"), os.path.join(got, "runs")
ref_runs = sorted(e for e in os.listdir(rr) if os.path.isdir(os.path.join(rr, e)))
got_runs = sorted(e for e in os.listdir(gr) if os.path.isdir(os.path.join(gr, e)))
if ref_runs != got_runs:
    bad.append(f"run directories {got_runs} != {ref_runs}")
for run in got_runs:
    d = os.path.join(gr, run)
    if not os.path.isfile(os.path.join(d, "summary.json")):
        bad.append(f"{run}: no summary.json")
        continue
    if os.path.exists(os.path.join(d, "failed.json")):
        bad.append(f"{run}: failed.json")
    m = metrics(d)
    steps = [l["step"] for l in m]
    if len(set(steps)) != len(steps):
        bad.append(f"{run}: metrics lines doubled")
    if run in ref_runs and m != metrics(os.path.join(rr, run)):
        bad.append(f"{run}: metrics differ from the reference")
    ck = os.path.join(d, "checkpoints")
    cks = sorted(os.listdir(ck)) if os.path.isdir(ck) else []
    last = f"step-{steps[-1]:010}" if steps else None
    if cks != [last] or not os.path.isfile(os.path.join(ck, cks[0], "manifest.json")):
        bad.append(f"{run}: checkpoints {cks}, expected one complete {last}")
    for base, _, files in os.walk(d):
        for f in files:
            if re.search(r"\.tmp\.", f):
                bad.append(f"{run}: temporary file {os.path.relpath(os.path.join(base, f), d)} left")
debris = [f for f in os.listdir(gr) if re.search(r"\.(tmp|rel)\.", f)]
if debris:
    bad.append(f"temporary lock files left in the runs directory: {debris[:3]}")
killed = set()
if os.path.exists(os.path.join(got, "killed.txt")):
    with open(os.path.join(got, "killed.txt")) as fh:
        killed = {int(l) for l in fh if l.strip()}
for f in os.listdir(gr):
    m = re.match(r"(.+)\.lock\.(\d+)$", f)
    if not m:
        continue
    # The lock of a run is its highest generation. A worker that exits releases its locks
    # (generation 0 removed, a higher one marked released); only a killed worker's record may
    # stay unreleased, as a stale lock (its run is finished, or resumed under the next one).
    if os.path.exists(os.path.join(gr, f"{m.group(1)}.lock.{int(m.group(2)) + 1}")):
        continue
    with open(os.path.join(gr, f)) as fh:
        rec = json.loads(fh.read())
    if not rec.get("released", False) and rec["pid"] not in killed:
        bad.append(f"lock {f} held by pid {rec['pid']}, which was not killed")
if bad:
    print("; ".join(bad[:6]) + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else ""))
    sys.exit(1)
PY
}

identical=0
total_kills=0
for ((trial = 0; trial < trials; trial++)); do
    dir="$work/t$trial"
    mkdir -p "$dir"
    if (( trial % 2 == 0 )); then
        layout="shards"
        wargs=("--shard 0/2" "--shard 1/2")
    else
        layout="shared"
        wargs=("" "")
    fi
    pids=(0 0)
    log="$dir/workers.log"
    start() {
        # shellcheck disable=SC2086
        "$bin" run "$config" --runs "$dir/runs" --quiet ${wargs[$1]} >>"$log" 2>&1 &
        pids[$1]=$!
    }
    t0=$(now_ms)
    start 0
    start 1
    done_kills=0
    for ((k = 0; k < kills; k++)); do
        # A random delay with mean ref_ms/(2·kills): the kills spread over about half of an
        # uninterrupted sweep's time, which the restarts stretch, so that all of them land
        # before the workers finish even when the machine is faster than for the reference.
        next
        delay_ms=$(( r % (ref_ms / kills + 1) ))
        sleep "$(( delay_ms / 1000 )).$(printf '%03d' $(( delay_ms % 1000 )))"
        next
        w=$(( r % 2 ))
        if ! alive "${pids[$w]}"; then
            w=$(( 1 - w ))
        fi
        if ! alive "${pids[$w]}"; then
            break # both workers finished: nothing left to kill
        fi
        kill -9 "${pids[$w]}" 2>/dev/null || true
        echo "${pids[$w]}" >>"$dir/killed.txt"
        wait "${pids[$w]}" 2>/dev/null || true
        done_kills=$(( done_kills + 1 ))
        start "$w"
    done
    status=0
    wait "${pids[0]}" || status=$?
    wait "${pids[1]}" || status=$?
    total_kills=$(( total_kills + done_kills ))
    secs=$(( ($(now_ms) - t0) / 1000 ))
    errs=$(grep -c "error" "$log" || true)
    unfinished=$("$bin" plan "$config" --runs "$dir/runs" --json | python3 -c \
        'import json,sys; print(sum(r["state"] != "finished" for r in json.load(sys.stdin)))')
    result="identical"
    why=""
    if ! "$bin" report "$config" --runs "$dir/runs" --out "$dir/report" >/dev/null 2>"$dir/report.err"; then
        result="DIFFERENT"
        why="report failed: $(head -c 300 "$dir/report.err")"
    elif ! why=$(check "$dir"); then
        result="DIFFERENT"
    fi
    if [ "$status" != 0 ] || [ "$errs" != 0 ] || [ "$unfinished" != 0 ]; then
        result="DIFFERENT"
        why="$why workers exit status $status, $errs error lines, $unfinished runs unfinished: $(grep -m2 error "$log" | tr '\n' ' ')"
    fi
    [ "$result" = identical ] && identical=$(( identical + 1 ))
    printf 'trial %2d (%s): %2d kills, %3ds: %s%s\n' "$trial" "$layout" "$done_kills" "$secs" \
        "$result" "${why:+: $why}"
    if [ "$result" = identical ] && [ "$keep" = 0 ]; then rm -rf "$dir"; fi
done
echo "$total_kills kills in all"
echo "$identical/$trials trials identical"
[ "$identical" = "$trials" ]
