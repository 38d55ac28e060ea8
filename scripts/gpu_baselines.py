#!/usr/bin/env python3
"""PyTorch baselines for the GPU check's timing table, on the same GPU as optlab's timings.

    python3 scripts/gpu_baselines.py [--out FILE.json] [--device cuda] [--sizes 1024,4096]

Measures, in f32 with TF32 off (as optlab's side runs):

- copy bandwidth: one contiguous device-to-device copy of as many floats as GPT-2 small has
  parameters (read + write), and a clone of each of its 148 parameter tensors;
- a fused AdamW step (`torch.optim.AdamW(fused=True)`, weight decay 0.1) over GPT-2 small's
  parameter shapes, the ones `gpu_timing_table` in tests/cuda_twins.rs uses;
- `torch.linalg.qr(F @ Q)` (a matmul plus a QR: one power-iteration refresh of a SOAP factor)
  and `torch.linalg.eigh(F)` at each size.

Prints one JSON object (and writes it to --out). Without torch, or without a CUDA device, it
prints {"skipped": reason} and exits 0: the caller reports the baseline as missing.
"""

import argparse
import json
import sys
import time


def gpt2_shapes():
    """GPT-2 small's parameters, in the order of tests/cuda_twins.rs's gpt2_shapes()."""
    v, t, d, layers = 50257, 1024, 768, 12
    shapes = [(v, d), (t, d), (d,), (d,)]
    for _ in range(layers):
        shapes += [
            (d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
            (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,),
        ]
    return shapes


def timed(torch, device, fn, reps, budget=30.0):
    """Seconds per call after one warm-up call, device synchronized around the timed calls;
    fewer repetitions when the warm-up shows they would exceed `budget` seconds."""
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    warm = time.perf_counter() - t0
    reps = max(1, min(reps, int(budget / max(warm, 1e-9))))
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="1024,4096", help="factor sizes for qr and eigh")
    args = ap.parse_args()

    def emit(obj):
        # A skip on one line, so that it is the log's last line.
        text = json.dumps(obj, indent=None if "skipped" in obj else 2, sort_keys=True)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")

    try:
        import torch
    except ImportError as e:
        emit({"skipped": f"torch is not importable: {e}"})
        return 0
    if not torch.cuda.is_available():
        emit({"skipped": f"torch {torch.__version__}: no CUDA device"})
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(args.device)
    out = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(dev),
    }

    # Copy bandwidth (bytes read + written per second).
    shapes = gpt2_shapes()
    n = sum(torch.Size(s).numel() for s in shapes)
    out["n_params"] = n
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    s = timed(torch, dev, lambda: dst.copy_(src), 50)
    out["copy_gbps"] = 2 * 4 * n / s / 1e9
    params = [torch.randn(sh, device=dev) * 1e-2 for sh in shapes]
    s = timed(torch, dev, lambda: [p.clone() for p in params], 20)
    out["clone_each_gbps"] = 2 * 4 * n / s / 1e9
    del src, dst

    # Fused AdamW over GPT-2 small (reads p, m, v, g; writes p, m, v: 7 accesses).
    ps = [torch.nn.Parameter(p) for p in params]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-2
    opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True)
    s = timed(torch, dev, opt.step, 20)
    out["adamw_fused_ms"] = s * 1e3
    out["adamw_fused_gbps"] = 7 * 4 * n / s / 1e9
    del opt, ps, params

    # A refresh of one factor (matmul + QR) and an eigendecomposition, per size.
    for size in [int(x) for x in args.sizes.split(",") if x]:
        g = torch.randn(size, size + size // 2, device=dev)
        f = g @ g.T
        _, q = torch.linalg.eigh(f)
        q = torch.linalg.qr(q + 1e-3 * torch.randn_like(q)).Q
        reps = 3 if size >= 4096 else 10
        out[f"qr_matmul_ms_n{size}"] = timed(torch, dev, lambda: torch.linalg.qr(f @ q), reps) * 1e3
        out[f"eigh_ms_n{size}"] = timed(torch, dev, lambda: torch.linalg.eigh(f), reps) * 1e3
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
