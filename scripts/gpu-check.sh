#!/usr/bin/env bash
# GPU check of the `cuda` feature, in two halves:
#
#   scripts/gpu-check.sh --build   on the build machine (Rust, no GPU): builds the release
#                                  `cuda_twins` test binary with --features cuda (nvcc 13.0 from
#                                  scripts/cuda-env.sh) and leaves it, stripped (~42 MB), in
#                                  .cuda/gpu-check/ (git-ignored: carry that folder over).
#   scripts/gpu-check.sh           on the GPU machine (CUDA 13 driver and libraries, no Rust):
#                                  runs that binary: every kernel and solver against its CPU
#                                  twin, the golden files on the GPU, then the timing tables
#                                  (AdamW, SOAP, refresh); writes the log to results/gpu/ (and to
#                                  $OUT when set). Exits non-zero when a check fails.
#
# On the GPU machine the binary needs libcuda.so.1 (the driver) and the CUDA 13 runtime
# libraries libcudart.so.13, libcublas.so.13 (+ libcublasLt.so.13), libcurand.so.10 and
# libcusolver.so.12 (+ libcusparse.so.12 and what it loads, e.g. libnvJitLink.so.13). Those
# not found by the loader are searched for under /usr/local/cuda*, /usr/lib*, /opt and Python
# site-packages (the nvidia-* wheels) and added to LD_LIBRARY_PATH. The stub libraries of
# scripts/cuda-env.sh are never used here: they would hide the real driver.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.cuda/gpu-check
bin=$dir/cuda_twins

if [ "${1:-}" = "--build" ]; then
  eval "$(scripts/cuda-env.sh)"
  exe=$(cargo test --release --features cuda --test cuda_twins --no-run --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_twins":
        print(m["executable"])')
  [ -n "$exe" ] || { echo "gpu-check: no cuda_twins executable built" >&2; exit 1; }
  mkdir -p "$dir"
  cp "$exe" "$bin"
  strip "$bin"
  git rev-parse HEAD >"$dir/commit" 2>/dev/null || true
  nvcc --version | tail -1 >"$dir/nvcc"
  echo "gpu-check: $bin ($(du -h "$bin" | cut -f1)) from $exe"
  echo "gpu-check: carry $dir to the GPU machine and run scripts/gpu-check.sh there"
  exit 0
fi

[ -x "$bin" ] || { echo "gpu-check: $bin missing; run scripts/gpu-check.sh --build first" >&2; exit 1; }
case "${LD_LIBRARY_PATH:-}" in
*.cuda/stubs*) echo "gpu-check: LD_LIBRARY_PATH holds the stub libraries; unset it" >&2; exit 1 ;;
esac

# Make the CUDA 13 runtime libraries findable.
missing() { ldd "$bin" | awk '/not found/ { print $1 }'; }
for lib in $(missing); do
  found=$(find /usr/local/cuda* /usr/lib* /opt /usr/local/lib* /root /home \
    -name "$lib" \( -type f -o -type l \) 2>/dev/null | head -1 || true)
  if [ -n "$found" ]; then
    echo "gpu-check: $lib from $(dirname "$found")"
    export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
done
if [ -n "$(missing)" ]; then
  echo "gpu-check: libraries not found: $(missing | tr '\n' ' ')" >&2
  exit 1
fi

mkdir -p results/gpu
stamp=$(date -u +%Y%m%dT%H%M%SZ)
log=results/gpu/gpu-check-$stamp.md
{
  echo "# GPU check $stamp"
  echo
  echo "- binary built from commit $(cat "$dir/commit" 2>/dev/null || echo unknown) with $(cat "$dir/nvcc" 2>/dev/null || echo 'unknown nvcc')"
  echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi unavailable')"
  echo
} >"$log"

status=0
echo "## Kernels against their CPU twins" >>"$log"
echo '```' >>"$log"
# RUST_BACKTRACE is off so a failure prints its message, not pages of frames.
# --nocapture so that a skipped test's "SKIP: no CUDA device" line reaches the log.
RUST_BACKTRACE=0 timeout 240 "$bin" --test-threads=1 --nocapture 2>&1 | tee -a "$log" || status=1
echo '```' >>"$log"
if grep -q "SKIP: no CUDA device" "$log"; then
  echo "gpu-check: the tests skipped: no CUDA device was usable" | tee -a "$log" >&2
  status=1
fi

echo "## Timings" >>"$log"
RUST_BACKTRACE=0 timeout 200 "$bin" --ignored gpu_timing --nocapture --test-threads=1 2>&1 |
  tee -a "$log" || status=1

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results/gpu"
  cp "$log" "$OUT/results/gpu/"
fi
echo "gpu-check: wrote $log (status $status)"
exit $status
