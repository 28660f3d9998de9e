"""tptt_titan_math - the exact forward pass of an exported tptt Titan, in plain torch.

Shipped inside every `tptt export --format titan` directory (imports only
torch, math, json, os, struct, sys). It implements the numerical contract of
the tptt project (LIZA.md sections 1-3 and 6, docs/dump.md "LiZA semantics"):

* the Llama / Mistral / Qwen2 decoder: RMSNorm, q/k/v projections (+ Qwen2
  bias), RoPE with the HF rotate_half pairing and llama3 scaling, GQA causal
  softmax attention with an optional sliding window, SwiGLU MLP, final norm,
  (tied) lm_head;
* in every layer the LiZA linear-attention branch on the pre-RoPE q/k/v:
  causal window-3 pooled sigmoid gates (beta_gate / alpha_gate c|k|v|kv, alpha
  the channel mean), feature maps silu(x)/||silu(x)|| and v/sqrt(d),
  DeltaProduct of order n_h with the dt/rot/rdt expansions, scalar decay once
  per real token, the state non-linearity phi after every C real tokens
  (`linear: false`), RMS normalisation over the H*d features, o_proj, and the
  optional base_scale_attn;
* the MaG mix (1-mu) o_base + mu o_lin (+ the cross gate), mu fixed or
  sigma(per-layer logit [1] or [D]); mu = 1 without cross gate and without
  base_scale_attn skips the softmax branch (pure-linear model: no KV cache).

The full-sequence (prefill) LiZA forward is the chunkwise-parallel algorithm
of LIZA.md section 6 (WY form with a unit-lower-triangular solve per chunk,
the state carried across chunks); one-token steps use the recurrence. Both
continue from a TitanCache, so prefill + token-by-token decoding gives the
logits of the full forward.

API
---
    m = load_dir(path, dtype=torch.float32)          # config.json + safetensors
    m = TitanMath(config_dict, {hf_name: tensor}, dtype=torch.float32)
    logits, cache = m.forward(input_ids, cache=None, last_only=False)
        input_ids: LongTensor [T] (-> logits [T, V]) or [B, T] (-> [B, T, V]);
        cache: None (a new sequence) or the TitanCache of previous calls.
    ids = m.generate(prompt_ids, max_new_tokens, eos_token_id=None)  # greedy
    tensors = read_safetensors(file) / read_model_tensors(dir)

dtype is the compute dtype of the projections and MLP (float64 for exactness
checks, float32 default, bfloat16/float16 allowed); norms, softmax and the
LiZA branch run in float32 at least, the LiZA state S is kept in that dtype.
"""

import json
import math
import os
import struct
import sys

import torch

__all__ = ["TitanMath", "TitanCache", "LayerCache", "load_dir", "read_safetensors", "read_model_tensors",
           "liza_chunked", "liza_steps", "llama3_inv_freq"]

LIZA_NORM_EPS = 1e-6   # RMS normalisation of y (LIZA.md 2.6)
BASE_SCALE_EPS = 1e-5  # base_scale_attn (2.6)
PHI_EPS = 1e-6         # row norm in phi (2.5)
FEATURE_EPS = 1e-6     # floor of ||silu(x)|| (2.2)
GATES = ("c", "k", "v", "kv")
TRICKS = ("dt", "rot", "rdt")
BASE_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


