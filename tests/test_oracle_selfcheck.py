"""test_oracle_selfcheck - checks of the PyTorch oracle (tests/py/oracle.py)
itself, without the C code: models are built here in Python.

- a loop-by-loop numpy re-implementation of LIZA.md section 1 (explicit
  per-query/per-key attention with the window/document rule, RoPE written as
  x_i cos - x_{i+d/2} sin, explicit kv head h // g) gives the same logits;
- a packed row gives the same logits as each document run as its own row;
- sliding window >= T equals no window, a shorter one changes the result;
- tied equals untied with lm_head = embedding (logits; the tied embedding
  gradient is the sum of the untied embedding and lm_head gradients);
- GQA equals MHA with each kv head's weights repeated g times;
- LoRA equals the merged weight W + s B A (s = alpha/r, alpha/sqrt(r));
- float64 central finite differences agree with autograd for scalar
  parameters of every kind;
- llama3 scaling: equals Meta's reference loop, factor 1 and a huge original
  context are plain RoPE, the bands divide / keep / interpolate continuously;
- default labels and the loss (mean over non-ignored labels);
- run_case on a synthetic model dir + dump written here returns exactly what
  the oracle computes directly, compare() reports 0 for it and inf for a
  missing key.
LiZA / MaG (LIZA.md sections 2, 3; docs/dump.md "LiZA semantics fixed here"):
- `liza_recurrence` equals a numpy re-implementation written as explicit
  matrix products S <- (I - k (b*k)^T) a S + k (b*v)^T, with the dt expansion
  as repeated halved backward differences over a zero-padded document, rot as
  complex multiplication and phi element by element, for every order 1..3,
  trick, scalar/per-token/vector beta, decay on/off, linear on/off, several C
  and document starts; n_h = 1, beta = 1, alpha = 1 is the plain delta rule;
- n_h = 1: rot == dt == rdt == plain DeltaNet (exactly);
- linear: true does not depend on C (exactly), linear: false does;
- the whole LiZA model equals a loop-by-loop numpy model (pooling, gates,
  feature maps, GQA, RMS norm, o projection with LoRA, base_scale_attn, MaG
  additive / cross gate, scheduled and learnable mu);
- a packed row equals its documents run separately (LiZA on, every trick,
  linear false with a small C, decay), and batch rows are independent;
- GQA equals MHA with the kv weights repeated (LiZA on);
- mu = 0 without cross gate (and with it) is the base model exactly; the pure
  linear model (mu = 1, no cross gate) does not depend on the softmax branch;
- MaG schedules (constant, gradual, cyclic) and the preset table;
- float64 central finite differences agree with autograd for a scalar and a
  vector mag_logit, LoRA A/B entries, a bias and a norm weight with LiZA on;
- run_case reads a synthetic LiZA dump (learnable vector logits) correctly.
Prints "test_oracle_selfcheck: N passed, N failed"; exit 1 on failure.
"""
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
import safetensors_np as stnp  # noqa: E402
import oracle as O  # noqa: E402
import testkit  # noqa: E402

NAME = "test_oracle_selfcheck"
kit = testkit.Checker(NAME)
check = kit.check
torch.set_default_dtype(torch.float64)


ARCH_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def make_config(arch="llama", D=16, H=4, Hkv=2, d=None, F=24, V=23, L=2, tie=False, window=None,
                scaling=None, theta=10000.0, eps=1e-5):
    c = {"architectures": [ARCH_CLASS[arch]], "hidden_size": D, "intermediate_size": F,
         "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": Hkv,
         "vocab_size": V, "rms_norm_eps": eps, "rope_theta": theta, "hidden_act": "silu",
         "tie_word_embeddings": tie, "rope_scaling": scaling}
    if d:
        c["head_dim"] = d
    if arch == "mistral":
        c["sliding_window"] = window
    return c


def make_params(cfg, seed=0, std=0.3):
    g = np.random.default_rng(seed)
    p = {}
    for name, shape in O.hf_tensor_shapes(cfg).items():
        if name.endswith("norm.weight") or "layernorm" in name:
            a = 1 + 0.1 * g.standard_normal(shape)
        else:
            a = std * g.standard_normal(shape)
        p[name] = torch.tensor(a)
    return p


def make_lora(cfg, targets, r=4, seed=1):
    g = np.random.default_rng(seed)
    lora = {}
    for l in range(cfg.L):
        for m in targets:
            fin, fout = O.lora_in_out(cfg, m)
            A = torch.tensor(g.uniform(-1, 1, (r, fin)) / math.sqrt(fin))
            B = torch.tensor(g.uniform(-1, 1, (fout, r)) / math.sqrt(r))
            lora[O.module_name(l, m)] = (A, B)
    return lora


def rel(a, b):
    return O.max_rel(np.asarray(a.detach() if torch.is_tensor(a) else a),
                     np.asarray(b.detach() if torch.is_tensor(b) else b))


# --------------------------------------------------------------- naive model

def naive_forward(cfg, p, lora, s, ids, doc_starts, liza=None, mag=None):
    """LIZA.md section 1 with explicit loops (numpy float64); with `liza` (a
    LizaConfig) sections 2 and 3 too (`naive_liza_o`), mag: layer -> logit array."""
    P = {k: v.detach().numpy() for k, v in p.items()}
    Lr = {k: (a.detach().numpy(), b.detach().numpy()) for k, (a, b) in lora.items()}

    def lin(mod, x):
        y = x @ P[mod + ".weight"].T
        if mod + ".bias" in P:
            y = y + P[mod + ".bias"]
        if mod in Lr:
            A, B = Lr[mod]
            y = y + s * (x @ A.T) @ B.T
        return y

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.eps) * w

    inv = O.rope_inv_freq(cfg.d, cfg.theta, cfg.rope_scaling).numpy()
    half = cfg.d // 2
    out = []
    for row, starts in zip(ids, doc_starts):
        T = len(row)
        doc = [max(k for k, st in enumerate(starts) if st <= t) for t in range(T)]
        pos = [t - starts[doc[t]] for t in range(T)]

        def rope(vec, t):
            o = vec.copy()
            for i in range(half):
                a = pos[t] * inv[i]
                o[i] = vec[i] * math.cos(a) - vec[i + half] * math.sin(a)
                o[i + half] = vec[i + half] * math.cos(a) + vec[i] * math.sin(a)
            return o

        x = P["model.embed_tokens.weight"][row]
        for l in range(cfg.L):
            pre = "model.layers.%d." % l
            a = norm(x, P[pre + "input_layernorm.weight"])
            q = lin(pre + "self_attn.q_proj", a)
            k = lin(pre + "self_attn.k_proj", a)
            v = lin(pre + "self_attn.v_proj", a)
            att = np.zeros((T, cfg.H * cfg.d))
            g = cfg.H // cfg.Hkv
            for h in range(cfg.H):
                kh = h // g
                for i in range(T):
                    qi = rope(q[i, h * cfg.d:(h + 1) * cfg.d], i)
                    vis = [j for j in range(T) if doc[j] == doc[i] and j <= i
                           and (cfg.window is None or j > i - cfg.window)]
                    sc = np.array([qi @ rope(k[j, kh * cfg.d:(kh + 1) * cfg.d], j) / math.sqrt(cfg.d) for j in vis])
                    w = np.exp(sc - sc.max())
                    w /= w.sum()
                    att[i, h * cfg.d:(h + 1) * cfg.d] = sum(wj * v[j, kh * cfg.d:(kh + 1) * cfg.d] for wj, j in zip(w, vis))
            o_base = lin(pre + "self_attn.o_proj", att)
            if liza is None:
                x = x + o_base
            else:
                x = x + naive_liza_o(cfg, liza, q, k, v, o_base, starts,
                                     lambda y, m=pre + "self_attn.o_proj": lin(m, y),
                                     None if mag is None else np.asarray(mag[l].detach()))
            b = norm(x, P[pre + "post_attention_layernorm.weight"])
            gt = lin(pre + "mlp.gate_proj", b)
            x = x + lin(pre + "mlp.down_proj", gt / (1 + np.exp(-gt)) * lin(pre + "mlp.up_proj", b))
        x = norm(x, P["model.norm.weight"])
        E = P["model.embed_tokens.weight"] if cfg.tie else P["lm_head.weight"]
        out.append(x @ E.T)
    return np.stack(out)


# ------------------------------------------------------------ naive LiZA (numpy)

def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_phi(S):
    """phi element by element (LIZA.md 2.5)."""
    out = np.empty_like(S)
    for r in range(S.shape[0]):
        n = math.sqrt(sum(S[r, c] ** 2 for c in range(S.shape[1])))
        for c in range(S.shape[1]):
            x = 2.0 * S[r, c] / (n + 1e-6)
            gelu = 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
            out[r, c] = S[r, c] / 2.0 * gelu
    return out


