#!/usr/bin/env python3
"""Training throughput of optlab's decoder in PyTorch eager mode, for comparison with `train`.

The model is the one `src/models/gpt.rs` builds: pre-LayerNorm blocks without biases,
QK-LayerNorm over the full width, half-split RoPE (theta 10000), exact-erf GeLU MLP of 4x
width, untied embedding and head, byte vocabulary (256). Each timed step is what the runner
does: forward, mean cross-entropy, backward, global-norm clipping at 1.0, an AdamW step.
Tokens are random (throughput does not depend on them).

    python3 benches/torch_baseline.py --preset tiny --batch 16 --threads 2 --steps 20
    python3 benches/torch_baseline.py --preset d256-l3 --device cuda --json out.json

Prints one line with tokens/s (and with --json writes it as JSON too). On CUDA, f32 matrix
products run without TF32, as candle's do by default. Without torch, or with --device cuda
and no CUDA device, it prints SKIP and exits 0.
"""

import argparse
import json
import math
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("SKIP: torch is not importable")
    sys.exit(0)

# name: (d_model, n_layers, n_heads, context), as ModelConfig::preset defines them.
PRESETS = {
    "test": (32, 2, 2, 32),
    "tiny": (128, 2, 4, 128),
    "d256-l3": (256, 3, 4, 512),
    "d512-l3": (512, 3, 8, 512),
    "d512-l6": (512, 6, 8, 512),
}
VOCAB = 256


def layer_norm(x, weight, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, None, eps)


class Decoder(torch.nn.Module):
    def __init__(self, d, n_layers, n_heads, context):
        super().__init__()
        self.d, self.nh, self.hd = d, n_heads, d // n_heads
        std = lambda fan_in, layer=None: (1 / math.sqrt(fan_in)) / (
            math.sqrt(2 * (layer + 1)) if layer is not None else 1
        )

        def matrix(out, inp, layer=None):
            w = torch.empty(out, inp)
            s = std(inp, layer)
            torch.nn.init.trunc_normal_(w, std=s, a=-3 * s, b=3 * s)
            return torch.nn.Parameter(w)

        ones = lambda: torch.nn.Parameter(torch.ones(d))
        self.wte = matrix(VOCAB, d)
        self.blocks = torch.nn.ModuleList()
        for i in range(n_layers):
            b = torch.nn.Module()
            b.attn_norm, b.q_norm, b.k_norm, b.mlp_norm = ones(), ones(), ones(), ones()
            b.q, b.k, b.v, b.o = matrix(d, d), matrix(d, d), matrix(d, d), matrix(d, d, i)
            b.fc_in, b.fc_out = matrix(4 * d, d), matrix(d, 4 * d, i)
            self.blocks.append(b)
        self.final_norm = ones()
        self.lm_head = matrix(VOCAB, d)
        half = self.hd // 2
        freq = 10000.0 ** (-2.0 * (torch.arange(self.hd) % half).double() / self.hd)
        angle = torch.arange(context).double()[:, None] * freq[None, :]
        self.register_buffer("cos", angle.cos().float())
        self.register_buffer("sin", angle.sin().float())
        mask = torch.full((context, context), float("-inf")).triu(1)
        self.register_buffer("mask", mask)

    def rope(self, x, t):
        half = self.hd // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos[:t] + rotated * self.sin[:t]

    def forward(self, tokens):
        b, t = tokens.shape
        x = self.wte[tokens]
        for blk in self.blocks:
            h = layer_norm(x, blk.attn_norm)
            q = layer_norm(h @ blk.q.T, blk.q_norm)
            k = layer_norm(h @ blk.k.T, blk.k_norm)
            v = h @ blk.v.T
            heads = lambda z: z.view(b, t, self.nh, self.hd).transpose(1, 2)
            q, k, v = self.rope(heads(q), t), self.rope(heads(k), t), heads(v)
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.hd) + self.mask[:t, :t]
            y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, self.d)
            x = x + y @ blk.o.T
            h = layer_norm(x, blk.mlp_norm)
            x = x + F.gelu(h @ blk.fc_in.T) @ blk.fc_out.T
        return layer_norm(x, self.final_norm) @ self.lm_head.T


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"SKIP: torch {torch.__version__} sees no CUDA device")
            sys.exit(0)
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    d, n_layers, n_heads, context = PRESETS[args.preset]
    model = Decoder(d, n_layers, n_heads, context).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    data = torch.randint(0, VOCAB, (args.batch, context + 1)).to(device)

    def step():
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), data[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = time.perf_counter() - t0
    tokens = args.steps * args.batch * context
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"threads {torch.get_num_threads()}"
    )
    print(
        f"torch {torch.__version__} eager: preset {args.preset}, batch {args.batch}x{context}, "
        f"{where}: {tokens / dt:.0f} tokens/s ({dt / args.steps * 1000:.1f} ms/step)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "torch": torch.__version__,
                    "device": str(device),
                    "device_name": where,
                    "preset": args.preset,
                    "batch": args.batch,
                    "context": context,
                    "steps": args.steps,
                    "tokens_per_second": tokens / dt,
                    "ms_per_step": dt / args.steps * 1000,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