# ---------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} of one .safetensors file (little-endian host)."""
    if sys.byteorder != "little":
        raise RuntimeError("%s: safetensors reading needs a little-endian host" % path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("%s: not a safetensors file (too short)" % path)
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError("%s: header length %d too large" % (path, n))
        header = json.loads(f.read(n).decode("utf-8"))
        base = 8 + n
        size = os.fstat(f.fileno()).st_size
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt = _ST_DTYPES.get(info["dtype"])
            if dt is None:
                raise ValueError("%s: tensor %s has unsupported dtype %s" % (path, name, info["dtype"]))
            b, e = info["data_offsets"]
            shape = [int(s) for s in info["shape"]]
            numel = 1
            for s in shape:
                numel *= s
            esize = torch.empty((), dtype=dt).element_size()
            if e - b != numel * esize or base + e > size or b < 0:
                raise ValueError("%s: tensor %s has bad data_offsets %s for shape %s" % (path, name, [b, e], shape))
            f.seek(base + b)
            buf = bytearray(f.read(e - b))
            t = torch.frombuffer(buf, dtype=dt) if numel else torch.empty(0, dtype=dt)
            out[name] = t.reshape(shape)
    return out


def read_model_tensors(path):
    """All tensors of a model directory: model.safetensors, or the shards of
    model.safetensors.index.json (every tensor of its weight_map must exist)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            wmap = json.load(f)["weight_map"]
        out = {}
        for shard in sorted(set(wmap.values())):
            out.update(read_safetensors(os.path.join(path, shard)))
        missing = sorted(set(wmap) - set(out))
        if missing:
            raise ValueError("%s: tensors of the index missing from the shards: %s" % (path, missing[:5]))
        return out
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError("%s: no model.safetensors or model.safetensors.index.json" % path)
    return read_safetensors(single)


def load_dir(path, dtype=torch.float32):
    """TitanMath of an exported directory (config.json + safetensors)."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    return TitanMath(config, read_model_tensors(path), dtype=dtype)


# ---------------------------------------------------------------- small pieces

def llama3_inv_freq(inv_freq, scaling):
    """transformers' _compute_llama3_parameters applied to inv_freq (float64)."""
    factor = float(scaling["factor"])
    low_ff = float(scaling["low_freq_factor"])
    high_ff = float(scaling["high_freq_factor"])
    orig = float(scaling["original_max_position_embeddings"])
    low_wl, high_wl = orig / low_ff, orig / high_ff
    wavelen = 2 * math.pi / inv_freq
    out = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return torch.where(medium, smoothed, out)


def _rms(x, w, eps):
    """RMSNorm in float32 at least (w None: no weight), result in x's dtype."""
    ct = torch.promote_types(x.dtype, torch.float32)
    y = x.to(ct)
    y = y * torch.rsqrt((y * y).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w.to(ct)
    return y.to(x.dtype)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _phi(S):
    """phi(S)_{r,c} = (S_{r,c}/2) gelu_tanh(2 S_{r,c} / (||S_{r,:}|| + 1e-6)), S [..., dk, dv]."""
    rn = torch.linalg.vector_norm(S, dim=-1, keepdim=True)
    return 0.5 * S * _gelu_tanh(2.0 * S / (rn + PHI_EPS))


def _feature(x):
    u = torch.nn.functional.silu(x)
    return u / torch.clamp(torch.linalg.vector_norm(u, dim=-1, keepdim=True), min=FEATURE_EPS)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def _rot_pairs(x, theta):
    """Rotate consecutive feature pairs (2i, 2i+1) by theta; an odd last feature stays."""
    c, s = math.cos(theta), math.sin(theta)
    d = x.shape[-1]
    p = d // 2
    x0, x1 = x[..., 0:2 * p:2], x[..., 1:2 * p:2]
    r = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return torch.cat([r, x[..., 2 * p:]], dim=-1) if d % 2 else r


# ---------------------------------------------------------------- LiZA kernels

def liza_chunked(q, K, V, beta, log_alpha, S, p0, C, linear):
    """Chunkwise-parallel LiZA (LIZA.md section 6) for N state heads.

    q [N, g, T, d]      feature-mapped queries (g query heads read each state)
    K, V [N, T, n, d]   the n virtual keys/values of each real token (k^, v^ expanded)
    beta [N, T, d] or a float;  log_alpha [N, T] or None
    S [N, d, d]         state entering the first token (document position p0)
    C                   real tokens per chunk; chunks are aligned to multiples of C
                        from the document start, phi is applied after every full one
    Returns y [N, g, T, d] and the state after the last token.
    """
    N, T, n, d = K.shape
    g = q.shape[1]
    dt = K.dtype
    front = p0 % C
    total = front + T
    back = (-total) % C
    nc = (total + back) // C
    Lv = C * n

    def pad_t(x, dim):  # zero real tokens in front/back: exact no-ops of the WY form
        shape = list(x.shape)
        shape[dim] = front
        a = x.new_zeros(shape)
        shape[dim] = back
        b = x.new_zeros(shape)
        return torch.cat([a, x, b], dim=dim)

    Kc = pad_t(K, 1).reshape(N, nc, Lv, d)
    Vc = pad_t(V, 1).reshape(N, nc, Lv, d)
    if torch.is_tensor(beta):
        bc = pad_t(beta, 1).reshape(N, nc, C, 1, d).expand(N, nc, C, n, d).reshape(N, nc, Lv, d)
    else:
        bc = float(beta)
    Kt = bc * Kc
    Vt = bc * Vc
    dev = K.device
    gv = K.new_zeros(N, nc, C, n)
    if log_alpha is not None:
        gv[..., 0] = pad_t(log_alpha, 1).reshape(N, nc, C)
    gam = gv.reshape(N, nc, Lv).cumsum(-1)                      # gamma, restarted per chunk
    idx = torch.arange(Lv, device=dev)
    lower = idx[:, None] >= idx[None, :]
    diff = (gam[..., :, None] - gam[..., None, :]).masked_fill(~lower, float("-inf"))
    Dm = torch.exp(diff)                                         # e^{gamma_i - gamma_j}, i >= j, else 0
    strict = idx[:, None] > idx[None, :]
    IL = (Kt @ Kc.transpose(-1, -2)) * Dm * strict + torch.eye(Lv, dtype=dt, device=dev)
    Gam = torch.exp(gam)
    W = torch.linalg.solve_triangular(IL, Gam[..., None] * Kt, upper=False, unitriangular=True)
    U = torch.linalg.solve_triangular(IL, Vt, upper=False, unitriangular=True)
    # the real tokens' rows are the last virtual slots
    last = torch.arange(n - 1, Lv, n, device=dev)
    Qc = pad_t(q, 2).reshape(N, g, nc, C, d).transpose(1, 2)     # [N, nc, g, C, d]
    Dr = Dm[..., last, :]                                        # [N, nc, C, Lv]
    QK = (Qc @ Kc[:, :, None].transpose(-1, -2)) * Dr[:, :, None]  # [N, nc, g, C, Lv]
    Gr = Gam[..., last]                                          # [N, nc, C]
    G = gam[..., -1]                                             # [N, nc]
    dec = torch.exp(G[..., None] - gam)                          # [N, nc, Lv]
    Kd = Kc * dec[..., None]
    ys = []
    for c in range(nc):
        Vn = U[:, c] - W[:, c] @ S                               # [N, Lv, d]
        o = Gr[:, c, None, :, None] * (Qc[:, c] @ S[:, None]) + QK[:, c] @ Vn[:, None]
        ys.append(o)
        S = torch.exp(G[:, c])[:, None, None] * S + Kd[:, c].transpose(-1, -2) @ Vn
        if not linear and (c < nc - 1 or back == 0):
            S = _phi(S)
    y = torch.stack(ys, dim=2).reshape(N, g, nc * C, d)[:, :, front:front + T]
    return y, S


def liza_steps(q, K, V, beta, log_alpha, S, p0, C, linear):
    """The recurrence of LIZA.md 2.3-2.5, token by token (same arguments as
    liza_chunked). Used for decoding (a few tokens per call)."""
    N, T, n, d = K.shape
    ys = []
    for t in range(T):
        if log_alpha is not None:
            S = torch.exp(log_alpha[:, t])[:, None, None] * S
        b = beta[:, t] if torch.is_tensor(beta) else float(beta)
        for m in range(n):
            k, v = K[:, t, m], V[:, t, m]
            kt, vt = b * k, b * v
            S = S + k[:, :, None] * (vt - (kt[:, None, :] @ S)[:, 0])[:, None, :]
        ys.append(q[:, :, t] @ S)                                # [N, g, d]
        if not linear and (p0 + t + 1) % C == 0:
            S = _phi(S)
    return torch.stack(ys, dim=2), S


# ---------------------------------------------------------------- cache

class LayerCache:
    """One layer's state. k/v: RoPE'd keys and values [B, Hkv, cap, d]: a
    growable buffer (slot i = position i, the first `pos` slots used) or, with a
    sliding window W, a ring of W slots (position p in slot p mod W, kpos [W]
    the position held, -1 empty); None for a pure-linear layer. S: LiZA state
    [B, Hkv, d, d]. hk/hv: the last max(2, n_h-1) raw (pre-RoPE) k/v rows
    [B, Hkv, h, d]."""

    def __init__(self):
        self.k = self.v = None
        self.kpos = None
        self.S = None
        self.hk = self.hv = None


class TitanCache:
    """Recurrent cache of a batch of equal-length sequences: one LayerCache per
    layer and the document position `pos` (= tokens seen)."""

    def __init__(self, n_layers):
        self.layers = [LayerCache() for _ in range(n_layers)]
        self.pos = 0

    def get_seq_length(self, layer_idx=0):
        return self.pos


# ---------------------------------------------------------------- the model

def _get(c, key, default=None):
    v = c.get(key, default)
    return default if v is None else v


class TitanMath:
    """The exported Titan. config: the export's config.json as a dict;
    tensors: HF name -> tensor (moved to `dtype` unless dtype is None)."""

    def __init__(self, config, tensors, dtype=torch.float32):
        c = config
        self.config = c
        btype = c.get("base_model_type")
        if btype is None:
            arch = (c.get("base_architecture") or (c.get("architectures") or [None])[0])
            btype = BASE_TYPES.get(arch)
        if btype not in ("llama", "mistral", "qwen2"):
            raise ValueError("config.json: base_model_type %r is not llama, mistral or qwen2" % (btype,))
        self.base_type = btype
        self.D = int(c["hidden_size"])
        self.L = int(c["num_hidden_layers"])
        self.H = int(c["num_attention_heads"])
        self.Hkv = int(_get(c, "num_key_value_heads", self.H))
        self.d = int(_get(c, "head_dim", self.D // self.H))
        self.V = int(c["vocab_size"])
        if self.H % self.Hkv:
            raise ValueError("config.json: num_key_value_heads %d does not divide %d" % (self.Hkv, self.H))
        if _get(c, "hidden_act", "silu") != "silu":
            raise ValueError("config.json: hidden_act %r is not supported" % c.get("hidden_act"))
        self.g = self.H // self.Hkv
        self.eps = float(_get(c, "rms_norm_eps", 1e-6))
        self.tie = bool(_get(c, "tie_word_embeddings", False))
        self.window = None
        if btype == "mistral":
            self.window = c.get("sliding_window", 4096)  # absent: MistralConfig's 4096; null: none
        elif btype == "qwen2" and c.get("use_sliding_window"):
            raise ValueError("config.json: Qwen2 use_sliding_window is not supported")
        if self.window is not None:
            self.window = int(self.window)
            if self.window <= 0:
                raise ValueError("config.json: sliding_window %d" % self.window)
        inv = float(_get(c, "rope_theta", 10000.0)) ** (-2.0 * torch.arange(self.d // 2, dtype=torch.float64) / self.d)
        rs = c.get("rope_scaling")
        if rs is not None:
            rt = rs.get("rope_type", rs.get("type"))
            if rt == "llama3":
                inv = llama3_inv_freq(inv, rs)
            elif rt != "default":
                raise ValueError("config.json: rope_scaling type %r is not supported" % (rt,))
        self.inv_freq = inv
        # LiZA / MaG
        lz = c.get("liza")
        self.liza = lz is not None
        if self.liza:
            self.order = int(lz["order"])
            self.alpha_gate, self.beta_gate = lz["alpha_gate"], lz["beta_gate"]
            self.linear = bool(lz["linear"])
            self.trick = lz["trick"]
            self.C = int(lz["chunk_size"])
            self.base_scale = bool(lz.get("base_scale_attn", False))
            if self.order < 1 or self.C < 1 or self.alpha_gate not in GATES or self.beta_gate not in GATES \
                    or self.trick not in TRICKS:
                raise ValueError("config.json: bad liza settings %r" % (lz,))
            mag = c.get("mag") or {}
            self.mag_mode = mag.get("mode", "fixed")
            self.cross_gate = bool(mag.get("cross_gate", False))
            if self.mag_mode == "fixed":
                self.mu_fixed = float(mag["mu"])
            elif self.mag_mode == "learnable":
                self.mu_fixed = None
                shape = mag.get("learnable_shape", "scalar")
                want = [1] if shape == "scalar" else [self.D]
                for l in range(self.L):
                    key = "model.layers.%d.self_attn.mag_logit" % l
                    if key not in tensors or list(tensors[key].shape) != want:
                        raise ValueError("learnable MaG: %s missing or not of shape %s" % (key, want))
            else:
                raise ValueError("config.json: mag mode %r" % (self.mag_mode,))
            self.hist = max(2, self.order - 1)
        self.pure_linear = self.liza and self.mag_mode == "fixed" and self.mu_fixed == 1.0 \
            and not self.cross_gate and not self.base_scale
        # weights
        self.dtype = dtype
        ref = dtype
        if ref is None:
            emb = tensors.get("model.embed_tokens.weight")
            ref = emb.dtype if emb is not None else torch.float32
        self.ldtype = torch.float64 if ref == torch.float64 else torch.float32  # LiZA / softmax / norms
        self.w = {}
        for name, t in tensors.items():
            if name.endswith(".mag_logit"):
                self.w[name] = t.to(self.ldtype)
            else:
                self.w[name] = t if dtype is None else t.to(dtype)
        self.bias = btype == "qwen2" or bool(c.get("attention_bias", False))
        need = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if self.tie else ["lm_head.weight"])
        for l in range(self.L):
            p = "model.layers.%d." % l
            need += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            need += [p + "self_attn.%s_proj.weight" % m for m in "qkvo"]
            need += [p + "mlp.%s_proj.weight" % m for m in ("gate", "up", "down")]
            if self.bias:
                need += [p + "self_attn.%s_proj.bias" % m for m in "qkv"]
        missing = [n for n in need if n not in self.w]
        if missing:
            raise ValueError("missing tensors: %s" % ", ".join(missing[:8]))
        self.liza_impl = "auto"  # "auto": chunked for T > 1, steps for T == 1; or "chunk" / "steps"

    # -------------------------------------------------------------- helpers
    def _lin(self, x, name, bias=False):
        return torch.nn.functional.linear(x, self.w[name + ".weight"], self.w[name + ".bias"] if bias else None)

    def _rope(self, x, pos):
        """x [B, heads, T, d], pos long [T]."""
        ang = pos.to(torch.float64)[:, None] * self.inv_freq[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        cos, sin = ang.cos().to(x.device, x.dtype), ang.sin().to(x.device, x.dtype)
        return x * cos + _rotate_half(x) * sin

    def _mu(self, l):
        if self.mag_mode == "fixed":
            return self.mu_fixed
        return torch.sigmoid(self.w["model.layers.%d.self_attn.mag_logit" % l])

    # -------------------------------------------------------------- branches
    def _kv(self, k, v, lc, p0):
        """Store the new RoPE'd k/v [B,Hkv,T,d] (positions p0..p0+T-1) in the cache and
        return (keys, values, key positions) the T new queries attend over."""
        B, Hkv, T, d = k.shape
        W = self.window
        if W is None:  # growable buffer; slot i holds position i
            n = p0
            cap = 0 if lc.k is None else lc.k.shape[2]
            if n + T > cap:
                cap = max(n + T, 2 * cap, 16)
                nk, nv = k.new_zeros(B, Hkv, cap, d), v.new_zeros(B, Hkv, cap, d)
                if lc.k is not None:
                    nk[:, :, :n], nv[:, :, :n] = lc.k[:, :, :n], lc.v[:, :, :n]
                lc.k, lc.v = nk, nv
            lc.k[:, :, n:n + T], lc.v[:, :, n:n + T] = k, v
            return lc.k[:, :, :n + T], lc.v[:, :, :n + T], torch.arange(n + T, device=k.device)
        # sliding window: a ring of W slots, position p in slot p mod W (kpos -1: empty)
        if lc.k is None:
            lc.k, lc.v = k.new_zeros(B, Hkv, W, d), v.new_zeros(B, Hkv, W, d)
            lc.kpos = torch.full((W,), -1, dtype=torch.long, device=k.device)
        pos = torch.arange(p0, p0 + T, device=k.device)
        if T == 1:  # the evicted slot (position p0-W) is invisible to query p0
            slot = p0 % W
            lc.k[:, :, slot], lc.v[:, :, slot] = k[:, :, 0], v[:, :, 0]
            lc.kpos[slot] = p0
            return lc.k, lc.v, lc.kpos
        valid = lc.kpos >= 0
        keys = torch.cat([lc.k[:, :, valid], k], dim=2)
        vals = torch.cat([lc.v[:, :, valid], v], dim=2)
        kpos = torch.cat([lc.kpos[valid], pos])
        m = min(T, W)
        slots = pos[-m:] % W
        lc.k[:, :, slots], lc.v[:, :, slots] = k[:, :, -m:], v[:, :, -m:]
        lc.kpos[slots] = pos[-m:]
        return keys, vals, kpos

    def _softmax(self, q, k, v, lc, p0):
        """q [B,H,T,d], k/v [B,Hkv,T,d] after RoPE; returns [B,T,H*d]; updates the KV cache."""
        B, H, T, d = q.shape
        keys, vals, kpos = self._kv(k, v, lc, p0)
        ct = self.ldtype
        qg = q.to(ct).reshape(B, self.Hkv, self.g, T, d)
        kk, vv = keys.to(ct)[:, :, None], vals.to(ct)[:, :, None]
        outs = []
        blk = 512
        for s in range(0, T, blk):
            qpos = torch.arange(p0 + s, p0 + min(T, s + blk), device=q.device)
            ok = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= 0)
            if self.window is not None:
                ok = ok & (kpos[None, :] > qpos[:, None] - self.window)
            sc = (qg[:, :, :, s:s + blk] @ kk.transpose(-1, -2)) * (d ** -0.5)
            sc = sc.masked_fill(~ok, float("-inf"))
            outs.append(torch.softmax(sc, dim=-1) @ vv)
        att = torch.cat(outs, dim=3).reshape(B, H, T, d).to(q.dtype)
        return att.transpose(1, 2).reshape(B, T, H * d)

    def _expand(self, x, rel, idx, m):
        """Virtual token m (LIZA.md 2.4) of the rows idx of x [B,Hkv,Tx,d] whose
        document positions are rel (long [T]); rows before idx are the history."""
        out = None
        if self.trick in ("dt", "rdt"):
            acc = 0
            for i in range(m + 1):
                src = x[:, :, torch.clamp(idx - i, min=0)]
                ok = (rel >= i).to(x.dtype)[:, None]
                acc = acc + ((-1) ** i) * math.comb(m, i) * src * ok
            out = acc * (2.0 ** -m)
        if self.trick in ("rot", "rdt"):
            r = _rot_pairs(x[:, :, idx], 2.0 * math.pi * m / self.order)
            out = r if out is None else 0.5 * (out + r)
        return out

    def _liza(self, q, k, v, lc, p0):
        """o_lin before o_proj: y [B,T,H*d] RMS-normalised, from the raw q [B,H,T,d], k/v [B,Hkv,T,d]."""
        B, H, T, d = q.shape
        Hkv, n = self.Hkv, self.order
        ct = self.ldtype
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        if lc.hk is not None:
            kx, vx = torch.cat([lc.hk, k], dim=2), torch.cat([lc.hv, v], dim=2)
        else:
            kx, vx = k, v
        h = kx.shape[2] - T
        idx = torch.arange(h, h + T, device=q.device)
        rel = torch.arange(p0, p0 + T, device=q.device)  # document position of each new token

        def pool(x):
            return (x[:, :, idx - torch.clamp(rel, max=2)] + x[:, :, idx - torch.clamp(rel, max=1)]
                    + x[:, :, idx]) / 3.0

        gates = {}
        if "k" in (self.alpha_gate, self.beta_gate) or "kv" in (self.alpha_gate, self.beta_gate):
            gates["k"] = torch.sigmoid(pool(kx))
        if "v" in (self.alpha_gate, self.beta_gate) or "kv" in (self.alpha_gate, self.beta_gate):
            gates["v"] = torch.sigmoid(pool(vx))
        if "kv" in (self.alpha_gate, self.beta_gate):
            gates["kv"] = gates["k"] * gates["v"]
        beta = 0.5 if self.beta_gate == "c" else gates[self.beta_gate].reshape(B * Hkv, T, d)
        log_alpha = None if self.alpha_gate == "c" else \
            torch.log(gates[self.alpha_gate].mean(-1)).reshape(B * Hkv, T)
        kh, vh = _feature(kx), vx * (d ** -0.5)
        K = torch.stack([self._expand(kh, rel, idx, m) for m in range(n)], dim=3).reshape(B * Hkv, T, n, d)
        Vv = torch.stack([self._expand(vh, rel, idx, m) for m in range(n)], dim=3).reshape(B * Hkv, T, n, d)
        qh = _feature(q).reshape(B * Hkv, self.g, T, d)
        S = lc.S.reshape(B * Hkv, d, d) if lc.S is not None else q.new_zeros(B * Hkv, d, d)
        impl = self.liza_impl
        if impl == "auto":
            impl = "steps" if T == 1 else "chunk"
        fn = liza_steps if impl == "steps" else liza_chunked
        y, S = fn(qh, K, Vv, beta, log_alpha, S, p0, self.C, self.linear)
        lc.S = S.reshape(B, Hkv, d, d)
        lc.hk, lc.hv = kx[:, :, -self.hist:], vx[:, :, -self.hist:]
        y = y.reshape(B, H, T, d).transpose(1, 2).reshape(B, T, H * d)
        return _rms(y, None, LIZA_NORM_EPS)

    # -------------------------------------------------------------- forward
    def forward(self, input_ids, cache=None, last_only=False):
        """Logits [T, V] ([B, T, V] for [B, T] ids; [.., 1, V] with last_only)
        and the cache, continued from `cache` (None: a new sequence)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).to(self.w["model.embed_tokens.weight"].device)
        single = ids.dim() == 1
        if single:
            ids = ids[None]
        B, T = ids.shape
        if cache is None:
            cache = TitanCache(self.L)
        if T == 0:
            raise ValueError("forward: no tokens")
        p0 = cache.pos
        pos = torch.arange(p0, p0 + T)
        H, Hkv, d = self.H, self.Hkv, self.d
        x = self.w["model.embed_tokens.weight"][ids]
        for l in range(self.L):
            p = "model.layers.%d." % l
            lc = cache.layers[l]
            a = _rms(x, self.w[p + "input_layernorm.weight"], self.eps)
            q = self._lin(a, p + "self_attn.q_proj", self.bias).view(B, T, H, d).transpose(1, 2)
            k = self._lin(a, p + "self_attn.k_proj", self.bias).view(B, T, Hkv, d).transpose(1, 2)
            v = self._lin(a, p + "self_attn.v_proj", self.bias).view(B, T, Hkv, d).transpose(1, 2)
            o_base = None
            if not self.pure_linear:
                att = self._softmax(self._rope(q, pos), self._rope(k, pos), v, lc, p0)
                o_base = self._lin(att, p + "self_attn.o_proj")
            if self.liza:
                y = self._liza(q, k, v, lc, p0).to(x.dtype)
                o_lin = self._lin(y, p + "self_attn.o_proj")
                if self.pure_linear:
                    o = o_lin
                else:
                    if self.base_scale:
                        ob = o_base.to(self.ldtype)
                        o_lin = (torch.sqrt((ob * ob).mean(-1, keepdim=True) + BASE_SCALE_EPS)
                                 * o_lin.to(self.ldtype)).to(x.dtype)
                    mu = self._mu(l)
                    if torch.is_tensor(mu):
                        mu = mu.to(x.dtype)
                    o = (1 - mu) * o_base + mu * o_lin
                    if self.cross_gate:
                        o = o + ((1 - mu) * o_base) * (mu * o_lin)
            else:
                o = o_base
            x = x + o
            b = _rms(x, self.w[p + "post_attention_layernorm.weight"], self.eps)
            gt = self._lin(b, p + "mlp.gate_proj")
            up = self._lin(b, p + "mlp.up_proj")
            x = x + self._lin(torch.nn.functional.silu(gt) * up, p + "mlp.down_proj")
        if last_only:
            x = x[:, -1:]
        x = _rms(x, self.w["model.norm.weight"], self.eps)
        E = self.w["model.embed_tokens.weight" if self.tie else "lm_head.weight"]
        logits = torch.nn.functional.linear(x, E)
        cache.pos = p0 + T
        return (logits[0] if single else logits), cache

    __call__ = forward

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens, eos_token_id=None):
        """Greedy decoding (lowest id on ties): the new ids as a list."""
        logits, cache = self.forward(torch.as_tensor(prompt_ids, dtype=torch.long), last_only=True)
        out = []
        for _ in range(max_new_tokens):
            nxt = int(torch.argmax(logits[-1]))
            out.append(nxt)
            if eos_token_id is not None and nxt in (eos_token_id if isinstance(eos_token_id, (list, tuple))
                                                     else [eos_token_id]):
                break
            logits, cache = self.forward(torch.tensor([nxt]), cache)
        return out