def np_expand(x, starts, m, order, trick):
    """Virtual token m: dt = m halved backward differences over the zero-padded
    document, rot = complex multiplication of the pairs (2i, 2i+1) by e^{i 2 pi m / n_h}."""
    T, d = x.shape
    start_of = [max(st for st in starts if st <= t) for t in range(T)]
    if trick == "rdt":
        return 0.5 * (np_expand(x, starts, m, order, "dt") + np_expand(x, starts, m, order, "rot"))
    if trick == "dt":
        cur = x.copy()
        for _ in range(m):
            prev = np.array([cur[t - 1] if t - 1 >= start_of[t] else np.zeros(d) for t in range(T)])
            cur = (cur - prev) / 2.0
        return cur
    p = d // 2
    z = (x[:, 0:2 * p:2] + 1j * x[:, 1:2 * p:2]) * np.exp(1j * 2 * math.pi * m / order)
    out = x.copy()
    out[:, 0:2 * p:2] = z.real
    out[:, 1:2 * p:2] = z.imag
    return out


def np_recurrence(q, k, v, beta, alpha, starts, order, trick, linear, C):
    """Matrix form: S <- (I - k (b*k)^T)(a S) + k (b*v)^T per virtual step,
    beta [T, d], alpha [T] (numpy), starts: document start positions."""
    T, d = k.shape
    K = [np_expand(k, starts, m, order, trick) for m in range(order)]
    V = [np_expand(v, starts, m, order, trick) for m in range(order)]
    I = np.eye(d)
    S = np.zeros((d, v.shape[1]))
    y = np.zeros((T, v.shape[1]))
    for t in range(T):
        s0 = max(st for st in starts if st <= t)
        if t == s0:
            S = np.zeros_like(S)
        S = alpha[t] * S
        for m in range(order):
            km, vm = K[m][t], V[m][t]
            S = (I - np.outer(km, beta[t] * km)) @ S + np.outer(km, beta[t] * vm)
        y[t] = S.T @ q[t]
        if not linear and (t - s0 + 1) % C == 0:
            S = np_phi(S)
    return y


def naive_mu(lz):
    if lz.mag_mode == "constant":
        return lz.mu0
    if lz.mag_mode == "gradual":
        return lz.mu0 + (lz.mu1 - lz.mu0) * (min(lz.step, lz.steps) / lz.steps)
    if lz.mag_mode == "cyclic":
        return lz.values[int(lz.step / lz.period) % len(lz.values)]
    raise ValueError(lz.mag_mode)


def naive_liza_o(cfg, lz, q, k, v, o_base, starts, o_proj, mag_logit):
    """o_attn of one layer and one row (numpy): LiZA from the raw q [T,H*d],
    k, v [T,Hkv*d], then MaG with o_base [T,D]."""
    T = q.shape[0]
    d, g = cfg.d, cfg.H // cfg.Hkv
    start_of = [max(st for st in starts if st <= t) for t in range(T)]

    def pool(x):
        return np.array([(x[max(t - 2, start_of[t])] + x[max(t - 1, start_of[t])] + x[t]) / 3.0 for t in range(T)])

    def feat(x):
        u = x * np_sigmoid(x)
        return np.array([u[t] / max(np.linalg.norm(u[t]), 1e-6) for t in range(T)])

    ys = []
    for h in range(cfg.H):
        kh = h // g
        qr, kr, vr = q[:, h * d:(h + 1) * d], k[:, kh * d:(kh + 1) * d], v[:, kh * d:(kh + 1) * d]
        gates = {"k": np_sigmoid(pool(kr)), "v": np_sigmoid(pool(vr))}
        gates["kv"] = gates["k"] * gates["v"]
        beta = np.full((T, d), 0.5) if lz.beta_gate == "c" else gates[lz.beta_gate]
        alpha = np.ones(T) if lz.alpha_gate == "c" else np.array([np.mean(gates[lz.alpha_gate][t]) for t in range(T)])
        ys.append(np_recurrence(feat(qr), feat(kr), vr / math.sqrt(d), beta, alpha, starts,
                                lz.order, lz.trick, lz.linear, lz.chunk))
    y = np.concatenate(ys, axis=1)
    y = np.array([y[t] / math.sqrt(np.mean(y[t] ** 2) + 1e-6) for t in range(T)])
    o_lin = o_proj(y)
    if lz.base_scale_attn:
        o_lin = np.array([math.sqrt(np.mean(o_base[t] ** 2) + 1e-5) * o_lin[t] for t in range(T)])
    mu = np_sigmoid(mag_logit) if lz.mag_mode == "learnable" else naive_mu(lz)
    out = (1 - mu) * o_base + mu * o_lin
    if lz.cross_gate:
        out = out + ((1 - mu) * o_base) * (mu * o_lin)
    return out


def meta_llama3_reference(freqs, factor, low_ff, high_ff, old_ctx):
    """The loop form of Meta's llama3 `apply_scaling` (the origin of the transformers code)."""
    low_wl, high_wl = old_ctx / low_ff, old_ctx / high_ff
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(f)
        elif wl > low_wl:
            out.append(f / factor)
        else:
            sm = (old_ctx / wl - low_ff) / (high_ff - low_ff)
            out.append((1 - sm) * f / factor + sm * f)
    return np.array(out)


# ------------------------------------------------------------------- checks

def check_naive():
    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    for arch, kw in [("llama", dict(H=4, Hkv=2)), ("mistral", dict(H=4, Hkv=1, d=6, window=3)),
                     ("qwen2", dict(H=2, Hkv=2, tie=True)), ("llama", dict(H=2, Hkv=1, d=8, scaling=scaling))]:
        cfg = O.ModelConfig.from_dict(make_config(arch, **kw))
        p = make_params(cfg, seed=3)
        lora = make_lora(cfg, O.ATTN_MODULES + ["up_proj"])
        T = 20 if cfg.rope_scaling else 11
        ids = np.random.default_rng(5).integers(0, cfg.V, (2, T)).tolist()
        ds = [[0, 4, 7], [0]]
        got = O.Decoder(cfg, p, lora, 1.5).forward(ids, ds)
        want = naive_forward(cfg, p, lora, 1.5, ids, ds)
        e = rel(got, want)
        check(e < 1e-12, "naive loop model vs oracle (%s %s): %.3g" % (arch, kw, e))


def check_packing():
    for arch, kw in [("llama", {}), ("mistral", dict(window=3)), ("qwen2", dict(tie=True))]:
        cfg = O.ModelConfig.from_dict(make_config(arch, **kw))
        p = make_params(cfg, seed=1)
        m = O.Decoder(cfg, p, make_lora(cfg, O.ATTN_MODULES), 2.0)
        rng = np.random.default_rng(2)
        row = rng.integers(0, cfg.V, 16).tolist()
        starts = [0, 5, 11]
        packed = m.forward([row], [starts])
        bounds = starts + [16]
        sep = torch.cat([m.forward([row[a:b]], [[0]]) for a, b in zip(bounds, bounds[1:])], dim=1)
        e = rel(packed, sep)
        check(e < 1e-13, "%s: packed row vs separate documents: %.3g" % (arch, e))
        unpacked = m.forward([row], [[0]])
        check(rel(unpacked, sep) > 1e-3, "%s: ignoring doc_starts should change the logits" % arch)
        # two rows with different doc_starts in one batch = each row alone
        row2 = rng.integers(0, cfg.V, 16).tolist()
        both = m.forward([row, row2], [starts, [0, 2, 9]])
        e = max(rel(both[0:1], packed), rel(both[1:2], m.forward([row2], [[0, 2, 9]])))
        check(e < 1e-13, "%s: batch rows are independent: %.3g" % (arch, e))


