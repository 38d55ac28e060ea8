#!/usr/bin/env bash
# optlab against PyTorch on this CPU, side by side in one run (benches/vs_torch.py): optimizer
# steps on the step benchmarks' parameter set and `train` tokens/s, at 1 and 2 threads. Prints
# the table and writes results/bench/vs-torch.md.
#
#   scripts/bench-vs-torch.sh [--threads 1,2] [--rows adamw,soap] [--no-train] [--repeats N]
#       [--soap-py DIR] [--distributed-shampoo DIR] [--out FILE]
#
# PyTorch (torch==2.15.0) and pytorch_optimizer (4.1.0) are installed from PyPI into
# .bench-venv/ (git-ignored; about 5 GB with torch's CUDA libraries, which stay unused) when
# missing; set OPTLAB_TORCH_PYTHON to use another interpreter that has them. The reference
# soap.py and DistributedShampoo are not on PyPI: pass checkouts of nikhilvyas/SOAP and
# facebookresearch/optimizers to time them, otherwise pytorch_optimizer's SOAP and
# ScalableShampoo stand in (the table names which ran).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
log() { echo "bench-vs-torch: $*" >&2; }

python=${OPTLAB_TORCH_PYTHON:-}
if [ -z "$python" ]; then
  venv=$repo/.bench-venv
  pins="torch==2.15.0 pytorch_optimizer==4.1.0"
  if [ ! -f "$venv/.optlab-pins" ] || [ "$(cat "$venv/.optlab-pins")" != "$pins" ]; then
    log "installing $pins into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    # shellcheck disable=SC2086
    "$venv/bin/pip" install --quiet $pins
    echo "$pins" > "$venv/.optlab-pins"
  fi
  python=$venv/bin/python
fi

log "building the optlab side (release)"
step_bin=$(cargo bench --bench vs_torch --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "vs_torch" and m.get("executable"):
        print(m["executable"])')
cargo build --release --quiet --bin train
train_bin=$repo/target/release/train
[ -x "$step_bin" ] || { log "could not find the vs_torch bench executable"; exit 1; }

exec "$python" benches/vs_torch.py --optlab-step "$step_bin" --optlab-train "$train_bin" \
  --out results/bench/vs-torch.md "$@"
