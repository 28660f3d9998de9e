"""PyTorch reference for bench/bench_step.sh: one training step (forward +
backward) of a Llama-3.2-1B-shaped Titan in PyTorch (Debian's 1.13, fp32):
D=2048, F=8192, H=32, Hkv=8, d=64, RMSNorm, RoPE (theta 500000), SwiGLU,
LoRA r=8 (alpha 16) on q/k/v/o, frozen base, and the TPTT linear-attention
branch mixed by MaG (mu = 0.5) the way the reference package does it
(fabienfrfr/tptt, src/tptt/modeling_tptt.py: LiZAttention, LinearAttention,
LinearAttentionOp), for operator delta_product (order n_h = 2, alpha gate
"c", beta gate "k", trick "dt", linear) with its chunk size (64, the largest
divisor of the sequence length not above it).

What the reference computes, and this file therefore computes too:
* q/k/v are projected once for the linear branch and again inside the base
  (softmax) attention, and o_proj is applied in both branches (--once shares
  them: a cheaper PyTorch than the reference);
* gates: sigmoid of a causal 3-token mean (replicate padding) of k (and of v,
  unused by delta_product: alpha = 1, beta = sigmoid(pool(k)));
* q, k: silu then L2 normalisation per head; v times d^-0.5; GQA by repeat;
* n_h virtual tokens per token by the binomial "derivative" kernel (q, k, v
  and beta; alpha repeated); chunks of C tokens x n_h virtual tokens: the
  strictly lower -(beta k) k^T inverted by row-by-row forward substitution,
  W and U by products with that inverse, then per chunk and per order a
  per-token state [C, d, d] started from the chunk's entry state;
* heads merged, RMS-normalised without weight, o_proj, then
  0.5 * softmax branch + 0.5 * linear branch (and the reference's allclose
  check of the two).

The layer stack is measured with --layers layers and its time scaled to
--scale-to layers (default 16); the head (final RMSNorm, tied 128256 x 2048
embedding, cross-entropy, backward to its input) is measured once and added.
The embedding lookup and the optimizer (LoRA parameters only) are left out.
Dense GFLOP/s count 4 FLOP per frozen weight per token (forward and dX) of
q/k/v/o, gate/up/down and the head, once (as tptt train counts them); the
fp32 matmul rate of PyTorch on the step's shape is printed beside them,
measured at the start and at the end.

Run: /usr/bin/python3 bench/pytorch_step.py [--layers 2] [--seq 512] [--iters 2]
     [--threads 2] [--scale-to 16] [--order 2] [--chunk 64] [--once] [--no-head]
Prints a human line per part and a last line `JSON {...}`. Not a test."""
import argparse
import json
import math
import resource
import time

import torch
import torch.nn.functional as Fn

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--layers", type=int, default=2, help="layers built and measured")
ap.add_argument("--scale-to", type=int, default=16, help="layers the per-layer time is scaled to")
ap.add_argument("--seq", type=int, default=512)
ap.add_argument("--iters", type=int, default=2, help="timed steps after one warm-up; the best is kept")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--order", type=int, default=2, help="n_h of delta_product")
ap.add_argument("--chunk", type=int, default=64, help="the reference's max_chunk_size")
ap.add_argument("--once", action="store_true", help="project q/k/v/o once for both branches (not the reference)")
ap.add_argument("--no-head", action="store_true", help="skip the 128256-token head")
args = ap.parse_args()

torch.set_num_threads(args.threads)
D, F, H, Hkv, d, V, r, lora_scale = 2048, 8192, 32, 8, 64, 128256, 8, 2.0
T, L, NH = args.seq, args.layers, args.order
MU = 0.5  # MaG weight of the linear branch (constant mode)
torch.manual_seed(0)


def frozen(o, i):
    return torch.randn(o, i) * 0.02


def make_layer():
    w = dict(q=frozen(H * d, D), k=frozen(Hkv * d, D), v=frozen(Hkv * d, D), o=frozen(D, H * d),
             g=frozen(F, D), u=frozen(F, D), dn=frozen(D, F), n1=torch.ones(D), n2=torch.ones(D))
    for m in "qkvo":
        fan_in, fan_out = w[m].shape[1], w[m].shape[0]
        w[m + "A"] = (torch.randn(r, fan_in) * 0.01).requires_grad_(True)
        # B non-zero so that every LoRA product and its gradient is really computed
        w[m + "B"] = (torch.randn(fan_out, r) * 0.01).requires_grad_(True)
    return w


def rms(x, g, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


def proj(w, m, x):
    """Frozen linear plus its LoRA update (peft: base(x) + scale * B(A(x)))."""
    return x @ w[m].T + lora_scale * ((x @ w[m + "A"].T) @ w[m + "B"].T)


# RoPE tables (HF Llama: rotate_half on the two halves of a head)
inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)
cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)