def check_window():
    T = 12
    base = O.ModelConfig.from_dict(make_config("mistral", window=None))
    p = make_params(base, seed=4)
    ids = np.random.default_rng(3).integers(0, base.V, (2, T)).tolist()
    ds = [[0, 5], [0]]
    ref = O.Decoder(base, p).forward(ids, ds)
    for W in (T, T + 5, 1000):
        cfg = O.ModelConfig.from_dict(make_config("mistral", window=W))
        e = rel(O.Decoder(cfg, p).forward(ids, ds), ref)
        check(e == 0.0, "window %d >= T=%d should equal no window: %.3g" % (W, T, e))
    cfg = O.ModelConfig.from_dict(make_config("mistral", window=T - 1))
    out = O.Decoder(cfg, p).forward(ids, [[0], [0]])
    e = rel(out, O.Decoder(base, p).forward(ids, [[0], [0]]))
    check(e > 1e-3, "window T-1 must change the last position: %.3g" % e)
    # only the positions with a key outside the window change
    same = (out[:, :T - 1] - O.Decoder(base, p).forward(ids, [[0], [0]])[:, :T - 1]).abs().max().item()
    check(same == 0.0, "window T-1 must not change positions < T-1: %.3g" % same)
    # window 1: every token attends only to itself
    cfg1 = O.ModelConfig.from_dict(make_config("mistral", window=1, L=1))
    p1 = make_params(cfg1, seed=5)
    out = O.Decoder(cfg1, p1).forward([[3, 4, 5]], [[0]])
    alone = torch.cat([O.Decoder(cfg1, p1).forward([[t]], [[0]]) for t in (3, 4, 5)], dim=1)
    check(rel(out, alone) < 1e-13, "window 1: each token sees only itself")
    # absent sliding_window = 4096 (MistralConfig default), qwen2 ignores its field
    c = make_config("mistral")
    del c["sliding_window"]
    check(O.ModelConfig.from_dict(c).window == 4096, "mistral absent sliding_window = 4096")
    c = make_config("qwen2")
    c["sliding_window"] = 4
    check(O.ModelConfig.from_dict(c).window is None, "qwen2 ignores sliding_window")


def check_tied():
    for arch in ("llama", "qwen2"):
        ct = O.ModelConfig.from_dict(make_config(arch, tie=True))
        cu = O.ModelConfig.from_dict(make_config(arch, tie=False))
        pt = make_params(ct, seed=6)
        E = pt["model.embed_tokens.weight"]
        ids = np.random.default_rng(1).integers(0, ct.V, (2, 9)).tolist()
        labels = torch.tensor(O.default_labels(ids, [[0], [0, 4]]))
        Et = E.clone().requires_grad_(True)
        lt = O.Decoder(ct, dict(pt, **{"model.embed_tokens.weight": Et})).forward(ids, [[0], [0, 4]])
        Eu, H = E.clone().requires_grad_(True), E.clone().requires_grad_(True)
        lu = O.Decoder(cu, dict(pt, **{"model.embed_tokens.weight": Eu, "lm_head.weight": H})).forward(ids, [[0], [0, 4]])
        check(rel(lt, lu) == 0.0, "%s: tied == untied with lm_head = embedding" % arch)
        O.cross_entropy(lt, labels).backward()
        O.cross_entropy(lu, labels).backward()
        e = rel(Et.grad, Eu.grad + H.grad)
        check(e < 1e-13, "%s: tied embedding grad = embedding grad + lm_head grad: %.3g" % (arch, e))
        check(rel(Eu.grad, Eu.grad + H.grad) > 1e-2, "%s: both gradient parts matter" % arch)


def check_gqa():
    cg = O.ModelConfig.from_dict(make_config("qwen2", H=4, Hkv=2, d=6))
    cm = O.ModelConfig.from_dict(make_config("qwen2", H=4, Hkv=4, d=6))
    p = make_params(cg, seed=8)
    pm = dict(p)
    g, d = 2, 6
    for l in range(cg.L):
        for m in ("k_proj", "v_proj"):
            for suf in (".weight", ".bias"):
                n = "model.layers.%d.self_attn.%s%s" % (l, m, suf)
                heads = p[n].reshape(cg.Hkv, d, *p[n].shape[1:])
                pm[n] = heads.repeat_interleave(g, dim=0).reshape(cg.H * d, *p[n].shape[1:])
    ids = [[1, 5, 7, 2, 9, 3, 3, 0]]
    e = rel(O.Decoder(cg, p).forward(ids, [[0, 3]]), O.Decoder(cm, pm).forward(ids, [[0, 3]]))
    check(e < 1e-13, "GQA equals MHA with kv head h//g weights repeated: %.3g" % e)


def check_lora_merge():
    cfg = O.ModelConfig.from_dict(make_config("qwen2", H=4, Hkv=2))
    p = make_params(cfg, seed=9)
    targets = O.ATTN_MODULES + O.MLP_MODULES
    r, alpha = 4, 8.0
    lora = make_lora(cfg, targets, r=r)
    ids = [[1, 2, 3, 4, 5, 6, 7]]
    for s in (alpha / r, alpha / math.sqrt(r)):
        merged = dict(p)
        for mod, (A, B) in lora.items():
            merged[mod + ".weight"] = p[mod + ".weight"] + s * B @ A
        e = rel(O.Decoder(cfg, p, lora, s).forward(ids, [[0]]), O.Decoder(cfg, merged).forward(ids, [[0]]))
        check(e < 1e-12, "LoRA path == merged W + s B A (s=%g): %.3g" % (s, e))


def check_finite_differences():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
    for arch, kw in [("qwen2", dict(H=4, Hkv=2, d=6, scaling=scaling)), ("mistral", dict(window=3, tie=True))]:
        cfg = O.ModelConfig.from_dict(make_config(arch, **kw))
        p = make_params(cfg, seed=10)
        lora = make_lora(cfg, ["q_proj", "v_proj", "down_proj"])
        ids = np.random.default_rng(4).integers(0, cfg.V, (2, 10)).tolist()
        ds = [[0, 3, 7], [0, 6]]
        labels = torch.tensor(O.default_labels(ids, ds))
        s = 1.7
        leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
        ll = {k: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for k, (a, b) in lora.items()}

        def loss_fn(P, LR):
            return O.cross_entropy(O.Decoder(cfg, P, LR, s).forward(ids, ds), labels)

        loss = loss_fn(leaves, ll)
        loss.backward()
        picks = [("model.embed_tokens.weight", (ids[0][1], 2)), ("model.layers.0.input_layernorm.weight", (3,)),
                 ("model.layers.1.self_attn.k_proj.weight", (1, 4)), ("model.layers.0.mlp.gate_proj.weight", (5, 0)),
                 ("model.norm.weight", (7,)), ("model.layers.1.post_attention_layernorm.weight", (2,))]
        if cfg.bias:
            picks.append(("model.layers.0.self_attn.q_proj.bias", (2,)))
        if not cfg.tie:
            picks.append(("lm_head.weight", (ids[1][3], 1)))
        h = 1e-6
        for name, idx in picks:
            def at(delta):
                P = {k: v.detach().clone() for k, v in leaves.items()}
                P[name][idx] += delta
                return loss_fn(P, {k: (a.detach(), b.detach()) for k, (a, b) in ll.items()}).item()
            fd = (at(h) - at(-h)) / (2 * h)
            ag = leaves[name].grad[idx].item()
            check(abs(fd - ag) <= 1e-6 * max(1.0, abs(ag)) and abs(ag) > 1e-6,
                  "%s finite difference %s%s: fd %.10g autograd %.10g" % (arch, name, idx, fd, ag))
        for mod, which, idx in [("model.layers.0.self_attn.q_proj", 0, (1, 3)), ("model.layers.1.self_attn.v_proj", 1, (2, 1)),
                                ("model.layers.1.mlp.down_proj", 0, (0, 5))]:
            def at(delta):
                LR = {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in ll.items()}
                LR[mod][which][idx] += delta
                return loss_fn({k: v.detach() for k, v in leaves.items()}, LR).item()
            fd = (at(h) - at(-h)) / (2 * h)
            ag = ll[mod][which].grad[idx].item()
            check(abs(fd - ag) <= 1e-6 * max(1.0, abs(ag)) and abs(ag) > 1e-6,
                  "%s finite difference %s lora_%s%s: fd %.10g autograd %.10g" % (arch, mod, "AB"[which], idx, fd, ag))


