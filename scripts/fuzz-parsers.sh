#!/usr/bin/env bash
# Long run of the parser fuzz targets (tests/fuzz_parsers.rs): every loader a user can hand a
# file to, each for a time budget, with fresh seeds round after round.
#
#   scripts/fuzz-parsers.sh                 # 11 minutes in all (66 s for each of 10 targets)
#   FUZZ_TOTAL_SECONDS=3600 scripts/fuzz-parsers.sh
#   FUZZ_SEED=0x1234 scripts/fuzz-parsers.sh    # another base seed (default: fixed)
#   FUZZ_OUT=path.txt scripts/fuzz-parsers.sh   # where the record goes
#                                               # (default results/reliability/fuzz-parsers.txt)
#
# Targets run one after another (one test thread), so the time is the fuzzing time of each.
# A failure prints the target, the round's seed and the shrunk input, and the script exits
# non-zero; an abort (an allocation above the test binary's 1 GiB cap) ends it the same way.
set -euo pipefail
export RUST_BACKTRACE=0

cd "$(dirname "$0")/.."
total=${FUZZ_TOTAL_SECONDS:-660}
out=${FUZZ_OUT:-results/reliability/fuzz-parsers.txt}

cargo test --test fuzz_parsers --no-run 2>&1 | tail -n 1
targets=$(cargo test --test fuzz_parsers -- --list 2>/dev/null | grep -c '^fuzz_.*: test$')
per=$(( (total + targets - 1) / targets ))

export OPTLAB_FUZZ_SECONDS=$per
export OPTLAB_FUZZ_CASES=${FUZZ_CASES:-32}
if [ -n "${FUZZ_SEED:-}" ]; then export OPTLAB_FUZZ_SEED=$FUZZ_SEED; fi

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
start=$(date +%s)
{
    echo "# scripts/fuzz-parsers.sh"
    echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src tests || echo ' (with uncommitted changes)')"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))"
    echo "budget: ${total} s in all, ${per} s for each of ${targets} targets, ${OPTLAB_FUZZ_CASES} cases per round, base seed ${OPTLAB_FUZZ_SEED:-default}"
    echo
} | tee "$tmp"

status=0
cargo test --test fuzz_parsers -- --test-threads 1 --nocapture 2>&1 \
    | grep --line-buffered -E '^(test |fuzz |minimal failing|test result|memory allocation|thread .* panicked)|^    ' \
    | sed -u -e 's/^test \(fuzz_[a-z_]*\) \.\.\. /test \1 ... \n/' \
    | tee -a "$tmp" || status=$?
if ! grep -q '^test result: ok' "$tmp"; then status=1; fi
end=$(date +%s)
{
    echo
    echo "wall time: $(( end - start )) s"
    if [ "$status" -eq 0 ]; then
        echo "result: no panic, no abort, no failed property"
    else
        echo "result: FAILED (see above)"
    fi
} | tee -a "$tmp"
mkdir -p "$(dirname "$out")"
cp "$tmp" "$out"
exit "$status"
