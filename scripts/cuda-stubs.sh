#!/usr/bin/env bash
# Generates stand-in CUDA libraries so that binaries built with `--features cuda` link and run
# on a machine without a GPU or NVIDIA driver.
#
# Usage: scripts/cuda-stubs.sh OUT_DIR CUDARC_SRC CUDART
#   OUT_DIR     folder to fill (created)
#   CUDARC_SRC  the `src` folder of the cudarc crate the build uses (its bindings list the symbols)
#   CUDART      path of the real libcudart.so.13 (from the nvidia-cuda-runtime wheel)
#
# Every function cudarc declares for a library becomes `int NAME(void) { return 34; }` (34 is
# CUDA_ERROR_STUB_LIBRARY), compiled into a shared object with the real SONAME. The first call a
# program makes, cuInit, therefore fails and candle's `Device::new_cuda` returns an error, which
# the GPU tests turn into a skip. The real libcudart is copied because the objects nvcc builds for
# candle-kernels register their fat binaries through it at start-up; it loads without a driver.
# Never put this folder on LD_LIBRARY_PATH on a machine with a GPU: it would shadow libcuda.so.1.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 OUT_DIR CUDARC_SRC CUDART" >&2; exit 2; }
out=$1 src=$2 cudart=$3
mkdir -p "$out"

# module-in-cudarc  link-name  soname
libs=(
  "driver   cuda      libcuda.so.1"
  "cublas   cublas    libcublas.so.13"
  "cublaslt cublasLt  libcublasLt.so.13"
  "curand   curand    libcurand.so.10"
  "nvrtc    nvrtc     libnvrtc.so.13"
  "cusolver cusolver  libcusolver.so.12"
  "cusparse cusparse  libcusparse.so.12"
)
for entry in "${libs[@]}"; do
  read -r module name soname <<<"$entry"
  bindings="$src/$module/sys/mod.rs"
  [ -f "$bindings" ] || { echo "cuda-stubs: missing $bindings" >&2; exit 1; }
  # The dynamic-linking bindings declare each function in its own `extern "C" {` block; take the
  # name on the line after each block opener.
  awk '/extern "C" \{/ { if ((getline line) > 0 && match(line, /fn [A-Za-z_][A-Za-z0-9_]*/))
                           print substr(line, RSTART + 3, RLENGTH - 3) }' "$bindings" |
    sort -u | awk '{ print "int " $1 "(void) { return 34; }" }' >"$out/${name}_stub.c"
  count=$(wc -l <"$out/${name}_stub.c")
  [ "$count" -gt 0 ] || { echo "cuda-stubs: no symbols found in $bindings" >&2; exit 1; }
  cc -shared -fPIC -O1 -Wl,-soname,"$soname" -o "$out/$soname" "$out/${name}_stub.c"
  ln -sf "$soname" "$out/lib$name.so"
  echo "cuda-stubs: $soname ($count symbols)" >&2
done
cp -L "$cudart" "$out/libcudart.so.13"
ln -sf libcudart.so.13 "$out/libcudart.so"
echo "cuda-stubs: libcudart.so.13 (real, from $cudart)" >&2