def check_llama3():
    d, theta = 16, 10000.0
    inv = O.rope_inv_freq(d, theta)
    check(rel(inv, [theta ** (-2 * i / d) for i in range(d // 2)]) < 1e-15, "inv_freq_i = theta^(-2i/d)")
    base = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}
    for sc in (base, dict(base, original_max_position_embeddings=8192), dict(base, factor=32.0, high_freq_factor=2.0),
               dict(base, original_max_position_embeddings=100, low_freq_factor=2.0)):
        got = O.llama3_inv_freq(inv, sc).numpy()
        want = meta_llama3_reference(inv.tolist(), sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"],
                                     sc["original_max_position_embeddings"])
        check(rel(got, want) < 1e-15, "llama3 == Meta's reference loop for %s" % sc)
    # factor 1: identity for every band
    e = rel(O.llama3_inv_freq(inv, dict(base, factor=1.0)), inv)
    check(e < 1e-15, "llama3 factor 1 is plain RoPE: %.3g" % e)
    # a huge original context: every wavelength is 'high frequency' -> unchanged
    e = rel(O.llama3_inv_freq(inv, dict(base, original_max_position_embeddings=1e12)), inv)
    check(e == 0.0, "llama3 with every wavelength < orig/high_freq_factor is plain RoPE: %.3g" % e)
    # bands of the default test setting: high (i=0), medium (i=1), low (i>=2)
    got = O.llama3_inv_freq(inv, base)
    wl = 2 * math.pi / inv
    hi_b, lo_b = 32 / 4.0, 32 / 1.0
    hi, lo = wl < hi_b, wl > lo_b
    med = ~hi & ~lo
    check(hi.any() and med.any() and lo.any(), "all three bands present for d=16, orig 32")
    check(torch.equal(got[hi], inv[hi]), "high frequencies unchanged")
    check(rel(got[lo], inv[lo] / 8.0) < 1e-15, "low frequencies divided by factor")
    check(bool(((got[med] < inv[med]) & (got[med] > inv[med] / 8.0)).all()), "medium frequencies in between")
    # continuity at both band edges: smooth = 0 at wavelen = low_freq_wavelen, 1 at high_freq_wavelen
    edge = torch.tensor([2 * math.pi / lo_b, 2 * math.pi / hi_b])
    g = O.llama3_inv_freq(edge, base)
    check(rel(g, torch.tensor([edge[0] / 8.0, edge[1]])) < 1e-14, "llama3 continuous at the band edges")
    # in the model: factor 1 scaling == no scaling; a real factor changes only far positions
    c0 = O.ModelConfig.from_dict(make_config("llama", H=2, Hkv=1, d=8, D=16))
    c1 = O.ModelConfig.from_dict(make_config("llama", H=2, Hkv=1, d=8, D=16, scaling=dict(base, factor=1.0)))
    p = make_params(c0, seed=11)
    ids = np.random.default_rng(6).integers(0, c0.V, (1, 40)).tolist()
    check(rel(O.Decoder(c0, p).forward(ids, [[0]]), O.Decoder(c1, p).forward(ids, [[0]])) < 1e-14,
          "model with llama3 factor 1 == plain RoPE model")
    c8 = O.ModelConfig.from_dict(make_config("llama", H=2, Hkv=1, d=8, D=16, scaling=base))
    check(rel(O.Decoder(c0, p).forward(ids, [[0]]), O.Decoder(c8, p).forward(ids, [[0]])) > 1e-3,
          "llama3 factor 8 changes the model")
    # old-style key "type"
    c = make_config("llama", scaling={k if k != "rope_type" else "type": v for k, v in base.items()})
    check(O.ModelConfig.from_dict(c).rope_scaling is not None, "rope_scaling 'type' key accepted")
    try:
        O.ModelConfig.from_dict(make_config("llama", scaling={"rope_type": "yarn", "factor": 2.0}))
        check(False, "yarn rope_scaling must be rejected")
    except ValueError:
        check(True, "")


def check_rope_relative():
    # q.k after RoPE depends only on the position difference
    d = 8
    inv = O.rope_inv_freq(d, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, d, generator=g), torch.randn(1, 1, 1, d, generator=g)

    def dot(pq, pk):
        cq, sq = O.rope_tables(torch.tensor([[pq]]), inv, torch.float64)
        ck, sk = O.rope_tables(torch.tensor([[pk]]), inv, torch.float64)
        return (O.apply_rope(q, cq, sq) * O.apply_rope(k, ck, sk)).sum().item()
    check(abs(dot(7, 3) - dot(14, 10)) < 1e-13 and abs(dot(7, 3) - dot(7, 4)) > 1e-6, "RoPE is relative")
    # rotate_half pairing: feature i pairs with i + d/2
    x = torch.arange(1.0, d + 1).reshape(1, 1, 1, d)
    c, s = O.rope_tables(torch.tensor([[1]]), inv, torch.float64)
    y = O.apply_rope(x, c, s)[0, 0, 0]
    a = float(inv[0])
    check(abs(y[0] - (1 * math.cos(a) - 5 * math.sin(a))) < 1e-14 and abs(y[4] - (5 * math.cos(a) + 1 * math.sin(a))) < 1e-14,
          "RoPE pairs feature 0 with feature d/2")


def check_labels_loss():
    ids = [[5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6]]
    lab = O.default_labels(ids, [[0, 3], [0]])
    check(lab == [[6, 7, -100, 9, 10, -100], [2, 3, 4, 5, 6, -100]], "default labels: %s" % lab)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor(lab)
    lp = torch.log_softmax(logits, -1)
    terms = [-lp[r, t, labels[r, t]] for r in range(2) for t in range(6) if labels[r, t] != -100]
    check(abs(O.cross_entropy(logits, labels).item() - (sum(terms) / len(terms)).item()) < 1e-14,
          "loss = mean over the non-ignored labels")


def check_run_case():
    """run_case on a model dir and a dump both written here (no C code)."""
    tmp = tempfile.mkdtemp(prefix="tptt-oracle-self-")
    try:
        for arch, kw, trainable in [("qwen2", dict(H=4, Hkv=2, tie=True), "lora"), ("mistral", dict(window=4), "all"),
                                    ("llama", dict(d=6), "projections")]:
            cj = make_config(arch, **kw)
            cfg = O.ModelConfig.from_dict(cj)
            p = make_params(cfg, seed=12)
            mdir = os.path.join(tmp, arch)
            os.makedirs(mdir)
            with open(os.path.join(mdir, "config.json"), "w") as f:
                json.dump(cj, f)
            # BF16 weights: the oracle must decode them exactly
            stnp.save(os.path.join(mdir, "model.safetensors"), {k: ("BF16", v.numpy()) for k, v in p.items()})
            _, frozen = stnp.load_model_dir(mdir)
            pf = {k: torch.tensor(v.astype(np.float64)) for k, v in frozen.items()}
            targets = O.ATTN_MODULES + (["up_proj"] if trainable == "lora" else [])
            r, alpha = 4, 6.0
            lora = make_lora(cfg, targets, r=r) if trainable == "lora" else {}
            lora = {k: (a.float().double(), b.float().double()) for k, (a, b) in lora.items()}
            s = alpha / math.sqrt(r)
            ids = np.random.default_rng(7).integers(0, cfg.V, (2, 12)).tolist()
            ds = [[0, 4, 9], [0, 6]]
            labels = O.default_labels(ids, ds)
            if trainable == "lora":
                keys = {O.PREFIX + m + ".lora_" + w + ".weight": t for m, (a, b) in lora.items() for w, t in (("A", a), ("B", b))}
            elif trainable == "all":
                keys = {O.PREFIX + n: t for n, t in pf.items()}
            else:
                keys = {O.PREFIX + O.module_name(l, m) + ".weight": pf[O.module_name(l, m) + ".weight"]
                        for l in range(cfg.L) for m in targets}
            leaves = {k: v.clone().requires_grad_(True) for k, v in keys.items()}
            P = dict(pf)
            LR = {}
            for k, v in leaves.items():
                if ".lora_" in k:
                    mod = k[len(O.PREFIX):].rsplit(".lora_", 1)[0]
                    LR.setdefault(mod, [None, None])["AB".index(k[-8])] = v
                else:
                    P[k[len(O.PREFIX):]] = v
            logits = O.Decoder(cfg, P, {m: tuple(v) for m, v in LR.items()}, s).forward(ids, ds)
            loss = O.cross_entropy(logits, torch.tensor(labels))
            loss.backward()
            tensors = {"logits": ("F32", logits.detach().numpy()), "loss": ("F32", loss.detach().numpy())}
            for k, v in leaves.items():
                tensors[k] = ("F32", v.detach().numpy())
                tensors[k + ".grad"] = ("F32", v.grad.numpy())
            conf = {"model_type": "tptt", "trainable": trainable, "compute_matmul": "f32",
                    "lora_config": {"r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": targets,
                                    "use_rslora": True, "init": "random"}}
            dpath = os.path.join(tmp, arch + ".dump.safetensors")
            stnp.save(dpath, tensors, {"format": "pt", "config": json.dumps(conf),
                                       "batch": json.dumps({"input_ids": ids, "labels": labels, "doc_starts": ds})})
            info = {}
            ref = O.run_case(mdir, dpath, info)
            dump, _ = stnp.load(dpath)
            rows = O.compare(dump, ref)
            want_keys = {"logits", "loss"} | {k + ".grad" for k in keys}
            check(set(ref) == want_keys, "%s/%s: run_case keys %s" % (arch, trainable, sorted(set(ref) ^ want_keys)))
            worst = max(max(mx, rms) for _, _, mx, rms in rows)
            # the dump was rounded to F32: errors at that level, not more
            check(worst < 1e-6, "%s/%s: run_case vs direct computation: worst %.3g" % (arch, trainable, worst))
            check(info["lora_scale"] == (s if lora else 1.0), "%s: LoRA scale %s" % (arch, info["lora_scale"]))
            # compare() flags a missing gradient and a wrong one
            k = sorted(keys)[0] + ".grad"
            d2 = dict(dump)
            del d2[k]
            check(any(key == k and mx == math.inf for _, key, mx, _ in O.compare(d2, ref)), "compare flags a missing key")
            d2 = dict(dump)
            d2[k] = dump[k] * 1.01
            e = [rms for _, key, _, rms in O.compare(d2, ref) if key == k][0]
            check(abs(e - 0.01) < 1e-4, "compare: a 1%% error reads as %.4g" % e)
            # the oracle sees the frozen weights: a corrupt model dir changes the logits
            if trainable == "lora":
                stnp.save(os.path.join(mdir, "model.safetensors"),
                          {k: ("BF16", (v * (1.05 if k == "model.norm.weight" else 1.0)).numpy()) for k, v in p.items()})
                bad = O.run_case(mdir, dpath)
                check(O.max_rel(dump["logits"], bad["logits"]) > 1e-3, "frozen weights are read from the model dir")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_classes():
    for key, cls in [("logits", "logits"), ("loss", "loss"),
                     ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.grad", "lora_A"),
                     ("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight", "lora_B"),
                     ("base_model.model.model.embed_tokens.weight.grad", "embed"),
                     ("base_model.model.lm_head.weight.grad", "lm_head"),
                     ("base_model.model.model.norm.weight.grad", "norm"),
                     ("base_model.model.model.layers.0.post_attention_layernorm.weight", "norm"),
                     ("base_model.model.model.layers.0.self_attn.k_proj.bias.grad", "bias"),
                     ("base_model.model.model.layers.0.self_attn.o_proj.weight.grad", "attn_w"),
                     ("base_model.model.model.layers.0.mlp.up_proj.weight.grad", "mlp_w")]:
        check(O.tensor_class(key) == cls, "tensor_class(%s) = %s want %s" % (key, O.tensor_class(key), cls))
    check(O.max_rel([1.0, 2.0], [1.0, 4.0]) == 0.5 and abs(O.rms_rel([3.0, 0.0], [0.0, 4.0]) - 1.25) < 1e-15,
          "max_rel / rms_rel definitions")
    check(O.max_rel([0.0], [0.0]) == 0.0 and O.rms_rel([1e-30], [0.0]) == math.inf, "zero references")


# ------------------------------------------------------------ LiZA / MaG checks

def rand_heads(T, d, seed, dv=None):
    g = np.random.default_rng(seed)
    q = torch.tensor(g.standard_normal((T, d)))
    k = O.liza_feature(torch.tensor(g.standard_normal((T, d))))
    v = torch.tensor(g.standard_normal((T, dv or d))) * 0.5
    return O.liza_feature(q), k, v, g


def check_liza_recurrence():
    T, d = 11, 5
    q, k, v, g = rand_heads(T, d, 20)
    # n_h = 1, beta = 1 (vector), alpha = 1: the plain delta rule (I - k k^T) S + k v^T
    S = np.zeros((d, d))
    want = []
    for t in range(T):
        kt, vt = k[t].numpy(), v[t].numpy()
        S = (np.eye(d) - np.outer(kt, kt)) @ S + np.outer(kt, vt)
        want.append(S.T @ q[t].numpy())
    got = O.liza_recurrence(q, k, v, torch.ones(T, d), None, [0], 1, "dt", True, 64)
    check(rel(got, np.array(want)) < 1e-13, "n_h=1, beta=1, alpha=1 is the plain delta rule: %.3g" % rel(got, np.array(want)))
    # the state is the least-squares memory: after writing (k, v) with beta = 1, reading k gives v back
    y = O.liza_recurrence(k, k, v, 1.0, None, [0], 1, "dt", True, 64)
    check(rel(y, v) < 1e-13, "beta=1 delta rule recalls the last value exactly: %.3g" % rel(y, v))
    # scalar beta per token + decay: S <- a (I - b k k^T) S + b k v^T
    b = torch.tensor(g.uniform(0.1, 0.9, T))
    a = torch.tensor(g.uniform(0.3, 1.0, T))
    S = np.zeros((d, d))
    want = []
    for t in range(T):
        kt, vt = k[t].numpy(), v[t].numpy()
        S = (np.eye(d) - b[t].item() * np.outer(kt, kt)) @ (a[t].item() * S) + b[t].item() * np.outer(kt, vt)
        want.append(S.T @ q[t].numpy())
    got = O.liza_recurrence(q, k, v, b, torch.log(a), None, 1, "dt", True, 64)
    check(rel(got, np.array(want)) < 1e-13, "per-token beta + decay closed form: %.3g" % rel(got, np.array(want)))
    # every order / trick / beta kind / decay / linear / C against the numpy matrix form
    worst, n = 0.0, 0
    starts = [0, 4, 5]
    for order in (1, 2, 3):
        for trick in O.TRICKS:
            for bkind in ("scalar", "token", "vector"):
                for decay in (False, True):
                    for linear in (True, False):
                        C = (2, 3, 5)[n % 3]
                        n += 1
                        bv = {"scalar": torch.tensor(0.5), "token": b, "vector": torch.tensor(g.uniform(0.05, 0.95, (T, d)))}[bkind]
                        la = torch.log(a) if decay else None
                        got = O.liza_recurrence(q, k, v, bv, la, starts, order, trick, linear, C)
                        bnp = np.broadcast_to(bv.numpy()[..., None] if bkind == "token" else bv.numpy(), (T, d))
                        want = np_recurrence(q.numpy(), k.numpy(), v.numpy(), bnp, a.numpy() if decay else np.ones(T),
                                             starts, order, trick, linear, C)
                        e = rel(got, want)
                        worst = max(worst, e)
                        if not check(e < 1e-12, "recurrence vs numpy matrix form: order %d %s beta %s decay %s linear %s C %d: %.3g"
                                     % (order, trick, bkind, decay, linear, C, e)):
                            return
    check(worst < 1e-12, "%d recurrence variants vs numpy: worst %.3g" % (n, worst))
    # an odd head dim: rot leaves the last feature alone; dv != d with a scalar beta
    q5, k5, v7, _ = rand_heads(9, 5, 21, dv=7)
    got = O.liza_recurrence(q5, k5, v7, 0.5, None, [0, 3], 3, "rot", True, 64)
    want = np_recurrence(q5.numpy(), k5.numpy(), v7.numpy(), np.full((9, 1), 0.5), np.ones(9), [0, 3], 3, "rot", True, 64)
    check(rel(got, want) < 1e-12, "rot, odd d, dv != d: %.3g" % rel(got, want))
    x = torch.arange(1.0, 6.0)[None]
    r = O.liza_expand(x, torch.zeros(1, 1, dtype=torch.long), 1, 4, "rot")  # 90 degrees counter-clockwise
    check(rel(r, torch.tensor([[-2.0, 1.0, -4.0, 3.0, 5.0]])) < 1e-15, "rot turns (x0, x1) into (-x1, x0) at 90 degrees: %s" % r)
    # dt: 2^-m sum (-1)^i C(m,i) x_{t-i}, zero before the document start
    xs = torch.tensor([[1.0], [3.0], [7.0], [2.0], [5.0]])
    pos = O.doc_positions([0, 3], 5)
    e2 = O.liza_expand(xs[None], pos, 2, 3, "dt")[0, :, 0].tolist()
    check(e2 == [0.25, (3 - 2) / 4, (7 - 6 + 1) / 4, 0.5, (5 - 4) / 4], "dt order 2 with a document start: %s" % e2)
    # batched heads == each head alone, with per-head document starts
    N = 3
    qs, ks, vs, gg = rand_heads(N * T, d, 22)
    qs, ks, vs = (t.reshape(N, T, d) for t in (qs, ks, vs))
    bb = torch.tensor(gg.uniform(0.1, 0.9, (N, T, d)))
    la = torch.log(torch.tensor(gg.uniform(0.5, 1.0, (N, T))))
    dss = [[0], [0, 6], [0, 2, 9]]
    mask = torch.zeros(N, T, dtype=torch.bool)
    for i, ds in enumerate(dss):
        mask[i, ds] = True
    both = O.liza_recurrence(qs, ks, vs, bb, la, mask, 2, "rdt", False, 3)
    alone = torch.stack([O.liza_recurrence(qs[i], ks[i], vs[i], bb[i], la[i], dss[i], 2, "rdt", False, 3) for i in range(N)])
    check(rel(both, alone) < 1e-15, "batched heads == each head alone: %.3g" % rel(both, alone))


def check_liza_tricks_chunks():
    T, d = 13, 6
    q, k, v, g = rand_heads(T, d, 23)
    b = torch.tensor(g.uniform(0.1, 0.9, (T, d)))
    la = torch.log(torch.tensor(g.uniform(0.5, 1.0, T)))
    for linear in (True, False):
        ys = [O.liza_recurrence(q, k, v, b, la, [0, 5], 1, trick, linear, 3) for trick in O.TRICKS]
        check(all(torch.equal(ys[0], y) for y in ys[1:]), "n_h=1: dt == rot == rdt exactly (linear %s)" % linear)
    plain = np_recurrence(q.numpy(), k.numpy(), v.numpy(), b.numpy(), np.exp(la.numpy()), [0, 5], 1, "dt", True, 1)
    check(rel(O.liza_recurrence(q, k, v, b, la, [0, 5], 1, "rot", True, 3), plain) < 1e-13, "n_h=1 rot == plain DeltaNet")
    # the tricks differ from order 2 on
    y2 = [O.liza_recurrence(q, k, v, b, la, [0, 5], 2, trick, True, 3) for trick in O.TRICKS]
    check(rel(y2[0], y2[1]) > 1e-2 and rel(y2[0], y2[2]) > 1e-2 and rel(y2[1], y2[2]) > 1e-2, "order 2: tricks differ")
    check(rel(y2[0], O.liza_recurrence(q, k, v, b, la, [0, 5], 1, "dt", True, 3)) > 1e-2, "order 2 != order 1")
    # linear: true does not depend on C (exactly); linear: false does
    for order, trick in ((1, "dt"), (3, "rdt")):
        ys = [O.liza_recurrence(q, k, v, b, la, [0, 5], order, trick, True, C) for C in (1, 2, 4, 5, 64)]
        check(all(torch.equal(ys[0], y) for y in ys[1:]), "linear: true is independent of C (order %d)" % order)
        yn = {C: O.liza_recurrence(q, k, v, b, la, [0, 5], order, trick, False, C) for C in (2, 3, 64)}
        check(rel(yn[2], yn[3]) > 1e-3 and rel(yn[2], ys[0]) > 1e-3, "linear: false depends on C (order %d): %.3g"
              % (order, rel(yn[2], yn[3])))
        # C larger than every document: phi never applies
        check(torch.equal(yn[64], ys[0]), "linear: false with C > document lengths == linear")
        # phi applies after C real tokens counted from each document start, not after a partial chunk
        y4 = O.liza_recurrence(q, k, v, b, la, [0, 5], order, trick, False, 4)
        # doc 0 = t 0..4: phi after t=3 only; doc 1 = t 5..12: after t=8 (and t=12, at its end)
        same = [t for t in range(T) if torch.equal(y4[t], ys[0][t])]
        check(same == [0, 1, 2, 3, 5, 6, 7, 8], "phi changes exactly the tokens after a full chunk: same at %s" % same)
    # phi itself
    S = torch.tensor(g.standard_normal((4, 3)))
    check(rel(O.liza_phi(S), np_phi(S.numpy())) < 1e-14, "phi == element-by-element formula")
    # pooling: replicate padding at document starts
    x = torch.tensor(g.standard_normal((1, 7, 2)))
    pos = O.doc_positions([0, 2, 3], 7)
    got = O.liza_pool(x, pos)[0]
    st = [0, 0, 2, 3, 3, 3, 3]
    want = torch.stack([(x[0, max(t - 2, st[t])] + x[0, max(t - 1, st[t])] + x[0, t]) / 3 for t in range(7)])
    check(rel(got, want) < 1e-15, "pooling with replicate padding at document starts")
    check(rel(got[2], x[0, 2]) < 1e-15 and rel(got[4], (x[0, 3] * 2 + x[0, 4]) / 3) < 1e-15, "pooling at a start = the token")


LIZA_VARIANTS = [
    # (arch, config kwargs, LizaConfig kwargs)
    ("llama", dict(H=4, Hkv=2), dict(order=1, alpha_gate="c", beta_gate="k")),
    ("qwen2", dict(H=4, Hkv=1, d=6), dict(order=2, alpha_gate="k", beta_gate="kv", trick="dt", cross_gate=True)),
    ("mistral", dict(H=4, Hkv=2, window=3), dict(order=3, alpha_gate="v", beta_gate="v", trick="rdt", linear=False,
                                                 chunk=3, base_scale_attn=True, mag_mode="gradual", mu0=0.2,
                                                 mu1=0.8, steps=10, step=4)),
    ("llama", dict(H=2, Hkv=2, d=10), dict(order=2, alpha_gate="kv", beta_gate="c", trick="rot", linear=False,
                                           chunk=2, mag_mode="cyclic", values=[0.3, 0.9, 0.6], period=3, step=7)),
    ("qwen2", dict(H=4, Hkv=2), dict(order=2, alpha_gate="k", beta_gate="k", mag_mode="learnable",
                                     learnable_shape="vector", cross_gate=True, base_scale_attn=True)),
    ("llama", dict(H=4, Hkv=2), dict(order=1, mag_mode="learnable", learnable_shape="scalar", linear=False, chunk=3)),
]


def make_mag(cfg, lz, seed=30):
    if lz.mag_mode != "learnable":
        return None
    g = np.random.default_rng(seed)
    n = 1 if lz.learnable_shape == "scalar" else cfg.D
    return {l: torch.tensor(g.uniform(-1.5, 1.5, n)) for l in range(cfg.L)}


def check_liza_naive():
    for arch, kw, lkw in LIZA_VARIANTS:
        cfg = O.ModelConfig.from_dict(make_config(arch, **kw))
        lz = O.LizaConfig(**lkw)
        p = make_params(cfg, seed=13)
        lora = make_lora(cfg, O.ATTN_MODULES + ["up_proj"], seed=14)
        mag = make_mag(cfg, lz)
        ids = np.random.default_rng(15).integers(0, cfg.V, (2, 11)).tolist()
        ds = [[0, 4, 5], [0]]
        got = O.Decoder(cfg, p, lora, 1.5, liza=lz, mag_logits=mag).forward(ids, ds)
        want = naive_forward(cfg, p, lora, 1.5, ids, ds, liza=lz, mag=mag)
        e = rel(got, want)
        check(e < 1e-12, "naive loop LiZA model vs oracle (%s %s): %.3g" % (arch, lkw, e))
        base = O.Decoder(cfg, p, lora, 1.5).forward(ids, ds)
        check(rel(got, base) > 1e-2, "LiZA changes the model (%s %s): %.3g" % (arch, lkw, rel(got, base)))


def check_liza_packing():
    for arch, kw, lkw in LIZA_VARIANTS:
        cfg = O.ModelConfig.from_dict(make_config(arch, **kw))
        lz = O.LizaConfig(**lkw)
        p = make_params(cfg, seed=16)
        m = O.Decoder(cfg, p, make_lora(cfg, O.ATTN_MODULES), 2.0, liza=lz, mag_logits=make_mag(cfg, lz))
        rng = np.random.default_rng(17)
        row = rng.integers(0, cfg.V, 16).tolist()
        starts = [0, 5, 11]
        packed = m.forward([row], [starts])
        bounds = starts + [16]
        sep = torch.cat([m.forward([row[a:b]], [[0]]) for a, b in zip(bounds, bounds[1:])], dim=1)
        e = rel(packed, sep)
        check(e < 1e-13, "LiZA %s %s: packed row vs separate documents: %.3g" % (arch, lkw, e))
        m.liza_no_docs = True
        e = rel(m.forward([row], [starts]), packed)
        check(e > 1e-3, "LiZA %s: the linear branch crossing documents changes the logits: %.3g" % (arch, e))
        m.liza_no_docs = False
        row2 = rng.integers(0, cfg.V, 16).tolist()
        both = m.forward([row, row2], [starts, [0, 2, 9]])
        e = max(rel(both[0:1], packed), rel(both[1:2], m.forward([row2], [[0, 2, 9]])))
        check(e < 1e-13, "LiZA %s: batch rows are independent: %.3g" % (arch, e))


def check_liza_gqa():
    cg = O.ModelConfig.from_dict(make_config("qwen2", H=4, Hkv=2, d=6))
    cm = O.ModelConfig.from_dict(make_config("qwen2", H=4, Hkv=4, d=6))
    p = make_params(cg, seed=18)
    pm = dict(p)
    g, d = 2, 6
    for l in range(cg.L):
        for m in ("k_proj", "v_proj"):
            for suf in (".weight", ".bias"):
                n = "model.layers.%d.self_attn.%s%s" % (l, m, suf)
                heads = p[n].reshape(cg.Hkv, d, *p[n].shape[1:])
                pm[n] = heads.repeat_interleave(g, dim=0).reshape(cg.H * d, *p[n].shape[1:])
    ids = [[1, 5, 7, 2, 9, 3, 3, 0, 4, 4]]
    lz = O.LizaConfig(order=3, alpha_gate="kv", beta_gate="kv", trick="rdt", linear=False, chunk=3)
    e = rel(O.Decoder(cg, p, liza=lz).forward(ids, [[0, 3]]), O.Decoder(cm, pm, liza=lz).forward(ids, [[0, 3]]))
    check(e < 1e-13, "LiZA: GQA equals MHA with kv head h//g weights repeated: %.3g" % e)


def check_mag():
    # schedules
    check(O.mag_mu("constant", 0.3) == 0.3, "constant mu")
    g = dict(mu1=0.9, steps=100)
    vals = [O.mag_mu("gradual", 0.2, step=s, **g) for s in (0, 25, 100, 150)]
    check(max(abs(a - b) for a, b in zip(vals, [0.2, 0.375, 0.9, 0.9])) < 1e-15, "gradual mu: %s" % vals)
    c = dict(values=[0.1, 0.5, 0.9], period=10)
    vals = [O.mag_mu("cyclic", 0.0, step=s, **c) for s in (0, 9, 10, 25, 30, 41)]
    check(vals == [0.1, 0.1, 0.5, 0.9, 0.1, 0.5], "cyclic mu: %s" % vals)
    check(O.mag_mu("cyclic", 0.0, values="0.2,0.4", period=2, step=3) == 0.4, "cyclic values as a comma string")
    check(O.mag_mu("learnable", 0.3) == 0.3, "learnable: sigma of the init logit")
    # the metadata config of docs/dump.md
    conf = {"liza_enabled": True, "operator_mode": None,
            "recurrent_config": {"order": 3, "alpha_gate": "k", "beta_gate": "kv", "linear": False, "trick": "rot"},
            "max_chunk_size": 4, "base_scale_attn": True, "mag_weight": 0.25, "cross_gate": True, "mag_mode": "gradual",
            "mag_mu1": 0.75, "mag_steps": 10, "mag_values": [0.1, 0.5], "mag_period": 3, "mag_learnable_shape": "scalar",
            "mag_step": 4, "mag_mu": 0.45}
    lz = O.LizaConfig.from_config(conf)
    check((lz.order, lz.alpha_gate, lz.beta_gate, lz.linear, lz.trick, lz.chunk, lz.base_scale_attn, lz.cross_gate)
          == (3, "k", "kv", False, "rot", 4, True, True) and abs(lz.mu() - 0.45) < 1e-15, "LizaConfig.from_config")
    check(O.LizaConfig.from_config(dict(conf, liza_enabled=False)) is None and O.LizaConfig.from_config({}) is None,
          "liza_enabled false: no LiZA")
    check(sorted(O.PRESETS) == sorted(["delta_rule", "delta_rule_v", "delta_rule_kv", "delta_rule_gelu", "gated_delta_rule",
                                      "delta_product", "gated_delta_product", "delta_product_r", "delta_product_c"])
          and all(sorted(v) == ["alpha_gate", "beta_gate", "linear", "order", "trick"] for v in O.PRESETS.values()),
          "the nine presets")
    check(O.tensor_class(O.mag_logit_key(1) + ".grad") == "mag_logit", "tensor_class(mag_logit)")

    cfg = O.ModelConfig.from_dict(make_config("mistral", H=4, Hkv=2, window=3))
    p = make_params(cfg, seed=19)
    lora = make_lora(cfg, O.ATTN_MODULES)
    ids = np.random.default_rng(8).integers(0, cfg.V, (2, 12)).tolist()
    ds = [[0, 5], [0, 3, 4]]
    base = O.Decoder(cfg, p, lora, 2.0).forward(ids, ds)
    # mu = 0: exactly the base model, with and without cross gate, any LiZA variant
    for _, _, lkw in LIZA_VARIANTS:
        if lkw.get("mag_mode") == "learnable":
            continue
        for cross in (False, True):
            lz = O.LizaConfig(**dict(lkw, mag_mode="constant", mu0=0.0, cross_gate=cross))
            e = (O.Decoder(cfg, p, lora, 2.0, liza=lz).forward(ids, ds) - base).abs().max().item()
            check(e == 0.0, "mu = 0 (cross gate %s, %s) is the base model exactly: %.3g" % (cross, lkw, e))
    # a gradual schedule at step 0 is mu0; the learnable logit(mu0) is the constant mu0
    lz = O.LizaConfig(order=2, alpha_gate="k", mag_mode="constant", mu0=0.3, cross_gate=True)
    const = O.Decoder(cfg, p, lora, 2.0, liza=lz).forward(ids, ds)
    e = rel(O.Decoder(cfg, p, lora, 2.0, liza=lz.replace(mag_mode="gradual", mu1=0.9, steps=5, step=0)).forward(ids, ds), const)
    check(e == 0.0, "gradual at step 0 == constant mu0")
    e = rel(O.Decoder(cfg, p, lora, 2.0, liza=lz.replace(mag_mode="cyclic", values=[0.7, 0.3], period=4, step=5)).forward(ids, ds), const)
    check(e == 0.0, "cyclic picks values[(step // period) % n]")
    for shape, n in (("scalar", 1), ("vector", cfg.D)):
        mag = {l: torch.full((n,), O.logit(0.3)) for l in range(cfg.L)}
        e = rel(O.Decoder(cfg, p, lora, 2.0, liza=lz.replace(mag_mode="learnable", learnable_shape=shape),
                          mag_logits=mag).forward(ids, ds), const)
        check(e < 1e-14, "learnable %s logit(mu0) == constant mu0: %.3g" % (shape, e))
    # a vector logit acts per channel
    mag = {l: torch.tensor(np.random.default_rng(l).uniform(-2, 2, cfg.D)) for l in range(cfg.L)}
    lv = lz.replace(mag_mode="learnable", learnable_shape="vector")
    vec = O.Decoder(cfg, p, lora, 2.0, liza=lv, mag_logits=mag).forward(ids, ds)
    avg = O.Decoder(cfg, p, lora, 2.0, liza=lv, mag_logits={l: t.mean().expand(t.shape) for l, t in mag.items()}).forward(ids, ds)
    check(rel(vec, avg) > 1e-2, "a vector logit is not its mean")
    # pure linear (mu = 1, no cross gate): the softmax branch has no effect
    for lkw in (dict(), dict(order=3, trick="rot", alpha_gate="k", linear=False, chunk=2)):
        lz1 = O.LizaConfig(**dict(lkw, mu0=1.0))
        c_nowin = O.ModelConfig.from_dict(make_config("mistral", H=4, Hkv=2, window=None, theta=77.0))
        a1 = O.Decoder(cfg, p, lora, 2.0, liza=lz1).forward(ids, ds)
        a2 = O.Decoder(c_nowin, p, lora, 2.0, liza=lz1).forward(ids, ds)
        check(rel(a1, a2) == 0.0, "pure linear: window and RoPE do not matter (%s)" % lkw)
        check(rel(O.Decoder(cfg, p, lora, 2.0, liza=lz1.replace(mu0=0.99)).forward(ids, ds),
                  O.Decoder(c_nowin, p, lora, 2.0, liza=lz1.replace(mu0=0.99)).forward(ids, ds)) > 1e-3,
              "mu = 0.99: the softmax branch matters")
        # with base_scale_attn o_base still scales o_lin
        lzb = lz1.replace(base_scale_attn=True)
        check(rel(O.Decoder(cfg, p, lora, 2.0, liza=lzb).forward(ids, ds),
                  O.Decoder(c_nowin, p, lora, 2.0, liza=lzb).forward(ids, ds)) > 1e-3,
              "mu = 1 with base_scale_attn still depends on o_base")


def check_liza_finite_differences():
    for arch, kw, lkw in [("qwen2", dict(H=4, Hkv=2, d=6),
                           dict(order=3, alpha_gate="k", beta_gate="kv", trick="rdt", linear=False, chunk=3,
                                cross_gate=True, base_scale_attn=True, mag_mode="learnable", learnable_shape="vector")),
                          ("llama", dict(H=4, Hkv=1),
                           dict(order=2, alpha_gate="kv", beta_gate="v", trick="rot", linear=False, chunk=2,
                                mag_mode="learnable", learnable_shape="scalar"))]:
        cfg = O.ModelConfig.from_dict(make_config(arch, **kw))
        lz = O.LizaConfig(**lkw)
        p = make_params(cfg, seed=24)
        lora = make_lora(cfg, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], seed=25)
        mag = make_mag(cfg, lz, seed=26)
        ids = np.random.default_rng(27).integers(0, cfg.V, (2, 10)).tolist()
        ds = [[0, 3, 7], [0, 6]]
        labels = torch.tensor(O.default_labels(ids, ds))
        s = 1.3
        leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
        ll = {k: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for k, (a, b) in lora.items()}
        mm = {l: t.clone().requires_grad_(True) for l, t in mag.items()}

        def loss_fn(P, LR, M):
            return O.cross_entropy(O.Decoder(cfg, P, LR, s, liza=lz, mag_logits=M).forward(ids, ds), labels)

        loss_fn(leaves, ll, mm).backward()
        det = lambda: ({k: v.detach().clone() for k, v in leaves.items()},
                       {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in ll.items()},
                       {l: t.detach().clone() for l, t in mm.items()})
        h = 1e-6
        picks = []
        for l in range(cfg.L):
            for i in ((0,) if lz.learnable_shape == "scalar" else (0, 5, cfg.D - 1)):
                picks.append(("mag_logit layer %d [%d]" % (l, i), lambda P, LR, M, l=l, i=i: M[l][i:i + 1], mm[l].grad[i]))
        for mod, which, idx in [("model.layers.0.self_attn.k_proj", 0, (1, 3)), ("model.layers.1.self_attn.v_proj", 1, (2, 1)),
                                ("model.layers.0.self_attn.o_proj", 1, (4, 2)), ("model.layers.1.self_attn.q_proj", 0, (0, 7))]:
            picks.append(("%s lora_%s%s" % (mod, "AB"[which], idx),
                          lambda P, LR, M, mod=mod, which=which, idx=idx: LR[mod][which][idx], ll[mod][which].grad[idx]))
        plain = [("model.layers.0.input_layernorm.weight", (3,)), ("model.layers.1.self_attn.k_proj.weight", (2, 5))]
        if cfg.bias:
            plain.append(("model.layers.0.self_attn.k_proj.bias", (4,)))
        for name, idx in plain:
            picks.append((name + str(idx), lambda P, LR, M, name=name, idx=idx: P[name][idx], leaves[name].grad[idx]))
        for what, get, ag in picks:
            def at(delta):
                P, LR, M = det()
                get(P, LR, M).add_(delta)  # a view: writes through to the parameter
                return loss_fn(P, LR, M).item()
            fd = (at(h) - at(-h)) / (2 * h)
            ag = ag.item()
            check(abs(fd - ag) <= 1e-6 * max(1.0, abs(ag)) and abs(ag) > 1e-6,
                  "LiZA %s finite difference %s: fd %.10g autograd %.10g" % (arch, what, fd, ag))


def check_liza_run_case():
    """run_case on a synthetic LiZA dump (learnable vector logits + LoRA) written here."""
    tmp = tempfile.mkdtemp(prefix="tptt-oracle-liza-")
    try:
        cj = make_config("qwen2", H=4, Hkv=2)
        cfg = O.ModelConfig.from_dict(cj)
        p = make_params(cfg, seed=28)
        mdir = os.path.join(tmp, "m")
        os.makedirs(mdir)
        with open(os.path.join(mdir, "config.json"), "w") as f:
            json.dump(cj, f)
        stnp.save(os.path.join(mdir, "model.safetensors"), {k: ("F32", v.numpy()) for k, v in p.items()})
        _, frozen = stnp.load_model_dir(mdir)
        pf = {k: torch.tensor(v.astype(np.float64)) for k, v in frozen.items()}
        lz = O.LizaConfig(order=2, alpha_gate="k", beta_gate="k", trick="dt", linear=False, chunk=3, cross_gate=True,
                          mag_mode="learnable", learnable_shape="vector", mu0=0.4)
        r, alpha = 4, 8.0
        lora = {k: (a.float().double(), b.float().double()) for k, (a, b) in make_lora(cfg, O.ATTN_MODULES, r=r).items()}
        mag = {l: t.float().double() for l, t in make_mag(cfg, lz).items()}
        ids = np.random.default_rng(29).integers(0, cfg.V, (2, 12)).tolist()
        ds = [[0, 4, 9], [0, 6]]
        labels = O.default_labels(ids, ds)
        keys = {O.PREFIX + m + ".lora_" + w + ".weight": t for m, (a, b) in lora.items() for w, t in (("A", a), ("B", b))}
        keys.update({O.mag_logit_key(l): t for l, t in mag.items()})
        leaves = {k: v.clone().requires_grad_(True) for k, v in keys.items()}
        LR = {m: (leaves[O.PREFIX + m + ".lora_A.weight"], leaves[O.PREFIX + m + ".lora_B.weight"]) for m in lora}
        M = {l: leaves[O.mag_logit_key(l)] for l in mag}
        logits = O.Decoder(cfg, pf, LR, alpha / r, liza=lz, mag_logits=M).forward(ids, ds)
        loss = O.cross_entropy(logits, torch.tensor(labels))
        loss.backward()
        tensors = {"logits": ("F32", logits.detach().numpy()), "loss": ("F32", loss.detach().numpy())}
        for k, v in leaves.items():
            tensors[k] = ("F32", v.detach().numpy())
            tensors[k + ".grad"] = ("F32", v.grad.numpy())
        conf = {"model_type": "tptt", "trainable": "lora", "compute_matmul": "f32",
                "lora_config": {"r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": O.ATTN_MODULES,
                                "use_rslora": False, "init": "random"},
                "liza_enabled": True, "operator_mode": None,
                "recurrent_config": {"order": 2, "alpha_gate": "k", "beta_gate": "k", "linear": False, "trick": "dt"},
                "max_chunk_size": 3, "base_scale_attn": False, "mag_weight": 0.4, "cross_gate": True,
                "mag_mode": "learnable", "mag_mu1": 1.0, "mag_steps": 1000, "mag_values": [0.1, 0.5, 0.9],
                "mag_period": 100, "mag_learnable_shape": "vector", "mag_step": 0, "mag_mu": 0.4}
        dpath = os.path.join(tmp, "d.safetensors")

        def save(t, c):
            stnp.save(dpath, t, {"format": "pt", "config": json.dumps(c),
                                 "batch": json.dumps({"input_ids": ids, "labels": labels, "doc_starts": ds})})
        save(tensors, conf)
        ref = O.run_case(mdir, dpath)
        dump, _ = stnp.load(dpath)
        rows = O.compare(dump, ref)
        want_keys = {"logits", "loss"} | {k + ".grad" for k in keys}
        check(set(ref) == want_keys, "LiZA run_case keys %s" % sorted(set(ref) ^ want_keys))
        worst = max(max(mx, rms) for _, _, mx, rms in rows)
        check(worst < 1e-6, "LiZA run_case vs direct computation: worst %.3g" % worst)
        check(any(c == "mag_logit.grad" for c, _, _, _ in rows), "mag_logit gradients are compared")
        for ab in O.LIZA_ABLATIONS:
            alt = O.run_case(mdir, dpath, ablate=(ab,), grads=False)
            e = O.max_rel(dump["logits"], alt["logits"])
            if ab in ("base_scale", "trick"):  # not switched on in this dump (trick dt): no change
                check(e < 1e-6, "ablation %s of a feature that is off: %.3g" % (ab, e))
            else:
                check(e > 1e-3, "ablation %s changes the logits: %.3g" % (ab, e))
        # a learnable dump without its logits, a logit of the wrong shape, a logit without LiZA: errors
        for bad_t, bad_c, what in [
                ({k: v for k, v in tensors.items() if "mag_logit" not in k}, conf, "missing mag_logit"),
                (dict(tensors, **{O.mag_logit_key(0): ("F32", np.zeros(1, np.float32)),
                                  O.mag_logit_key(0) + ".grad": ("F32", np.zeros(1, np.float32))}), conf, "wrong shape"),
                (tensors, dict(conf, liza_enabled=False), "mag_logit without LiZA"),
                (tensors, dict(conf, mag_mode="constant"), "mag_logit with a schedule")]:
            save(bad_t, bad_c)
            try:
                O.run_case(mdir, dpath)
                check(False, "run_case must reject a dump with %s" % what)
            except ValueError:
                check(True, "")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    for f in (check_naive, check_packing, check_window, check_tied, check_gqa, check_lora_merge,
              check_finite_differences, check_llama3, check_rope_relative, check_labels_loss, check_run_case,
              check_classes, check_liza_recurrence, check_liza_tricks_chunks, check_liza_naive, check_liza_packing,
              check_liza_gqa, check_mag, check_liza_finite_differences, check_liza_run_case):
        before = kit.failed
        f()
        if kit.failed > before:
            print("  in", f.__name__)
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
