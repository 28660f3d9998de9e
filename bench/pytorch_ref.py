"""Reference for bench_decoder on the same machine: PyTorch (Debian's 1.13,
fp32) forward+backward of Llama-3.2-1B-shaped layers (D=2048, F=8192, H=32,
Hkv=8, d=64) with LoRA r=8 on q/k/v/o at seq 512, frozen base weights.
Run: /usr/bin/python3 bench/pytorch_ref.py [layers] [iters]. Not a test."""
import sys
import time

import torch

L = int(sys.argv[1]) if len(sys.argv) > 1 else 2
iters = int(sys.argv[2]) if len(sys.argv) > 2 else 3
torch.set_num_threads(2)
D, F, H, Hkv, d, T, r = 2048, 8192, 32, 8, 64, 512, 8
torch.manual_seed(0)


def lin(o, i):
    return (torch.randn(o, i) * 0.02).requires_grad_(False)


layers = []
for _ in range(L):
    w = dict(q=lin(H * d, D), k=lin(Hkv * d, D), v=lin(Hkv * d, D), o=lin(D, H * d), g=lin(F, D), u=lin(F, D),
             dn=lin(D, F), n1=torch.ones(D), n2=torch.ones(D))
    for m in "qkvo":
        i = D if m != "o" else H * d
        o = w[m].shape[0]
        w[m + "A"] = (torch.randn(r, i) * 0.01).requires_grad_(True)
        w[m + "B"] = (torch.randn(o, r) * 0.01).requires_grad_(True)
    layers.append(w)


def rms(x, g):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g


def proj(w, m, x):
    return x @ w[m].T + 2.0 * (x @ w[m + "A"].T) @ w[m + "B"].T


def step(x):
    for w in layers:
        a = rms(x, w["n1"])
        q = proj(w, "q", a).view(T, H, d).transpose(0, 1)
        k = proj(w, "k", a).view(T, Hkv, d).transpose(0, 1).repeat_interleave(H // Hkv, 0)
        v = proj(w, "v", a).view(T, Hkv, d).transpose(0, 1).repeat_interleave(H // Hkv, 0)
        s = (q @ k.transpose(1, 2)) / d ** 0.5
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        att = (s.softmax(-1) @ v).transpose(0, 1).reshape(T, H * d)
        x = x + proj(w, "o", att)
        b = rms(x, w["n2"])
        x = x + (torch.nn.functional.silu(b @ w["g"].T) * (b @ w["u"].T)) @ w["dn"].T
    return x.pow(2).mean()


x0 = torch.randn(T, D).requires_grad_(True)
best = 1e9
for it in range(iters + 1):
    t0 = time.time()
    step(x0).backward()
    t = time.time() - t0
    if it > 0:
        best = min(best, t)
flops = 4.0 * T * (2 * D * H * d + 2 * D * Hkv * d + 3 * D * F) * L  # q+o, k+v, gate/up/down: 4 FLOP per weight
print(f"PyTorch {torch.__version__} fp32, {torch.get_num_threads()} threads: {L} layers, seq {T}, LoRA r={r}: "
      f"{best:.3f} s/step, {flops / best / 1e9:.1f} dense GFLOP/s")