def rope(x):  # [heads, T, d]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def softmax_attention(q, k, v):
    """The base model's eager attention. q [T, H*d], k/v [T, Hkv*d] -> [T, H*d] (before o_proj)."""
    q = rope(q.view(T, H, d).transpose(0, 1))
    k = rope(k.view(T, Hkv, d).transpose(0, 1)).repeat_interleave(H // Hkv, 0)
    v = v.view(T, Hkv, d).transpose(0, 1).repeat_interleave(H // Hkv, 0)
    s = (q @ k.transpose(1, 2)) * d ** -0.5
    s = s.masked_fill(causal, float("-inf"))
    return (s.softmax(-1) @ v).transpose(0, 1).reshape(T, H * d)


def causal_mean3(x):
    """Causal mean over the token and the two before it, the first token
    repeated on the left (the reference's CausalAvgPool1d, kernel 3). x [T, C]."""
    xp = torch.cat([x[:1].expand(2, -1), x], 0)
    return (xp[:-2] + xp[1:-1] + xp[2:]) / 3.0


def heads_kv(x):  # [T, Hkv*d] -> [H, T, d] (GQA groups repeated)
    return x.view(T, Hkv, d).transpose(0, 1).repeat_interleave(H // Hkv, 0)


DT = [(-1) ** j * math.comb(NH - 1, j) for j in range(NH)]
DT = [c / sum(abs(c) for c in DT) for c in DT]


def virtual(x, derivative=True):
    """[H, T, e] -> [H, T, n_h, e]: virtual token m of t is DT[n_h-1-m] * x[t-m]
    (zero before the start): the reference's "dt" expansion after its flip; or
    x repeated ("cte", for a constant gate)."""
    if not derivative:
        return x.unsqueeze(2).expand(-1, -1, NH, -1)
    outs = []
    for m in range(NH):
        sh = x if m == 0 else torch.cat([x.new_zeros(x.shape[0], m, x.shape[2]), x[:, :-m]], 1)
        outs.append(DT[NH - 1 - m] * sh)
    return torch.stack(outs, 2)


def unit_lower_inverse(a):
    """(I - A)^-1 for the strictly lower a = -(beta k) k^T, by forward
    substitution one row at a time as the reference does (row i gains
    sum_j a[i, j] a[j, :i], summed over the full column)."""
    a = a.clone()
    n = a.shape[-1]
    for i in range(1, n):
        row = a[..., i, :].clone().unsqueeze(-1)  # [..., n, 1]
        left = a[..., :, :i].clone()               # [..., n, i]
        a[..., i, :i] = a[..., i, :i] + (row * left).sum(-2)
    return a + torch.eye(n)


def delta_product(q, k, v, alpha, beta):
    """The reference operator's chunked delta product: each [H, T, n_h, e]
    (alpha, beta: e = d), returns [H, T, d] (the last virtual slot)."""
    C = max(c for c in range(1, min(args.chunk, T) + 1) if T % c == 0)
    nc, N = T // C, C * NH
    q, k, v, alpha, beta = (x.reshape(H, nc, N, -1) for x in (q, k, v, alpha, beta))
    kb, vb = k * beta, v * beta
    tinv = unit_lower_inverse(-(kb @ k.transpose(-2, -1)).tril(-1))
    w, u = tinv @ kb, tinv @ vb
    q, w, u, alpha = (x.reshape(H, nc, C, NH, -1) for x in (q, w, u, alpha))
    h0 = torch.full((H, NH, d, d), 1e-6)[:, -1]
    outs = []
    for c in range(nc):
        # every token of the chunk starts from the chunk's entry state
        s = h0.unsqueeze(1).expand(-1, C, -1, -1).clone()  # [H, C, d, d]
        per_order = []
        for m in range(NH):
            qs, ws, us, as_ = q[:, c, :, m], w[:, c, :, m], u[:, c, :, m], alpha[:, c, :, m]
            uval = us - (ws.unsqueeze(-2) @ s).squeeze(-2)
            inter = (qs.unsqueeze(-2) @ s).squeeze(-2)
            per_order.append(qs * uval + inter)
            s = s * as_.unsqueeze(-2) + ws.unsqueeze(-1) @ uval.unsqueeze(-2)
        h0 = s[:, -1]
        outs.append(torch.stack(per_order, 2))  # [H, C, n_h, d]
    return torch.stack(outs, 1)[:, :, :, -1].reshape(H, T, d)


def linear_branch(q, k, v, w):
    """LiZA's linear attention on the shared projections q [T, H*d], k/v [T, Hkv*d] -> [T, D]."""
    f_g = torch.sigmoid(heads_kv(causal_mean3(k)))
    w_g = torch.sigmoid(heads_kv(causal_mean3(v)))  # computed by the reference, unused by delta_product
    del w_g
    alpha, beta = torch.ones_like(f_g), f_g
    qh = Fn.normalize(Fn.silu(q.view(T, H, d).transpose(0, 1)), p=2, dim=-1, eps=1e-6)
    kh = Fn.normalize(Fn.silu(heads_kv(k)), p=2, dim=-1, eps=1e-6)
    vh = heads_kv(v) * d ** -0.5
    o = delta_product(virtual(qh), virtual(kh), virtual(vh), virtual(alpha, False), virtual(beta))
    o = o.transpose(0, 1).reshape(T, H * d)
    o = o / o.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    return proj(w, "o", o)


def layer(w, x):
    a = rms(x, w["n1"])
    q, k, v = proj(w, "q", a), proj(w, "k", a), proj(w, "v", a)
    o_lin = linear_branch(q, k, v, w)
    if not args.once:  # the base attention projects again
        q, k, v = proj(w, "q", a), proj(w, "k", a), proj(w, "v", a)
    o_base = proj(w, "o", softmax_attention(q, k, v))
    soft, lin = (1 - MU) * o_base, MU * o_lin
    out = soft + lin
    torch.allclose(soft, out)  # the reference's logging check, every forward
    x = x + out
    b = rms(x, w["n2"])
    return x + (Fn.silu(b @ w["g"].T) * (b @ w["u"].T)) @ w["dn"].T


def best_of(fn):
    best = 1e30
    for it in range(args.iters + 1):
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        if it > 0:
            best = min(best, t)
    return best


def mm_rate():
    """GFLOP/s of one fp32 product of the step's shape ([T, D] x [D, F]), best
    of 5: the load of a shared machine changes during a run, so the rate is
    taken at the start and at the end."""
    a, b = torch.randn(T, D), torch.randn(F, D)
    best = 1e30
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - t0)
    return 2.0 * T * D * F / best * 1e-9


rate0 = mm_rate()
layers = [make_layer() for _ in range(L)]
x0 = (torch.randn(T, D) * 0.5).requires_grad_(True)  # input grad on: every layer runs its full backward


def stack_step():
    x = x0
    for w in layers:
        x = layer(w, x)
    x.pow(2).mean().backward()


t_layers = best_of(stack_step)
rss_layers = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1048576
per_layer = t_layers / L
w_layer = D * H * d + 2 * D * Hkv * d + H * d * D + 3 * D * F
f_layer = 4.0 * T * w_layer
print(f"PyTorch {torch.__version__} fp32, {torch.get_num_threads()} threads: {L} Llama-1B layers + LiZA "
      f"delta_product (n_h {NH}, chunk {min(args.chunk, T)}{', projections once' if args.once else ''}), "
      f"LoRA r={r}, seq {T}: {t_layers:.3f} s ({per_layer:.3f} s/layer, "
      f"{f_layer / per_layer * 1e-9:.1f} dense GFLOP/s), peak RSS {rss_layers:.2f} GiB")
del layers

t_head = 0.0
if not args.no_head:
    emb = torch.randn(V, D) * 0.02  # tied embedding = head, frozen
    hin = (torch.randn(T, D) * 0.5).requires_grad_(True)
    labels = torch.randint(0, V, (T,))

    def head_step():
        logits = rms(hin, torch.ones(D)) @ emb.T
        Fn.cross_entropy(logits, labels).backward()

    t_head = best_of(head_step)
    f_head = 4.0 * T * V * D
    print(f"head (RMSNorm, {V} x {D} tied, cross-entropy, fwd+bwd): {t_head:.3f} s, "
          f"{f_head / t_head * 1e-9:.1f} dense GFLOP/s")
    del emb

rate1 = mm_rate()
print(f"PyTorch fp32 matmul [{T} x {D}] x [{D} x {F}]: {rate0:.1f} GFLOP/s at the start, {rate1:.1f} at the end")
S = args.scale_to
t_step = per_layer * S + t_head
flops = f_layer * S + (0.0 if args.no_head else 4.0 * T * V * D)
print(f"step, {S} layers{'' if args.no_head else ' + head'} (layers scaled from {L}): {t_step:.3f} s/step, "
      f"{T / t_step:.2f} tokens/s, {flops / t_step * 1e-9:.1f} dense GFLOP/s")
print("JSON " + json.dumps(dict(torch=torch.__version__, threads=torch.get_num_threads(), seq=T, layers_run=L,
                                scale_to=S, order=NH, once=args.once, head=not args.no_head, s_per_layer=per_layer,
                                s_head=t_head, s_step=t_step, tokens_per_s=T / t_step, gflops=flops / t_step * 1e-9,
                                peak_rss_gib=rss_layers, matmul_gflops=[rate0, rate1])))
