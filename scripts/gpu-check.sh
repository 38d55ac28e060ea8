#!/usr/bin/env bash
# The GPU check of the `cuda` feature, in three modes:
#
#   scripts/gpu-check.sh --build      on the build machine (Rust, no GPU): builds with
#                                     --features cuda in release the `cuda_twins` test binary and
#                                     the `train` and `sweep` binaries (nvcc 13.0 from
#                                     scripts/cuda-env.sh), strips them and packs them with the
#                                     commit and the nvcc version into ONE archive,
#                                     .cuda/gpu-check/bundle.tar.xz (git-ignored; carry that file
#                                     to the GPU machine). Fails if it exceeds 64 MiB.
#   scripts/gpu-check.sh              on the GPU machine (CUDA 13 driver and libraries, PyTorch,
#                                     no Rust), from the repository root: unpacks the bundle,
#                                     finds the CUDA libraries and runs, each step under its own
#                                     `timeout` and all within OPTLAB_GPU_CHECK_BUDGET seconds
#                                     (default 440: with the kill grace of the last step and
#                                     the report, the whole check stays under 8 minutes):
#                                       1. every kernel and solver against its CPU twin, then
#                                          the golden files on the GPU (cuda_twins with
#                                          OPTLAB_REQUIRE_GPU=1: a test that finds no device fails);
#                                       2. `train` on cuda for d256-l3, 20 steps, its losses
#                                          against the same binary's CPU run (same seed) and its
#                                          tokens/s;
#                                       3. a small sweep on the GPU with its report
#                                          (experiments/configs/gpu-smoke.toml);
#                                       4. the timing table: cuda_twins' gpu_timing_* tests beside
#                                          PyTorch on the same GPU (scripts/gpu_baselines.py,
#                                          benches/torch_baseline.py --device cuda).
#                                     Writes ONE report, results/gpu/gpu-check-<UTC time>.md, even
#                                     when a step fails, and copies it (and the sweep's report) to
#                                     $OUT when set. Exits non-zero if a step failed or timed out.
#   scripts/gpu-check.sh --rehearse   here, without a GPU: unpacks the bundle into a temporary
#                                     directory, checks its size, finds the (stub) libraries
#                                     with the same search, starts every binary against the stub
#                                     libraries of scripts/cuda-env.sh, proves that
#                                     OPTLAB_REQUIRE_GPU=1 turns a skipped GPU test into a
#                                     failure in the release binary, and runs the whole check
#                                     with every GPU step reported as SKIP
#                                     (OPTLAB_GPU_CHECK_SKIP_GPU=1), so the report is produced.
#
# On the GPU machine the binaries need libcuda.so.1 (the driver) and the CUDA 13 runtime
# libraries libcudart.so.13, libcublas.so.13 (+ libcublasLt.so.13), libcurand.so.10 and
# libcusolver.so.12 (+ libcusparse.so.12 and what it loads, e.g. libnvJitLink.so.13). Those not
# found by the loader are searched for under /usr/local/cuda*, /usr/lib*, /opt, /usr/local/lib*,
# the Python site-packages' nvidia/* wheels (PyTorch's cu130 libraries), /root and /home, and
# added to LD_LIBRARY_PATH. The stub libraries of scripts/cuda-env.sh are never used there: they
# would hide the real driver.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
dir=.cuda/gpu-check
bundle=$dir/bundle.tar.xz
limit_bytes=$((64 * 1024 * 1024))
bins="cuda_twins train sweep"
say() { echo "gpu-check: $*" >&2; }
die() {
  say "$*"
  status=1
  exit 1
}

