#!/usr/bin/env bash
# CI for the `cuda` feature on a machine without a GPU: sets up nvcc 13.0 from PyPI and stub CUDA
# libraries (scripts/cuda-env.sh), lints the CUDA code, builds and links every test binary with
# `--features cuda`, and runs the suite against the stubs: the GPU tests print
# "SKIP: <test>: no CUDA device" and pass, everything else runs as in the CPU build. Then it
# checks that OPTLAB_REQUIRE_GPU=1 turns such a skip into a failure (scripts/gpu-check.sh relies
# on it) and the GPU check's report logic. Last, the kernels run in host emulation against their
# CPU twins (tests/kernel_emulation.rs).
#
#   scripts/ci-cuda.sh              # all steps
#   OPTLAB_CUDA_CLIPPY=0 scripts/ci-cuda.sh   # skip clippy (it builds candle's CUDA kernels a
#                                             # second time when cold, ~6 min on 2 cores)
#
# Needs: a Rust toolchain, python3 with venv, a C compiler, network access to PyPI and
# crates.io. Honours CARGO_TARGET_DIR (the CUDA build's artifacts coexist with the CPU build's).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
t0=$(date +%s)
step() { # name, command...
  local name=$1 s
  shift
  s=$(date +%s)
  echo "== ci-cuda: $name"
  "$@"
  echo "== ci-cuda: $name took $(($(date +%s) - s)) s"
}

echo "== ci-cuda: environment (nvcc 13.0 from PyPI, stub libraries)"
eval "$(scripts/cuda-env.sh)"
nvcc --version | tail -1
echo "== ci-cuda: environment took $(($(date +%s) - t0)) s"
if [ "${OPTLAB_CUDA_CLIPPY:-1}" != 0 ]; then
  step "clippy --features cuda" cargo clippy --features cuda --all-targets -- -D warnings
fi
step "build and link tests (--features cuda)" cargo test --features cuda --no-run
step "run tests against the stubs (GPU tests skip)" cargo test --features cuda

# On the GPU machine a missing driver or library would make every GPU test skip and pass; the
# GPU check sets OPTLAB_REQUIRE_GPU=1 so that they fail instead. Prove the switch: against the
# stubs, one GPU test must FAIL with it, for the stated reason.
require_gpu_fails() {
  local out
  if out=$(OPTLAB_REQUIRE_GPU=1 RUST_BACKTRACE=0 cargo test --features cuda --test cuda_twins     adamw_matches_cpu -- --exact 2>&1); then
    echo "$out" | tail -5
    echo "ci-cuda: adamw_matches_cpu passed with OPTLAB_REQUIRE_GPU=1 and no GPU" >&2
    return 1
  fi
  if ! grep -q "OPTLAB_REQUIRE_GPU=1 but there is no CUDA device" <<<"$out"; then
    echo "$out" | tail -20
    echo "ci-cuda: adamw_matches_cpu failed, but not for the missing GPU" >&2
    return 1
  fi
  echo "ci-cuda: with OPTLAB_REQUIRE_GPU=1 the GPU test fails without a GPU, as it must"
}
step "OPTLAB_REQUIRE_GPU=1 fails a GPU test without a GPU" require_gpu_fails
# The GPU check's own logic that can run here (its release build and rehearsal are too slow
# for CI: scripts/gpu-check.sh --build, then --rehearse).
gpu_check_logic() {
  bash -n scripts/gpu-check.sh
  python3 scripts/gpu_report.py self-test
}
step "GPU check logic (syntax, report self-test)" gpu_check_logic
# The kernels compiled as host C++ and run block by block, thread by thread, against their
# CPU twins (bit for bit): the only execution of the kernel code without a GPU. Needs only a
# C++17 compiler, not the cuda feature.
OPTLAB_EMULATE_KERNELS=1 step "kernels emulated on the host vs their CPU twins" \
  cargo test --test kernel_emulation
echo "== ci-cuda: done in $(($(date +%s) - t0)) s"
