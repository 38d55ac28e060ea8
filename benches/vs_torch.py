#!/usr/bin/env python3
"""optlab against PyTorch on the CPU, side by side in one run: optimizer steps and training
throughput on identical shapes, dtype (f32) and thread counts.

Run it through `scripts/bench-vs-torch.sh`, which installs PyTorch into a local venv when it is
missing, builds the optlab side and passes its paths here:

    python benches/vs_torch.py --optlab-step BIN --optlab-train BIN [--threads 1,2]
        [--rows adamw,soap,...] [--no-train] [--soap-py DIR] [--distributed-shampoo DIR]
        [--out results/bench/vs-torch.md]

Step rows time `optimizer.step()` on the step benchmarks' GPT-like set (benches/common: 3.4 M
parameters in 26 tensors) with fixed gradients. Each side runs `--repeats` blocks of `--steps`
consecutive steps after warm-up steps and keeps the fastest block's mean, so that noise from
other processes on a shared machine inflates neither side more than the other. Training rows
run the `train` binary and `benches/torch_baseline.py` (the eager replica of the same model)
for the same number of steps.

Baselines: PyTorch's fused AdamW and SGD, foreach Adafactor and Muon (torch.optim), Lion from
pytorch_optimizer (foreach); SOAP is the reference `soap.py` when `--soap-py` names a checkout
of nikhilvyas/SOAP, otherwise pytorch_optimizer's port of it; Shampoo is DistributedShampoo when
`--distributed-shampoo` names a checkout of facebookresearch/optimizers, otherwise
pytorch_optimizer's ScalableShampoo (neither reference is on PyPI). The table names the one used.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# The parameter set (benches/common/mod.rs builds the same names and shapes).


def shapes():
    out = [("wte.weight", (512, 256)), ("lm_head.weight", (512, 256))]
    for layer in range(6):
        out.append((f"blocks.{layer}.mlp.fc.weight", (1024, 256)))
        out.append((f"blocks.{layer}.mlp.proj.weight", (256, 1024)))
        out.append((f"blocks.{layer}.mlp.fc.bias", (1024,)))
        out.append((f"blocks.{layer}.norm.weight", (256,)))
    return out


def param_set():
    g = torch.Generator().manual_seed(0)
    params = []
    for name, shape in shapes():
        p = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02)
        p.grad = torch.randn(shape, generator=g) * 1e-3
        params.append((name, p))
    return params


def is_hidden_matrix(name, p):
    # optlab's Muon orthogonalizes role-`matrix` parameters: 2-D block weights, not the
    # embedding or the head.
    return p.ndim == 2 and name.startswith("blocks.")


# --------------------------------------------------------------------------------------------
# Rows: (optlab optimizer TOML, PyTorch builder returning (step function, baseline label)).


def build_adamw(named, _args):
    opt = torch.optim.AdamW([p for _, p in named], fused=True)
    return opt.step, "torch.optim.AdamW(fused=True)"


def build_adamw_foreach(named, _args):
    opt = torch.optim.AdamW([p for _, p in named], foreach=True)
    return opt.step, "torch.optim.AdamW(foreach=True)"


def fused_adamw_disagreement(steps=5, n=1 << 20):
    """Fraction of elements where fused AdamW and torch's reference single-tensor AdamW
    disagree after `steps` steps (optlab computes the reference form exactly)."""
    g = torch.Generator().manual_seed(0)
    p0, grad = torch.randn(n, generator=g), torch.randn(n, generator=g) * 1e-3
    out = []
    for kw in (dict(fused=True), dict(foreach=False)):
        p = torch.nn.Parameter(p0.clone())
        p.grad = grad.clone()
        opt = torch.optim.AdamW([p], **kw)
        for _ in range(steps):
            opt.step()
        out.append(p.detach())
    return (out[0] != out[1]).double().mean().item()


def build_adafactor(named, _args):
    opt = torch.optim.Adafactor([p for _, p in named], foreach=True)
    return opt.step, "torch.optim.Adafactor(foreach=True)"


def build_lion(named, _args):
    import pytorch_optimizer

    opt = pytorch_optimizer.Lion(
        [p for _, p in named], lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, foreach=True
    )
    return opt.step, "pytorch_optimizer.Lion(foreach=True)"


def build_sgd_momentum(named, _args):
    params = [p for _, p in named]
    try:
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=True)
        opt.step()  # fused SGD may be missing for CPU tensors: find out now
        label = "torch.optim.SGD(fused=True)"
    except RuntimeError:
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
        label = "torch.optim.SGD(foreach=True)"
    return opt.step, label


def build_muon(named, _args):
    matrices = [p for n, p in named if is_hidden_matrix(n, p)]
    others = [p for n, p in named if not is_hidden_matrix(n, p)]
    muon = torch.optim.Muon(
        matrices, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5
    )
    adamw = torch.optim.AdamW(
        others, lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0, fused=True
    )

    def step():
        muon.step()
        adamw.step()

    return step, "torch.optim.Muon (Newton–Schulz in bf16) + fused AdamW (non-matrix)"


def build_soap(named, args):
    params = [p for _, p in named]
    kwargs = dict(
        lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10
    )
    if args.soap_py:
        sys.path.insert(0, args.soap_py)
        from soap import SOAP

        return SOAP(params, **kwargs).step, "reference soap.py (nikhilvyas/SOAP)"
    import pytorch_optimizer

    return pytorch_optimizer.SOAP(params, **kwargs).step, "pytorch_optimizer.SOAP"


def build_shampoo(named, args):
    params = [p for _, p in named]
    if args.distributed_shampoo:
        sys.path.insert(0, args.distributed_shampoo)
        from distributed_shampoo import AdamPreconditionerConfig, DistributedShampoo

        opt = DistributedShampoo(
            params,
            lr=1e-2,
            betas=(0.9, 0.95),
            epsilon=1e-8,
            precondition_frequency=10,
            max_preconditioner_dim=1024,
            grafting_config=AdamPreconditionerConfig(beta2=0.95, epsilon=1e-8),
        )
        return opt.step, "DistributedShampoo (facebookresearch/optimizers), Adam grafting"
    import pytorch_optimizer
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    opt = pytorch_optimizer.ScalableShampoo(
        params,
        lr=1e-2,
        betas=(0.9, 0.95),
        start_preconditioning_step=1,
        preconditioning_compute_steps=10,
        block_size=1024,
        graft_type=LayerWiseGrafting.RMSPROP,
    )
    return opt.step, "pytorch_optimizer.ScalableShampoo, RMSprop grafting"


SHAMPOO_TOML = (
    'name = "shampoo"\nbetas = [0.9, 0.95]\nepsilon = 1e-8\nprecondition_frequency = 10\n'
    'grafting_config = { type = "adam", beta2 = 0.95, epsilon = 1e-8 }'
)

# name: (optlab TOML, PyTorch builder, timed steps per block, target time ratio)
ROWS = {
    "adamw": ('name = "adamw"', build_adamw, 20, 0.8),
    "adamw_foreach": ('name = "adamw"', build_adamw_foreach, 20, None),
    "adafactor": ('name = "adafactor"', build_adafactor, 20, None),
    "lion": ('name = "lion"', build_lion, 20, None),
    "sgd_momentum": ('name = "sgd"\nmomentum = 0.9', build_sgd_momentum, 20, None),
    "muon": ('name = "muon"', build_muon, 2, None),
    "soap": ('name = "soap"', build_soap, 30, 0.6),
    "shampoo": (SHAMPOO_TOML, build_shampoo, 30, 0.5),
}


def time_torch(step, steps, warmup, repeats):
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t0) * 1e3 / steps)
    return best


def time_optlab(binary, toml, threads, steps, warmup, repeats):
    out = subprocess.run(
        [binary, "--threads", str(threads), "--steps", str(steps), "--warmup", str(warmup),
         "--repeats", str(repeats), "--config", toml],
        check=True, capture_output=True, text=True,
    )
    line = out.stdout.strip().splitlines()[-1]
    return min(json.loads(line)["ms_per_step"])


def triad_bandwidth(threads, n=1 << 25, repeats=5):
    """Sustained memory bandwidth (GB/s) of a = b + s·c over three 128 MiB f32 arrays."""
    torch.set_num_threads(threads)
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=0.5, out=a)
        best = min(best, time.perf_counter() - t0)
    return 3 * 4 * n / best / 1e9


# --------------------------------------------------------------------------------------------
# Training throughput.

TRAIN_STEPS = {"tiny": 20, "d256-l3": 3}


def train_optlab(binary, preset, threads):
    with tempfile.TemporaryDirectory() as out:
        run = os.path.join(out, "run")
        cmd = [
            binary, os.path.join(REPO, "experiments", "configs", f"{preset}.toml"),
            "--out", run, "--quiet", "--set", f"threads={threads}",
            "--set", f"train.steps={TRAIN_STEPS[preset]}", "--set", "eval.interval=0",
            "--set", "eval.at_start=false", "--set", "eval.tokens=512",
            "--set", "checkpoint.interval=0", "--set", "ewa.taus=[]",
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
        with open(os.path.join(run, "summary.json")) as f:
            return json.load(f)["timing"]["tokens_per_second"]


def train_torch(preset, threads):
    with tempfile.TemporaryDirectory() as out:
        path = os.path.join(out, "torch.json")
        cmd = [
            sys.executable, os.path.join(REPO, "benches", "torch_baseline.py"),
            "--preset", preset, "--batch", "16", "--threads", str(threads),
            "--steps", str(TRAIN_STEPS[preset]), "--warmup", "2", "--json", path,
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        with open(path) as f:
            return json.load(f)["tokens_per_second"]


# --------------------------------------------------------------------------------------------


def machine():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return cpu, os.cpu_count(), load


def commit():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optlab-step", required=True, help="the vs_torch bench executable")
    ap.add_argument("--optlab-train", help="the release `train` executable")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rows", default=",".join(ROWS), help="step rows to run")
    ap.add_argument("--repeats", type=int, default=5, help="timed blocks per side")
    ap.add_argument("--no-train", action="store_true", help="skip the training rows")
    ap.add_argument("--soap-py", help="a checkout of nikhilvyas/SOAP (holds soap.py)")
    ap.add_argument("--distributed-shampoo", help="a checkout of facebookresearch/optimizers")
    ap.add_argument("--out", help="write the table as Markdown here")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    rows = [r for r in args.rows.split(",") if r]
    for r in rows:
        if r not in ROWS:
            sys.exit(f"unknown row {r!r}; rows: {', '.join(ROWS)}")

    lines = []
    bytes_adamw = sum(4 * 7 * torch.Size(s).numel() for _, s in shapes())

    def emit(cells):
        line = "| " + " | ".join(cells) + " |"
        lines.append(line)
        print(line, flush=True)

    emit(["what", "threads", "optlab", "PyTorch", "baseline", "optlab / PyTorch", "target"])
    emit(["---"] * 7)
    bandwidth = {}
    optlab_ms = {}
    for t in threads:
        bandwidth[t] = triad_bandwidth(t)
    for t in threads:
        torch.set_num_threads(t)
        for r in rows:
            toml, build, steps, target = ROWS[r]
            warmup = 2 if steps < 30 else 10
            # Rows that share an optlab config (adamw, adamw_foreach) time it once.
            key = (toml, t, steps)
            if key not in optlab_ms:
                optlab_ms[key] = time_optlab(args.optlab_step, toml, t, steps, warmup,
                                             args.repeats)
            mine = optlab_ms[key]
            torch.manual_seed(0)
            step, label = build(param_set(), args)
            theirs = time_torch(step, steps, warmup, args.repeats)
            ratio = mine / theirs
            goal = "" if target is None else (
                f"≤ {target} ({'met' if ratio <= target else 'not met'})")
            emit([f"{r} step", str(t), f"{mine:.2f} ms", f"{theirs:.2f} ms", label,
                  f"{ratio:.2f}", goal])
            if r == "adamw":
                emit([f"adamw: {bytes_adamw / 1e6:.0f} MB moved per step", str(t),
                      f"{bytes_adamw / mine / 1e6:.1f} GB/s", f"{bytes_adamw / theirs / 1e6:.1f} GB/s",
                      f"triad bandwidth {bandwidth[t]:.1f} GB/s", "", ""])
    if not args.no_train:
        if not args.optlab_train:
            sys.exit("--optlab-train is required for the training rows (or pass --no-train)")
        for preset in TRAIN_STEPS:
            for t in threads:
                mine = train_optlab(args.optlab_train, preset, t)
                theirs = train_torch(preset, t)
                ratio = mine / theirs
                emit([f"train {preset} tokens/s", str(t), f"{mine:,.0f}", f"{theirs:,.0f}",
                      "benches/torch_baseline.py (eager)", f"{ratio:.2f}",
                      f"≥ 1.0 ({'met' if ratio >= 1.0 else 'not met'})"])

    cpu, cores, load = machine()
    header = [
        "# optlab against PyTorch on the CPU (`scripts/bench-vs-torch.sh`)",
        "",
        f"- Machine: {cpu}, {cores} logical cores; load average {load:.2f} at the end of the "
        "run (a shared machine: only same-run ratios count).",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"
        f"; optlab commit {commit()}; torch {torch.__version__}; Python "
        f"{platform.python_version()}.",
        "- Step rows: f32, the GPT-like set of `benches/common` (3.4 M parameters), fixed "
        f"gradients; fastest of {args.repeats} blocks of consecutive steps per side (30 for "
        "SOAP and Shampoo, which refresh every 10). Ratio = optlab time / PyTorch time (lower "
        "is better).",
        "- PyTorch's fused AdamW is not torch's reference AdamW: after 5 steps on 2^20 "
        f"elements it differs from the single-tensor form in {100 * fused_adamw_disagreement():.2f} % "
        "of them. optlab computes the reference form (two divisions and a square root per "
        "element); `adamw_foreach` is PyTorch's exact form.",
        "- Train rows: `train` against `benches/torch_baseline.py`, batch 16, f32; ratio = "
        "optlab tokens/s / PyTorch tokens/s (higher is better).",
        "",
    ]
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(header + lines) + "\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