# ---------------------------------------------------------------------------------------------
# --build
# ---------------------------------------------------------------------------------------------
build() {
  set -e
  eval "$(scripts/cuda-env.sh)"
  local stage=$dir/stage
  rm -rf "$stage"
  mkdir -p "$stage"
  # The test binary's path has a hash in it: take it from cargo's own report.
  local exe
  exe=$(cargo test --release --features cuda --test cuda_twins --no-run --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_twins":
        print(m["executable"])')
  [ -n "$exe" ] || die "no cuda_twins executable built"
  cargo build --release --features cuda --bin train --bin sweep
  local target=${CARGO_TARGET_DIR:-target}
  cp "$exe" "$stage/cuda_twins"
  cp "$target/release/train" "$target/release/sweep" "$stage/"
  for b in $bins; do strip "$stage/$b"; done
  local commit
  commit=$(git rev-parse HEAD)
  [ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit+uncommitted changes"
  echo "$commit" >"$stage/commit"
  nvcc --version | tail -1 >"$stage/nvcc"
  (cd "$stage" && ls -l $bins && sha256sum $bins) >"$stage/manifest"
  rm -f "$bundle"
  # xz -9: the binaries are mostly candle's embedded PTX (text), which xz packs about 6:1.
  tar -C "$stage" -cf - $bins commit nvcc manifest | xz -9 -T0 >"$bundle.tmp"
  mv "$bundle.tmp" "$bundle"
  local size
  size=$(stat -c %s "$bundle")
  du -b "$stage"/* | sed 's/^/  /' >&2
  say "$bundle: $size bytes ($((size / 1024 / 1024)) MiB; limit 64 MiB) from commit $commit, $(cat "$stage/nvcc")"
  rm -rf "$stage"
  if [ "$size" -gt "$limit_bytes" ]; then
    die "the bundle exceeds 64 MiB"
  fi
  say "carry $bundle to the GPU machine and run scripts/gpu-check.sh there"
}

# ---------------------------------------------------------------------------------------------
# The check (and its rehearsal)
# ---------------------------------------------------------------------------------------------
rehearsal=0
skip_gpu=${OPTLAB_GPU_CHECK_SKIP_GPU:-0}
# The Python with PyTorch (the report itself needs only the standard library).
python=${OPTLAB_GPU_CHECK_PYTHON:-python3}
work= bindir= deadline= report= stamp= status=0 rc=0 secs=0

record() { # name status seconds detail
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//|/\\|}" >>"$work/steps.tsv"
  say "$1: $2 ($3 s) $4"
  case $2 in FAIL | TIMEOUT) status=1 ;; esac
}

# run_step NAME LIMIT COMMAND...: runs COMMAND with `timeout`, no longer than what is left of
# the budget, output to $work/NAME.log; sets rc and secs. rc 124/137: timed out.
run_step() {
  local name=$1 lim=$2
  shift 2
  local left=$((deadline - $(date +%s)))
  if [ "$left" -lt 15 ]; then
    rc=124 secs=0
    echo "not started: the check's time budget is spent" >"$work/$name.log"
    return
  fi
  [ "$lim" -le "$left" ] || lim=$left
  local s
  s=$(date +%s)
  # RUST_BACKTRACE=0: a failing test prints its message, not pages of frames.
  RUST_BACKTRACE=0 timeout -k 10 "$lim" "$@" >"$work/$name.log" 2>&1
  rc=$?
  secs=$(($(date +%s) - s))
}

verdict() { # name detail-when-ok: records PASS/FAIL/TIMEOUT from $rc
  local name=$1 detail=$2
  case $rc in
  0) record "$name" PASS "$secs" "$detail" ;;
  124 | 137) record "$name" TIMEOUT "$secs" "$(tail -n 1 "$work/$name.log" 2>/dev/null)" ;;
  *)
    local why
    why=$(grep -m1 -E 'panicked|error|FAIL|failed' "$work/$name.log" || tail -n 1 "$work/$name.log")
    record "$name" FAIL "$secs" "exit $rc: $(cut -c1-300 <<<"$why")"
    ;;
  esac
}

gpu_skipped() { # name: true (and records SKIP) when GPU steps are skipped
  if [ "$skip_gpu" = 1 ]; then
    record "$1" SKIP 0 "no GPU (rehearsal): not run"
    return 0
  fi
  return 1
}

unpack() { # into $bindir
  mkdir -p "$bindir"
  if command -v xz >/dev/null && tar --version >/dev/null 2>&1; then
    tar -C "$bindir" -xJf "$bundle"
  else
    # No xz binary: Python's tarfile reads xz through its lzma module.
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' \
      "$bundle" "$bindir"
  fi
}

# Directories to search for missing libraries, most specific first.
lib_roots() {
  if [ -n "${OPTLAB_GPU_CHECK_LIB_ROOTS:-}" ]; then
    tr ':' '\n' <<<"$OPTLAB_GPU_CHECK_LIB_ROOTS"
    return
  fi
  ls -d /usr/local/cuda* 2>/dev/null
  python3 - <<'EOF' 2>/dev/null
import site, sys, glob
dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
for d in dirs:
    for n in sorted(glob.glob(d + "/nvidia")):
        print(n)
EOF
  ls -d /usr/lib* /opt /usr/local/lib* /root /home 2>/dev/null
}

missing_libs() {
  for b in $bins; do ldd "$bindir/$b" 2>/dev/null | awk '/not found/ { print $1 }'; done | sort -u
}

# Adds to LD_LIBRARY_PATH the directory of each library the binaries miss: root by root, most
# specific first, one `find` per root for all missing names, at most 60 s in all (a large /home
# must not eat the check's time).
find_libs() {
  local roots added="" t0
  t0=$(date +%s)
  mapfile -t roots < <(lib_roots)
  for root in "${roots[@]}"; do
    local miss
    mapfile -t miss < <(missing_libs)
    [ "${#miss[@]}" -gt 0 ] || break
    local left=$((t0 + 60 - $(date +%s)))
    [ "$left" -gt 0 ] || break
    local expr=() m
    for m in "${miss[@]}"; do expr+=(-o -name "$m"); done
    while IFS= read -r found; do
      local d
      d=$(dirname "$found")
      case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *)
        # Only while its library is still missing: the first root that has it wins.
        if missing_libs | grep -qxF "$(basename "$found")"; then
          export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
          added="$added $d"
        fi
        ;;
      esac
    done < <(timeout "$left" find "$root" \( -false "${expr[@]}" \) \( -type f -o -type l \) 2>/dev/null)
  done
  added=${added# }
  echo "libraries=${added:-(all found by the loader)}" >>"$work/env.txt"
}

write_env() {
  local commit nvcc device driver cuda
  commit=$(cat "$bindir/commit" 2>/dev/null || echo unknown)
  local head
  head=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  [ "${commit%%+*}" = "$head" ] || commit="$commit (working tree at $head)"
  nvcc=$(cat "$bindir/nvcc" 2>/dev/null || echo 'unknown nvcc')
  if command -v nvidia-smi >/dev/null; then
    device=$(nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader 2>/dev/null | head -1)
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
    cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)
  fi
  {
    echo "stamp=$stamp"
    echo "date=$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit=$commit"
    echo "nvcc=$nvcc"
    echo "device=${device:-no nvidia-smi}"
    echo "driver=${driver:-unknown}"
    echo "cuda=${cuda:-unknown}"
    echo "host=$(hostname 2>/dev/null || echo '?'), $(nproc) cores"
    echo "torch=$("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'not importable')"
    echo "rehearsal=$rehearsal"
  } >>"$work/env.txt"
}

# Every binary starts and finds its libraries (the loader resolves them before main).
check_binaries() {
  local s bad=""
  s=$(date +%s)
  for b in train sweep; do
    "$bindir/$b" --help >"$work/start-$b.txt" 2>&1 || bad="$bad $b"
  done
  "$bindir/cuda_twins" --list >"$work/start-cuda_twins.txt" 2>&1 || bad="$bad cuda_twins"
  local tests
  tests=$(grep -c ': test$' "$work/start-cuda_twins.txt")
  if [ -z "$bad" ] && [ "$tests" -gt 0 ]; then
    record binaries PASS $(($(date +%s) - s)) "train, sweep --help; cuda_twins --list: $tests tests"
  else
    record binaries FAIL $(($(date +%s) - s)) "did not start:$bad ($(cat "$work"/start-*.txt | grep -m1 -iE 'error|not found'))"
  fi
}

# Rehearsal only: against the stubs, a GPU test skips (and passes) without the switch and fails
# with OPTLAB_REQUIRE_GPU=1, in the release binary that the GPU machine will run.
check_require_switch() {
  local s
  s=$(date +%s)
  # --nocapture: libtest hides a passing test's output, SKIP line included.
  "$bindir/cuda_twins" adamw_matches_cpu --exact --nocapture >"$work/switch-off.txt" 2>&1
  local off=$?
  OPTLAB_REQUIRE_GPU=1 RUST_BACKTRACE=0 "$bindir/cuda_twins" adamw_matches_cpu --exact \
    >"$work/switch-on.txt" 2>&1
  local on=$?
  if [ $off = 0 ] && grep -q 'SKIP: adamw_matches_cpu: no CUDA device' "$work/switch-off.txt" &&
    [ $on != 0 ] && grep -q 'OPTLAB_REQUIRE_GPU=1 but there is no CUDA device' "$work/switch-on.txt"; then
    record require-gpu-switch PASS $(($(date +%s) - s)) "without it: SKIP and pass; OPTLAB_REQUIRE_GPU=1: fails"
  else
    record require-gpu-switch FAIL $(($(date +%s) - s)) "exit $off without, $on with OPTLAB_REQUIRE_GPU=1"
  fi
}

test_summary() { # log: "N passed; M failed" of libtest
  grep -E '^test result:' "$1" | tail -1 | sed 's/^test result: //; s/; finished in.*//'
}

check() {
  local start
  start=$(date +%s)
  deadline=$((start + ${OPTLAB_GPU_CHECK_BUDGET:-440}))
  stamp=$(date -u +%Y%m%dT%H%M%SZ)
  work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
  bindir=$work/bin
  : >"$work/steps.tsv"
  mkdir -p results/gpu
  report=results/gpu/gpu-check-$stamp.md
  [ "$rehearsal" = 0 ] || report=$work/gpu-check-$stamp.md
  # The report is written however the check ends (failure, timeout, interrupt).
  trap 'finish' EXIT
  finish() {
    trap - EXIT
    python3 scripts/gpu_report.py report "$work" "$report" || true
    if [ -n "${OUT:-}" ] && [ "$rehearsal" = 0 ]; then
      mkdir -p "$OUT/results/gpu"
      cp "$report" "$OUT/results/gpu/" 2>/dev/null
      [ ! -d "$work/sweep-report" ] || cp -r "$work/sweep-report" "$OUT/results/gpu/gpu-smoke-$stamp"
    fi
    say "report: $report (status $status)"
    if [ "$rehearsal" = 1 ]; then
      echo "----- $report"
      cat "$report"
    fi
    exit $status
  }

  [ -f "$bundle" ] || die "$bundle missing; run scripts/gpu-check.sh --build first (and carry it)"
  local size
  size=$(stat -c %s "$bundle")
  local s
  s=$(date +%s)
  if [ "$size" -gt "$limit_bytes" ]; then
    record bundle FAIL 0 "$size bytes exceed 64 MiB"
  elif unpack >"$work/unpack.txt" 2>&1; then
    record bundle PASS $(($(date +%s) - s)) "$size bytes ($((size / 1024 / 1024)) MiB), unpacked: $(cd "$bindir" && ls | tr '\n' ' ')"
  else
    record bundle FAIL $(($(date +%s) - s)) "could not unpack: $(head -c 300 "$work/unpack.txt")"
    return
  fi

  if [ "$rehearsal" = 0 ]; then
    case "${LD_LIBRARY_PATH:-}" in
    *.cuda/stubs*) die "LD_LIBRARY_PATH holds the stub libraries; unset it" ;;
    esac
  fi
  s=$(date +%s)
  find_libs
  local miss
  miss=$(missing_libs | tr '\n' ' ')
  if [ -z "$miss" ]; then
    record libraries PASS $(($(date +%s) - s)) "$(grep '^libraries=' "$work/env.txt" | cut -d= -f2-)"
  else
    record libraries FAIL $(($(date +%s) - s)) "not found: $miss"
  fi
  write_env
  check_binaries
  [ "$rehearsal" = 0 ] || check_require_switch
  s=$(date +%s)
  if python3 scripts/gpu_report.py self-test >"$work/report-self-test.txt" 2>&1; then
    record report-logic PASS $(($(date +%s) - s)) "scripts/gpu_report.py self-test"
  else
    record report-logic FAIL $(($(date +%s) - s)) "$(tail -1 "$work/report-self-test.txt")"
  fi

  # From here on a GPU test that finds no device fails instead of skipping (the rehearsal has
  # proved the switch above and skips the GPU steps itself).
  [ "$rehearsal" = 1 ] || export OPTLAB_REQUIRE_GPU=1
  # TF32 off for every library that honours NVIDIA's switch (cuBLAS, cuDNN), besides candle's
  # own setting (off by default; the tests set it explicitly).
  export NVIDIA_TF32_OVERRIDE=0
  local twins=$bindir/cuda_twins train=$bindir/train
  local cfg=experiments/configs/d256-l3.toml
  # 20 steps, every loss logged; one short evaluation at the end (it is not compared).
  local train_args=(--set train.steps=20 --set train.log_interval=1 --set eval.tokens=8192
    --set checkpoint.interval=1000 --quiet)

  # 2a. The CPU reference run starts first, in the background: it needs only the cores, and
  # the GPU steps before the timings do not measure time.
  local cpu_pid=""
  if [ "$skip_gpu" = 1 ]; then
    record train_cpu SKIP 0 "no GPU (rehearsal): the reference run belongs to the GPU step"
  else
    local cpu_lim=$((deadline - $(date +%s) - 60))
    [ "$cpu_lim" -le 240 ] || cpu_lim=240
    (
      s=$(date +%s)
      timeout -k 10 "$cpu_lim" "$train" "$cfg" --set device=cpu "${train_args[@]}" \
        --out "$work/runs/cpu" >"$work/train_cpu.log" 2>&1
      echo "$? $(($(date +%s) - s))" >"$work/train_cpu.rc"
    ) &
    cpu_pid=$!
  fi

  # 1. Kernels and solvers against their CPU twins; then the golden files on the GPU.
  if ! gpu_skipped twins; then
    run_step twins 180 "$twins" --test-threads=1 \
      --skip golden_trajectories_pass_on_the_gpu_in_f32
    verdict twins "$(test_summary "$work/twins.log")"
  fi
  if ! gpu_skipped golden; then
    run_step golden 90 "$twins" --exact \
      golden_trajectories_pass_on_the_gpu_in_f32 --nocapture
    verdict golden "$(grep -c '^PASS ' "$work/golden.log") golden files pass within the GPU bound"
  fi

  # 2b. The same config on the GPU, after the CPU run (so that its tokens/s is not measured
  # against a busy host), then the comparison.
  if [ -n "$cpu_pid" ]; then
    wait "$cpu_pid"
    read -r crc csecs <"$work/train_cpu.rc" || crc=1
    rc=$crc secs=${csecs:-0}
    verdict train_cpu "$(tail -n 1 "$work/train_cpu.log" | cut -c1-200)"
  fi
  if ! gpu_skipped train_gpu; then
    run_step train_gpu 90 "$train" "$cfg" --set device=cuda "${train_args[@]}" --out "$work/runs/gpu"
    verdict train_gpu "$(tail -n 1 "$work/train_gpu.log" | cut -c1-200)"
    s=$(date +%s)
    if [ -f "$work/runs/cpu/metrics.jsonl" ] && [ -f "$work/runs/gpu/metrics.jsonl" ]; then
      python3 scripts/gpu_report.py losses "$work/runs/cpu" "$work/runs/gpu" --steps 20 \
        --json "$work/losses.json" >"$work/losses.txt" 2>&1
      rc=$? secs=$(($(date +%s) - s))
      if [ $rc = 0 ]; then
        record train_losses PASS "$secs" "$(cat "$work/losses.txt")"
      else
        record train_losses FAIL "$secs" "$(tail -1 "$work/losses.txt")"
      fi
    else
      record train_losses FAIL 0 "a run wrote no metrics.jsonl (see train_cpu.log, train_gpu.log)"
    fi
    python3 - "$work" <<'EOF'
import json, os, sys
sys.path.insert(0, "scripts")
import gpu_report
work = sys.argv[1]
out = {}
for side in ("gpu", "cpu"):
    run = os.path.join(work, "runs", side)
    try:
        out[side + "_tokens_per_second"] = gpu_report.steady_tokens_per_second(run)
    except (OSError, ValueError, KeyError):
        pass
    summary = gpu_report.read_json(os.path.join(run, "summary.json"))
    if summary:
        out[side + "_summary_tokens_per_second"] = summary["timing"]["tokens_per_second"]
    # What the run recorded about its device (env.json), as the runner writes it.
    env = gpu_report.read_json(os.path.join(run, "env.json"))
    found = {k: v for k, v in env.items() if any(w in k.lower() for w in ("device", "cuda", "driver", "gpu"))}
    if found:
        out[side + "_env"] = found
with open(os.path.join(work, "train.json"), "w") as f:
    json.dump(out, f, indent=2)
EOF
  else
    record train_losses SKIP 0 "no GPU (rehearsal): not run"
  fi

  # 3. A small sweep placed on GPU 0, with its report. Its plan needs no GPU: it checks the
  # sweep file against the binary (in the rehearsal too).
  run_step sweep_plan 30 "$bindir/sweep" plan experiments/configs/gpu-smoke.toml \
    --runs "$work/runs/gpu-smoke"
  verdict sweep_plan "$(head -n 1 "$work/sweep_plan.log" | cut -c1-200)"
  if ! gpu_skipped sweep; then
    run_step sweep 90 "$bindir/sweep" run experiments/configs/gpu-smoke.toml --devices 0 \
      --runs "$work/runs/gpu-smoke" --report --report-dir "$work/sweep-report"
    [ ! -f "$work/sweep-report/report.md" ] || cp "$work/sweep-report/report.md" "$work/sweep_report.md"
    if [ $rc = 0 ] && [ ! -f "$work/sweep_report.md" ]; then rc=1; fi
    verdict sweep "4 runs, report.md written"
  fi

  # 4. The timing table: optlab's side (machine-readable `TIMING` lines), then PyTorch's.
  if ! gpu_skipped timing_adamw; then
    run_step timing_adamw 60 "$twins" --ignored --exact gpu_timing_table --nocapture
    verdict timing_adamw "$(grep -c '^TIMING' "$work/timing_adamw.log") figures"
  fi
  if ! gpu_skipped torch_baselines; then
    run_step torch_baselines 90 "$python" scripts/gpu_baselines.py --out "$work/torch.json"
    if [ $rc = 0 ] && grep -q '"skipped"' "$work/torch.json" 2>/dev/null; then rc=1; fi
    verdict torch_baselines "copy bandwidth, fused AdamW, qr + matmul and eigh at 1024 and 4096"
  fi
  if ! gpu_skipped torch_train; then
    run_step torch_train 90 "$python" benches/torch_baseline.py --preset d256-l3 --batch 16 \
      --steps 20 --device cuda --json "$work/torch_train.json"
    [ -f "$work/torch_train.json" ] || rc=1
    verdict torch_train "$(tail -n 1 "$work/torch_train.log")"
  fi
  if ! gpu_skipped timing_refresh; then
    run_step timing_refresh 120 "$twins" --ignored --exact gpu_timing_refresh --nocapture
    verdict timing_refresh "$(grep -c '^TIMING' "$work/timing_refresh.log") figures"
  fi
  if ! gpu_skipped timing_soap; then
    run_step timing_soap 120 "$twins" --ignored --exact gpu_timing_soap --nocapture
    verdict timing_soap "$(grep -c '^TIMING' "$work/timing_soap.log") figures"
  fi
  say "done in $(($(date +%s) - start)) s"
}

case "${1:-}" in
--build) build ;;
--rehearse)
  # The stub libraries (and nvcc's environment) of the build machine; the library search is
  # rehearsed on the stub directory, with the loader's path emptied so that it has to find them.
  eval "$(scripts/cuda-env.sh)" || die "scripts/cuda-env.sh failed"
  rehearsal=1 skip_gpu=1
  export OPTLAB_GPU_CHECK_LIB_ROOTS="$OPTLAB_CUDA_STUBS:/usr/local/cuda:/opt"
  unset LD_LIBRARY_PATH
  check
  ;;
"") check ;;
*) die "usage: scripts/gpu-check.sh [--build | --rehearse]" ;;
esac
