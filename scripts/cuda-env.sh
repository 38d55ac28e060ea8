#!/usr/bin/env bash
# Sets up a CUDA 13.0 build environment for `cargo build --features cuda` on a machine with no
# GPU, no driver and no system CUDA toolkit, and exports it.
#
#   source scripts/cuda-env.sh          # set up once, export into the current shell
#   eval "$(scripts/cuda-env.sh)"       # the same from a script; stdout is only `export` lines
#
# What it does (idempotent; everything lives under .cuda/, which git ignores, or under
# $OPTLAB_CUDA_DIR when set):
#   1. a Python virtual environment .cuda/venv with nvcc and its headers from PyPI, pinned to
#      CUDA 13.0 (the device machines' driver is CUDA 13.0 and refuses newer PTX);
#   2. stub CUDA libraries in .cuda/stubs (scripts/cuda-stubs.sh) so test binaries link and then
#      skip their GPU tests (`Device::new_cuda(0)` fails with CUDA_ERROR_STUB_LIBRARY);
#   3. prints the environment: PATH (nvcc), CUDA_HOME, CUDA_COMPUTE_CAP=90 (no nvidia-smi to
#      detect it; H100/H200 are 9.0), LIBRARY_PATH (link against the stubs) and LD_LIBRARY_PATH
#      (run against the stubs). On a GPU machine, do not use LD_LIBRARY_PATH from here.
# Needs: python3 with venv, a C compiler, cargo, network access to PyPI and crates.io.

_optlab_cuda_setup() (
  set -euo pipefail
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  dir=${OPTLAB_CUDA_DIR:-$repo/.cuda}
  venv=$dir/venv stubs=$dir/stubs
  log() { echo "cuda-env: $*" >&2; }

  pins="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
        nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88"
  stamp=$venv/.optlab-pins
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$(echo $pins)" ]; then
    log "installing $(echo $pins) into $venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check $pins >&2
    echo $pins >"$stamp"
  fi
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cuda=$site/nvidia/cu13
  [ -x "$cuda/bin/nvcc" ] || { log "no nvcc at $cuda/bin/nvcc"; exit 1; }

  # The stubs mirror the symbols of the cudarc version in Cargo.lock.
  cudarc_version=$(awk '/^name = "cudarc"$/ { getline; gsub(/[^0-9.]/, ""); print }' "$repo/Cargo.lock")
  [ -n "$cudarc_version" ] || { log "cudarc is not in Cargo.lock"; exit 1; }
  if [ ! -f "$stubs/.cudarc-$cudarc_version" ]; then
    registry=${CARGO_HOME:-$HOME/.cargo}/registry/src
    src=$(ls -d "$registry"/*/"cudarc-$cudarc_version" 2>/dev/null | head -1 || true)
    if [ -z "$src" ]; then
      log "fetching crate sources (cudarc $cudarc_version)"
      (cd "$repo" && cargo fetch >&2)
      src=$(ls -d "$registry"/*/"cudarc-$cudarc_version" | head -1)
    fi
    rm -rf "$stubs"
    "$repo/scripts/cuda-stubs.sh" "$stubs" "$src/src" "$cuda/lib/libcudart.so.13"
    touch "$stubs/.cudarc-$cudarc_version"
  fi

  echo "export PATH=\"$cuda/bin:\$PATH\""
  echo "export CUDA_HOME=\"$cuda\""
  echo "export CUDA_COMPUTE_CAP=90"
  echo "export LIBRARY_PATH=\"$stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}\""
  echo "export LD_LIBRARY_PATH=\"$stubs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
  echo "export OPTLAB_CUDA_STUBS=\"$stubs\""
)

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  # Sourced: export into the caller's shell (without leaking `set -e` into it).
  if _optlab_cuda_env=$(_optlab_cuda_setup); then
    eval "$_optlab_cuda_env"
    unset _optlab_cuda_env
  else
    unset _optlab_cuda_env
    echo "cuda-env: setup failed" >&2
    return 1
  fi
else
  _optlab_cuda_setup
fi
