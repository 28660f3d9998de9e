"""oracle - an independent float64 PyTorch implementation of the tptt model.

Written from /work/shared/spec/LIZA.md (sections 1, 4, 5) and docs/dump.md,
never from the C sources, so that `tptt dump` output can be checked against it.

What is implemented
-------------------
* The frozen Llama-family decoder (LIZA.md section 1) for LlamaForCausalLM,
  MistralForCausalLM and Qwen2ForCausalLM: RMSNorm, q/k/v (+bias for Qwen2),
  RoPE with the HF rotate_half pairing (feature i pairs with i+d/2),
  inv_freq_i = theta^(-2i/d), llama3 rope scaling as transformers'
  `_compute_llama3_parameters`, causal softmax attention (scale d^-1/2),
  sliding window (key j visible to query i iff i-W < j <= i), GQA (query head h
  uses kv head h // g), SwiGLU MLP, final norm, logits = x E^T.
* Packed rows: `doc_starts` make attention block-diagonal and restart RoPE
  positions at 0 at each document start.
* LoRA (section 4): y = x W^T (+b) + s (x A^T) B^T, s = alpha/r or alpha/sqrt(r)
  (rsLoRA), dropout 0.
* Loss (section 5): mean cross-entropy over labels != -100.
* LiZA (section 2) and MaG (section 3), with the choices of docs/dump.md
  "LiZA semantics fixed here": the linear branch reuses the layer's q, k, v
  projections (LoRA deltas and Qwen2 bias included) BEFORE RoPE and the layer's
  o projection (with its LoRA); causal window-3 pooling with replicate padding
  at document starts; beta/alpha gates k, v, kv, c (alpha = the mean over the d
  channels of the gate vector, one scalar per token and kv head); feature maps
  q^ = silu(q)/max(|silu(q)|, 1e-6), k^ likewise, v^ = v/sqrt(d); the delta
  rule token by token (`liza_recurrence`: S = 0 at each document start, decay
  once per real token before virtual step 0, DeltaProduct order n_h with the
  dt/rot/rdt expansions, the gelu_tanh state non-linearity phi after every C
  real tokens counted from each document start for `linear: false`, never after
  a document's last partial chunk); RMS normalisation over the H*d features
  (eps 1e-6, no weight); `base_scale_attn`; MaG additive and cross-gate mixing
  with mu from a schedule (`mag_mu`) or learnable (mu = sigmoid(logit), the
  logit [1] or [D] per layer taken from the dump).

The attention block is split into `_softmax_branch` (o_base), `_liza_branch`
(o_lin) and `_mix` (o_attn).

Everything is float64 unless a `dtype` is passed (the self-checks use float32
runs only to estimate how far an fp32 implementation can be expected to land).

Public API
----------
``ModelConfig.from_dict(config_json)``      parsed base-model config
``LizaConfig.from_config(tptt_config)``     LiZA/MaG settings of a dump's metadata config
``Decoder(cfg, params, lora=None, lora_scale=1.0, liza=None, mag_logits=None)``
    ``.forward(input_ids, doc_starts) -> logits``  (torch)
``liza_recurrence(q_hat, k_hat, v_hat, beta, log_alpha, doc_start, order, trick, linear, chunk)``
    the sequential LiZA recurrence of one head (LIZA.md 2.3-2.5) -> y
``mag_mu(mode, mu0, mu1, steps, values, period, step)``  the scheduled MaG weight
``PRESETS``                                 liza.preset -> recurrent_config
``default_labels(input_ids, doc_starts)``  labels as docs/dump.md defines them
``cross_entropy(logits, labels)``          mean CE over labels != -100
``llama3_inv_freq(inv_freq, scaling)``     transformers' llama3 rescaling
``run_case(model_dir, dump_path, info=None) -> {key: ndarray}``
``compare(dump, oracle) -> [(class, key, max_rel, rms_rel)]``
``tensor_class(key)``                      the class name compare() reports
"""

import json
import math
import os
import re
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_np as stnp  # noqa: E402

__all__ = [
    "ARCHS", "ATTN_MODULES", "MLP_MODULES", "PREFIX", "ModelConfig", "Decoder",
    "default_labels", "segments", "cross_entropy", "rope_inv_freq", "llama3_inv_freq",
    "rms_norm", "hf_tensor_shapes", "lora_in_out", "run_case", "compare", "tensor_class",
    "max_rel", "rms_rel", "PRESETS", "LizaConfig", "liza_recurrence", "liza_pool", "liza_feature",
    "liza_expand", "liza_phi", "mag_mu", "gelu_tanh", "mag_logit_key",
]

ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ATTN_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model."
IGNORE = -100


# ------------------------------------------------------------------ config

class ModelConfig:
    """The fields of LIZA.md section 1, with the defaults of docs/config-json.md."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    @classmethod
    def from_dict(cls, c):
        archs = c.get("architectures") or [None]
        if archs[0] not in ARCHS:
            raise ValueError("unsupported architecture %r" % (archs[0],))
        arch = ARCHS[archs[0]]
        D = int(c["hidden_size"])
        H = int(c["num_attention_heads"])
        Hkv = int(c.get("num_key_value_heads") or H)
        d = int(c.get("head_dim") or D // H)
        if H % Hkv:
            raise ValueError("num_key_value_heads %d does not divide %d" % (Hkv, H))
        if d % 2:
            raise ValueError("head_dim %d is odd" % d)
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError("hidden_act %r not supported" % c.get("hidden_act"))
        scaling = c.get("rope_scaling")
        if scaling is not None:
            rtype = scaling.get("rope_type", scaling.get("type"))
            if rtype == "default":
                scaling = None
            elif rtype != "llama3":
                raise ValueError("rope_scaling type %r not supported" % (rtype,))
        window = None
        if arch == "mistral":
            # docs/config-json.md: absent = 4096 (MistralConfig default), null = none
            window = c.get("sliding_window", 4096)
        elif arch == "qwen2" and c.get("use_sliding_window"):
            raise ValueError("Qwen2 use_sliding_window is not supported")
        return cls(arch=arch, D=D, F=int(c["intermediate_size"]), L=int(c["num_hidden_layers"]),
                   H=H, Hkv=Hkv, d=d, V=int(c["vocab_size"]),
                   eps=float(c.get("rms_norm_eps", 1e-6)), theta=float(c.get("rope_theta", 10000.0)),
                   rope_scaling=scaling, window=None if window is None else int(window),
                   tie=bool(c.get("tie_word_embeddings", False)), bias=(arch == "qwen2"))


def hf_tensor_shapes(cfg):
    """HF tensor name -> shape for a model of this config (FORMATS.md names)."""
    D, F, V, d = cfg.D, cfg.F, cfg.V, cfg.d
    q, kv = cfg.H * d, cfg.Hkv * d
    t = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for l in range(cfg.L):
        p = "model.layers.%d." % l
        t[p + "input_layernorm.weight"] = (D,)
        t[p + "post_attention_layernorm.weight"] = (D,)
        t[p + "self_attn.q_proj.weight"] = (q, D)
        t[p + "self_attn.k_proj.weight"] = (kv, D)
        t[p + "self_attn.v_proj.weight"] = (kv, D)
        t[p + "self_attn.o_proj.weight"] = (D, q)
        if cfg.bias:
            t[p + "self_attn.q_proj.bias"] = (q,)
            t[p + "self_attn.k_proj.bias"] = (kv,)
            t[p + "self_attn.v_proj.bias"] = (kv,)
        t[p + "mlp.gate_proj.weight"] = (F, D)
        t[p + "mlp.up_proj.weight"] = (F, D)
        t[p + "mlp.down_proj.weight"] = (D, F)
    if not cfg.tie:
        t["lm_head.weight"] = (V, D)
    return t


def module_name(l, short):
    """HF module path of a target module short name in layer l."""
    group = "self_attn" if short in ATTN_MODULES else "mlp"
    return "model.layers.%d.%s.%s" % (l, group, short)


def lora_in_out(cfg, short):
    """(in, out) features of a target module."""
    q, kv = cfg.H * cfg.d, cfg.Hkv * cfg.d
    return {"q_proj": (cfg.D, q), "k_proj": (cfg.D, kv), "v_proj": (cfg.D, kv), "o_proj": (q, cfg.D),
            "gate_proj": (cfg.D, cfg.F), "up_proj": (cfg.D, cfg.F), "down_proj": (cfg.F, cfg.D)}[short]


# ------------------------------------------------------------------ pieces

def rope_inv_freq(d, theta, scaling=None):
    """inv_freq_i = theta^(-2i/d), i = 0..d/2-1 (float64), llama3-scaled if asked."""
    i = torch.arange(0, d // 2, dtype=torch.float64)
    inv = theta ** (-2.0 * i / d)
    if scaling is not None:
        inv = llama3_inv_freq(inv, scaling)
    return inv


def llama3_inv_freq(inv_freq, scaling):
    """transformers `_compute_llama3_parameters`: three wavelength bands.

    wavelen = 2 pi / inv_freq; low_freq_wavelen = orig / low_freq_factor,
    high_freq_wavelen = orig / high_freq_factor.
    wavelen < high_freq_wavelen   -> unchanged (high frequencies)
    wavelen > low_freq_wavelen    -> inv_freq / factor (low frequencies)
    otherwise (medium)            -> (1-s) inv/factor + s inv,
                                     s = (orig/wavelen - low_ff) / (high_ff - low_ff)."""
    factor = float(scaling["factor"])
    low_ff = float(scaling["low_freq_factor"])
    high_ff = float(scaling["high_freq_factor"])
    orig = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = orig / low_ff
    high_freq_wavelen = orig / high_ff
    wavelen = 2 * math.pi / inv_freq
    out = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    s = (orig / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - s) * out / factor + s * out
    medium = (~(wavelen < high_freq_wavelen)) & (~(wavelen > low_freq_wavelen))
    return torch.where(medium, smoothed, out)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x, cos, sin):
    """x [B, heads, T, d]; cos/sin [B, T, d] (frequencies repeated: feature i and i+d/2 share one)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def _rope_adjacent(x, cos, sin):
    """Ablation only: rotate feature pairs (2i, 2i+1) by the angle of frequency i."""
    h = x.shape[-1] // 2
    c, s = cos[:, None, :, :h], sin[:, None, :, :h]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def rope_tables(pos, inv_freq, dtype):
    ang = pos.to(torch.float64)[..., None] * inv_freq  # [B, T, d/2]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def segments(doc_starts, B, T):
    """(positions [B,T], document index [B,T]) as long tensors from per-row doc starts."""
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.zeros(B, T, dtype=torch.long)
    for r in range(B):
        starts = list(doc_starts[r]) if doc_starts is not None else [0]
        if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= T:
            raise ValueError("row %d: bad doc_starts %r" % (r, starts))
        bounds = starts + [T]
        for k in range(len(starts)):
            s, e = bounds[k], bounds[k + 1]
            seg[r, s:e] = k
            pos[r, s:e] = torch.arange(e - s)
    return pos, seg


def attention_mask(seg, window):
    """bool [B, T, T]: query i may see key j (same document, j <= i, i-W < j)."""
    T = seg.shape[1]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    ok = (j <= i)
    if window is not None:
        ok = ok & (j > i - window)
    return ok[None] & (seg[:, :, None] == seg[:, None, :])


def default_labels(input_ids, doc_starts=None):
    """docs/dump.md: labels[r][t] = input_ids[r][t+1]; -100 at t = T-1 and where t+1 starts a document."""
    out = []
    for r, row in enumerate(input_ids):
        starts = set(doc_starts[r]) if doc_starts is not None else {0}
        T = len(row)
        out.append([IGNORE if (t == T - 1 or (t + 1) in starts) else int(row[t + 1]) for t in range(T)])
    return out


def rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def cross_entropy(logits, labels):
    """Mean cross-entropy over labels != -100 (logits [B,T,V], labels [B,T] long)."""
    V = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1),
                                             ignore_index=IGNORE, reduction="mean")


# ------------------------------------------------------------------ LiZA / MaG (LIZA.md sections 2, 3)

# liza.preset -> recurrent_config (the Python TPTT package's RECURRENT_MODES)
PRESETS = {
    "delta_rule":          dict(order=1, alpha_gate="c", beta_gate="k", linear=True, trick="dt"),
    "delta_rule_v":        dict(order=1, alpha_gate="c", beta_gate="v", linear=True, trick="dt"),
    "delta_rule_kv":       dict(order=1, alpha_gate="c", beta_gate="kv", linear=True, trick="dt"),
    "delta_rule_gelu":     dict(order=1, alpha_gate="c", beta_gate="k", linear=False, trick="dt"),
    "gated_delta_rule":    dict(order=1, alpha_gate="k", beta_gate="k", linear=True, trick="dt"),
    "delta_product":       dict(order=2, alpha_gate="c", beta_gate="k", linear=True, trick="dt"),
    "gated_delta_product": dict(order=2, alpha_gate="k", beta_gate="k", linear=True, trick="dt"),
    "delta_product_r":     dict(order=2, alpha_gate="c", beta_gate="k", linear=True, trick="rot"),
    "delta_product_c":     dict(order=2, alpha_gate="c", beta_gate="k", linear=True, trick="rdt"),
}
GATES = ("c", "k", "v", "kv")
TRICKS = ("dt", "rot", "rdt")
MAG_MODES = ("constant", "gradual", "cyclic", "learnable")
LIZA_NORM_EPS = 1e-6    # RMS normalisation of y (section 2.6)
BASE_SCALE_EPS = 1e-5   # base_scale_attn (section 2.6)
PHI_EPS = 1e-6          # row norm in phi (section 2.5)
FEATURE_EPS = 1e-6      # q^, k^ normalisation floor (section 2.2)


def _as_bool(x):
    if isinstance(x, str):
        if x.lower() in ("true", "1", "yes"):
            return True
        if x.lower() in ("false", "0", "no", ""):
            return False
        raise ValueError("not a boolean: %r" % x)
    return bool(x)


def _as_values(x):
    """mag_values as a list of floats (a JSON list or a comma string)."""
    if isinstance(x, str):
        x = [v for v in x.split(",") if v.strip()]
    return [float(v) for v in x]


def mag_mu(mode, mu0, mu1=1.0, steps=1000, values=(0.1, 0.5, 0.9), period=100, step=0):
    """The MaG weight of a schedule at a training step (LIZA.md section 3):
    constant: mu0; gradual: mu0 + (mu1 - mu0) * min(step, N) / N (mu1 when N <= 0);
    cyclic: values[(step // period) % len(values)]; learnable: mu0 (the init sigma(logit))."""
    step = int(step)
    if mode in ("constant", "learnable"):
        return float(mu0)
    if mode == "gradual":
        n = int(steps)
        if n <= 0:
            return float(mu1)
        return float(mu0) + (float(mu1) - float(mu0)) * min(max(step, 0), n) / n
    if mode == "cyclic":
        vals = _as_values(values)
        if not vals or int(period) <= 0:
            raise ValueError("cyclic MaG needs values and a period > 0")
        return vals[(step // int(period)) % len(vals)]
    raise ValueError("unknown mag mode %r" % (mode,))


def logit(p):
    return math.log(p / (1.0 - p))


def mag_logit_key(l):
    return PREFIX + "model.layers.%d.self_attn.mag_logit" % l


class LizaConfig:
    """LiZA + MaG settings (the fields of a dump's metadata `config`)."""

    FIELDS = dict(order=1, alpha_gate="c", beta_gate="k", linear=True, trick="dt", chunk=64,
                  base_scale_attn=False, cross_gate=False, mag_mode="constant", mu0=0.5, mu1=1.0,
                  steps=1000, values=(0.1, 0.5, 0.9), period=100, learnable_shape="scalar", step=0)

    def __init__(self, **kw):
        unknown = set(kw) - set(self.FIELDS)
        if unknown:
            raise ValueError("unknown LiZA fields %s" % sorted(unknown))
        self.__dict__.update(self.FIELDS)
        self.__dict__.update(kw)
        self.order = int(self.order)
        self.chunk = int(self.chunk)
        self.linear = _as_bool(self.linear)
        self.base_scale_attn = _as_bool(self.base_scale_attn)
        self.cross_gate = _as_bool(self.cross_gate)
        self.values = _as_values(self.values)
        if self.order < 1:
            raise ValueError("LiZA order %d < 1" % self.order)
        if self.alpha_gate not in GATES or self.beta_gate not in GATES:
            raise ValueError("LiZA gates alpha %r beta %r" % (self.alpha_gate, self.beta_gate))
        if self.trick not in TRICKS:
            raise ValueError("LiZA trick %r" % (self.trick,))
        if self.chunk < 1:
            raise ValueError("LiZA chunk size %d" % self.chunk)
        if self.mag_mode not in MAG_MODES:
            raise ValueError("MaG mode %r" % (self.mag_mode,))
        if self.learnable_shape not in ("scalar", "vector"):
            raise ValueError("MaG learnable shape %r" % (self.learnable_shape,))

    @classmethod
    def preset(cls, name, **kw):
        return cls(**dict(PRESETS[name], **kw))

    def replace(self, **kw):
        d = {k: getattr(self, k) for k in self.FIELDS}
        d.update(kw)
        return LizaConfig(**d)

    @classmethod
    def from_config(cls, conf):
        """From the JSON config of docs/dump.md; None when `liza_enabled` is false/absent."""
        if not _as_bool(conf.get("liza_enabled", False)):
            return None
        rc = conf.get("recurrent_config")
        if not isinstance(rc, dict):
            raise ValueError("liza_enabled but no recurrent_config in the config")
        try:
            kw = dict(order=rc["order"], alpha_gate=rc["alpha_gate"], beta_gate=rc["beta_gate"],
                      linear=rc["linear"], trick=rc["trick"], chunk=conf["max_chunk_size"],
                      # mu0: "mag_mu0"; configs without it (older checkpoints, hand-written
                      # configs) hold mu0 in "mag_weight", which now is the mu at mag_step
                      mu0=float(conf["mag_mu0"] if "mag_mu0" in conf else conf["mag_weight"]))
        except KeyError as e:
            raise ValueError("LiZA config lacks %s" % e)
        opt = dict(base_scale_attn="base_scale_attn", cross_gate="cross_gate", mag_mode="mag_mode",
                   mu1="mag_mu1", steps="mag_steps", values="mag_values", period="mag_period",
                   learnable_shape="mag_learnable_shape", step="mag_step")
        for f, key in opt.items():
            if conf.get(key) is not None:
                kw[f] = conf[key]
        return cls(**kw)

    def mu(self):
        """The scheduled mu (learnable: sigma of the logit init, i.e. mu0)."""
        return mag_mu(self.mag_mode, self.mu0, self.mu1, self.steps, self.values, self.period, self.step)

    def pure_linear(self):
        return self.mag_mode != "learnable" and self.mu() == 1.0 and not self.cross_gate


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def liza_phi(S):
    """phi(S)_{r,c} = (S_{r,c}/2) gelu_tanh(2 S_{r,c} / (|S_{r,:}|_2 + 1e-6)), S [..., d_k, d_v]."""
    rn = torch.linalg.vector_norm(S, dim=-1, keepdim=True)
    return 0.5 * S * gelu_tanh(2.0 * S / (rn + PHI_EPS))


def liza_feature(x):
    """u / max(|u|_2, 1e-6), u = silu(x), over the last (head) dimension."""
    u = torch.nn.functional.silu(x)
    return u / torch.clamp(torch.linalg.vector_norm(u, dim=-1, keepdim=True), min=FEATURE_EPS)


def doc_positions(doc_start, T):
    """Position of each token within its document, long [rows, T].

    doc_start: None (one document), a list of start positions, a bool tensor
    [T] or [rows, T] marking document starts (token 0 always starts one), or a
    long tensor of positions [rows, T] (returned as is, tagged by dtype long)."""
    if doc_start is None:
        mask = torch.zeros(1, T, dtype=torch.bool)
    elif torch.is_tensor(doc_start) and doc_start.dtype == torch.long:
        return doc_start.reshape(-1, T)
    elif torch.is_tensor(doc_start):
        mask = doc_start.to(torch.bool).reshape(-1, T).clone()
    else:
        mask = torch.zeros(1, T, dtype=torch.bool)
        for s in doc_start:
            if not 0 <= int(s) < T:
                raise ValueError("document start %s outside [0, %d)" % (s, T))
            mask[0, int(s)] = True
    mask[:, 0] = True
    pos = torch.zeros(mask.shape, dtype=torch.long)
    for t in range(1, T):
        pos[:, t] = torch.where(mask[:, t], torch.zeros_like(pos[:, t]), pos[:, t - 1] + 1)
    return pos


def liza_pool(x, pos):
    """Causal window-3 average with replicate padding at document starts:
    (x_{t-min(2,p)} + x_{t-min(1,p)} + x_t) / 3, p = pos_t. x [..., T, d], pos broadcastable to x[..., 0]."""
    T = x.shape[-2]
    pos = pos.expand(x.shape[:-1])
    t = torch.arange(T)
    out = x
    for j in (1, 2):
        idx = (t - torch.clamp(pos, max=j))[..., None].expand(x.shape)
        out = out + torch.gather(x, -2, idx)
    return out / 3.0


def liza_expand(x, pos, m, order, trick):
    """Virtual token m of x [..., T, d] (LIZA.md 2.4)."""
    if trick == "dt":
        T = x.shape[-2]
        pos = pos.expand(x.shape[:-1])
        out = torch.zeros_like(x)
        for i in range(m + 1):
            if i >= T:
                break
            shifted = torch.cat([torch.zeros_like(x[..., :i, :]), x[..., :T - i, :]], dim=-2)
            ok = (pos >= i).to(x.dtype)[..., None]  # x_{t-i} = 0 before the document start
            out = out + ((-1) ** i) * math.comb(m, i) * shifted * ok
        return out * (2.0 ** -m)
    if trick == "rot":
        th = 2.0 * math.pi * m / order
        c, s = math.cos(th), math.sin(th)
        d = x.shape[-1]
        p = d // 2
        x0, x1 = x[..., 0:2 * p:2], x[..., 1:2 * p:2]
        rot = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
        if d % 2:
            rot = torch.cat([rot, x[..., 2 * p:]], dim=-1)
        return rot
    if trick == "rdt":
        return 0.5 * (liza_expand(x, pos, m, order, "dt") + liza_expand(x, pos, m, order, "rot"))
    raise ValueError("unknown trick %r" % (trick,))


def liza_recurrence(q_hat, k_hat, v_hat, beta, log_alpha=None, doc_start=None, order=1, trick="dt",
                    linear=True, chunk=64):
    """The LiZA recurrence of LIZA.md 2.3-2.5, token by token, for one head
    (q_hat, k_hat [T, d], v_hat [T, dv]) or a batch of heads ([N, T, d]).

    beta: a number, [T] (one scalar per token) or [T, d] (the gate vector;
    with d == dv), with the same leading N as q_hat when batched.
    log_alpha: None (no decay) or [T] / [N, T]. doc_start: see doc_positions.
    Returns y [T, dv] (or [N, T, dv]): y_t = S_t^T q_t after token t's last
    virtual step. Autograd flows to every tensor input."""
    single = q_hat.dim() == 2
    q, k, v = (t.unsqueeze(0) if single else t for t in (q_hat, k_hat, v_hat))
    N, T, d = k.shape
    dv = v.shape[-1]
    lead = 0 if single else 1
    beta = torch.as_tensor(beta, dtype=k.dtype)
    if beta.dim() == lead + 1:
        beta = beta.unsqueeze(-1)  # one scalar per token
    elif beta.dim() not in (0, lead + 2):
        raise ValueError("beta of shape %s" % (tuple(beta.shape),))
    if single and beta.dim() > 0:
        beta = beta.unsqueeze(0)
    alpha = None
    if log_alpha is not None:
        alpha = torch.exp(torch.as_tensor(log_alpha, dtype=k.dtype))
        if single:
            alpha = alpha.unsqueeze(0)
        alpha = alpha.expand(N, T)
    pos = doc_positions(doc_start, T).expand(N, T)
    K = [liza_expand(k, pos, m, order, trick) for m in range(order)]
    V = [liza_expand(v, pos, m, order, trick) for m in range(order)]
    S = k.new_zeros(N, d, dv)
    ys = []
    for t in range(T):
        S = torch.where((pos[:, t] == 0)[:, None, None], torch.zeros_like(S), S)  # document start
        if alpha is not None:
            S = alpha[:, t, None, None] * S  # decay once per real token
        b = beta if beta.dim() == 0 else beta[:, t]
        for m in range(order):
            kk, vv = K[m][:, t], V[m][:, t]
            kt, vt = b * kk, b * vv
            S = S + kk[:, :, None] * (vt - torch.einsum("nkv,nk->nv", S, kt))[:, None, :]
        ys.append(torch.einsum("nkv,nk->nv", S, q[:, t]))
        if not linear:
            done = ((pos[:, t] + 1) % chunk == 0).nonzero().flatten()
            if done.numel():
                S = S.index_put((done,), liza_phi(S[done]))
    y = torch.stack(ys, dim=1)
    return y[0] if single else y


# ------------------------------------------------------------------ model

class Decoder:
    """The decoder of LIZA.md section 1 with LoRA (section 4).

    params: HF tensor name -> torch tensor (any requires_grad leaves are the
            trainables; tied models have no "lm_head.weight").
    lora:   HF module name (e.g. "model.layers.0.self_attn.q_proj") -> (A [r,in], B [out,r]).
    """

    gqa_modulo = False     # ablation only: kv head h % Hkv (wrong for HF)
    rope_adjacent = False  # ablation only: rotate pairs (2i, 2i+1) (wrong for HF)
    liza_no_docs = False   # ablation only: the LiZA branch ignores document starts
    liza_no_pool = False   # ablation only: gates from the unpooled projections

    def __init__(self, cfg, params, lora=None, lora_scale=1.0, liza=None, mag_logits=None):
        """liza: a LizaConfig (None: no linear branch, o_attn = o_base).
        mag_logits: layer -> logit tensor [1] or [D] (mag_mode learnable)."""
        self.cfg = cfg
        self.p = params
        self.lora = lora or {}
        self.s = float(lora_scale)
        self.liza = liza
        self.mag_logits = dict(mag_logits or {})
        if liza is not None and liza.mag_mode == "learnable":
            for l in range(cfg.L):
                m = self.mag_logits.get(l)
                if m is None:
                    raise ValueError("learnable MaG: no logit for layer %d" % l)
                want = (1,) if liza.learnable_shape == "scalar" else (cfg.D,)
                if tuple(m.shape) != want:
                    raise ValueError("layer %d MaG logit shape %s, want %s" % (l, tuple(m.shape), want))
        self.inv_freq = rope_inv_freq(cfg.d, cfg.theta, cfg.rope_scaling)
        unknown = set(self.lora) - {module_name(l, m) for l in range(cfg.L) for m in ATTN_MODULES + MLP_MODULES}
        if unknown:
            raise ValueError("LoRA on unknown modules: %s" % sorted(unknown))

    # y = x W^T (+b) + s (x A^T) B^T
    def proj(self, module, x):
        y = x @ self.p[module + ".weight"].t()
        b = self.p.get(module + ".bias")
        if b is not None:
            y = y + b
        if module in self.lora:
            A, B = self.lora[module]
            y = y + self.s * ((x @ A.t()) @ B.t())
        return y

    def norm(self, name, x):
        return rms_norm(x, self.p[name], self.cfg.eps)

    def forward(self, input_ids, doc_starts=None):
        cfg = self.cfg
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        Bsz, T = ids.shape
        E = self.p["model.embed_tokens.weight"]
        pos, seg = segments(doc_starts, Bsz, T)
        cos, sin = rope_tables(pos, self.inv_freq, E.dtype)
        ctx = {"pos": pos, "seg": seg, "cos": cos, "sin": sin, "mask": attention_mask(seg, cfg.window)}
        x = E[ids]
        for l in range(cfg.L):
            pre = "model.layers.%d." % l
            a = self.norm(pre + "input_layernorm.weight", x)
            x = x + self.attention_block(l, a, ctx)
            b = self.norm(pre + "post_attention_layernorm.weight", x)
            g = self.proj(pre + "mlp.gate_proj", b)
            u = self.proj(pre + "mlp.up_proj", b)
            x = x + self.proj(pre + "mlp.down_proj", torch.nn.functional.silu(g) * u)
        x = self.norm("model.norm.weight", x)
        W = E if cfg.tie else self.p["lm_head.weight"]
        return x @ W.t()

    def attention_block(self, l, a, ctx):
        """o_attn for layer l from the normalised input a [B,T,D]."""
        cfg = self.cfg
        Bsz, T, _ = a.shape
        pre = "model.layers.%d.self_attn." % l
        # raw projections (with LoRA), before RoPE: LiZA (section 2) reuses these
        q = self.proj(pre + "q_proj", a).view(Bsz, T, cfg.H, cfg.d).transpose(1, 2)
        k = self.proj(pre + "k_proj", a).view(Bsz, T, cfg.Hkv, cfg.d).transpose(1, 2)
        v = self.proj(pre + "v_proj", a).view(Bsz, T, cfg.Hkv, cfg.d).transpose(1, 2)
        o_base = self.proj(pre + "o_proj", self._softmax_branch(q, k, v, ctx))
        return self._mix(l, o_base, q, k, v, ctx)

    def _softmax_branch(self, q, k, v, ctx):
        """Causal (windowed, block-diagonal) softmax attention; returns concat heads [B,T,H*d]."""
        cfg = self.cfg
        Bsz, _, T, d = q.shape
        g = cfg.H // cfg.Hkv
        if self.rope_adjacent:
            q, k = (_rope_adjacent(t, ctx["cos"], ctx["sin"]) for t in (q, k))
        else:
            q = apply_rope(q, ctx["cos"], ctx["sin"])
            k = apply_rope(k, ctx["cos"], ctx["sin"])
        if self.gqa_modulo:
            k, v = k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1)
        else:
            k = k.repeat_interleave(g, dim=1)  # query head h -> kv head h // g
            v = v.repeat_interleave(g, dim=1)
        scores = (q @ k.transpose(-1, -2)) * (d ** -0.5)
        scores = scores.masked_fill(~ctx["mask"][:, None], float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v  # [B,H,T,d]
        return att.transpose(1, 2).reshape(Bsz, T, cfg.H * d)

    def _liza_branch(self, l, o_base, q, k, v, ctx):
        """o_lin of LIZA.md section 2 from the raw (pre-RoPE) q [B,H,T,d], k, v [B,Hkv,T,d]."""
        lz = self.liza
        Bsz, H, T, d = q.shape
        g = H // k.shape[1]
        pos = ctx["pos"]
        if self.liza_no_docs:
            pos = torch.arange(T).expand(Bsz, T)
        pos = pos[:, None, :]  # [B,1,T]
        # gates from the raw projections (2.1)
        kp, vp = (k, v) if self.liza_no_pool else (liza_pool(k, pos), liza_pool(v, pos))
        gate = {"k": torch.sigmoid(kp), "v": torch.sigmoid(vp)}
        gate["kv"] = gate["k"] * gate["v"]
        beta = 0.5 if lz.beta_gate == "c" else gate[lz.beta_gate]             # [B,Hkv,T,d]
        log_alpha = None if lz.alpha_gate == "c" else torch.log(gate[lz.alpha_gate].mean(-1))  # [B,Hkv,T]
        # feature maps (2.2); kv head -> its g query heads (the states of a group coincide)
        qh = liza_feature(q)
        kh = liza_feature(k).repeat_interleave(g, dim=1)
        vh = (v * d ** -0.5).repeat_interleave(g, dim=1)
        if torch.is_tensor(beta):
            beta = beta.repeat_interleave(g, dim=1).reshape(Bsz * H, T, d)
        if log_alpha is not None:
            log_alpha = log_alpha.repeat_interleave(g, dim=1).reshape(Bsz * H, T)
        y = liza_recurrence(qh.reshape(Bsz * H, T, d), kh.reshape(Bsz * H, T, d), vh.reshape(Bsz * H, T, d),
                            beta, log_alpha, pos.expand(Bsz, H, T).reshape(Bsz * H, T),
                            lz.order, lz.trick, lz.linear, lz.chunk)
        y = y.reshape(Bsz, H, T, d).transpose(1, 2).reshape(Bsz, T, H * d)
        y = y / torch.sqrt((y * y).mean(-1, keepdim=True) + LIZA_NORM_EPS)  # 2.6, no weight
        o_lin = self.proj("model.layers.%d.self_attn.o_proj" % l, y)
        if lz.base_scale_attn:
            o_lin = torch.sqrt((o_base * o_base).mean(-1, keepdim=True) + BASE_SCALE_EPS) * o_lin
        return o_lin

    def mu(self, l):
        """The MaG weight of layer l: a float (schedule) or sigma(logit) ([1] or [D])."""
        if self.liza.mag_mode == "learnable":
            return torch.sigmoid(self.mag_logits[l])
        return self.liza.mu()

    def _mix(self, l, o_base, q, k, v, ctx):
        """MaG mix (section 3). Without LiZA the attention output is the softmax branch."""
        if self.liza is None:
            return o_base
        o_lin = self._liza_branch(l, o_base, q, k, v, ctx)
        mu = self.mu(l)
        out = (1 - mu) * o_base + mu * o_lin
        if self.liza.cross_gate:
            out = out + ((1 - mu) * o_base) * (mu * o_lin)
        return out


# ------------------------------------------------------------------ dump cases

_LORA_RE = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
_MAG_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.self_attn\.mag_logit$")
LIZA_ABLATIONS = ("liza", "liza_docs", "phi", "decay", "order", "trick", "pool", "beta", "cross_gate",
                  "base_scale", "mag_vector")


def _t(a, dtype=torch.float64):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, dtype=np.float64))).to(dtype)


def run_case(model_dir, dump_path, info=None, ablate=(), grads=True):
    """Rebuild the computation of one `tptt dump` file and return the oracle's
    {"logits", "loss", "<param key>.grad", ...} as float64 numpy arrays.

    Frozen weights come from model_dir; the values of every trainable parameter
    (keys of the dump without ".grad") come from the dump itself, so LoRA init
    randomness does not matter. LoRA is applied to exactly the modules whose
    lora_A/lora_B are in the dump. If `info` is a dict it receives the parsed
    config/batch metadata, the labels used and the list of parameter keys.

    `ablate` switches features OFF on purpose, for the tests' sensitivity
    checks (a case only tests a feature if turning it off changes the result):
    "window" (no sliding window), "rope_scaling" (plain RoPE), "docs" (each
    row one document, labels unchanged), "rslora" (the other LoRA scale),
    "bias" (Qwen2 q/k/v biases dropped), "gqa" (query head h uses kv head
    h % Hkv instead of h // g), "rope_pairs" (RoPE rotating adjacent pairs
    (2i, 2i+1), the GPT-J/Meta layout, instead of HF's (i, i+d/2)).
    LiZA ablations: "liza" (no linear branch: o_attn = o_base, what
    `mag.mu0=0` without learnable logits gives), "liza_docs" (the LiZA state,
    pooling and dt expansion run across document starts; softmax keeps them),
    "phi" (linear: true), "decay" (alpha_gate c), "order" (order 1), "trick"
    (dt), "pool" (gates from the unpooled projections), "beta" (beta_gate c),
    "cross_gate" (off), "base_scale" (off), "mag_vector" (each vector logit
    replaced by its mean).
    grads=False skips the backward pass (only logits and loss come back)."""
    unknown = set(ablate) - {"window", "rope_scaling", "docs", "rslora", "bias", "gqa", "rope_pairs"} \
        - set(LIZA_ABLATIONS)
    if unknown:
        raise ValueError("unknown ablation %s" % sorted(unknown))
    cfg_json, frozen = stnp.load_model_dir(model_dir)
    cfg = ModelConfig.from_dict(cfg_json)
    if "window" in ablate:
        cfg.window = None
    if "rope_scaling" in ablate:
        cfg.rope_scaling = None
    dump, meta = stnp.load(dump_path)
    conf = json.loads(meta["config"])
    batch = json.loads(meta["batch"])
    lcfg = conf.get("lora_config") or {}

    params = {name: _t(a) for name, a in frozen.items()}
    shapes = hf_tensor_shapes(cfg)
    if set(params) != set(shapes):
        raise ValueError("model tensors differ from the config: %s" % sorted(set(params) ^ set(shapes)))
    leaves = {}  # dump key -> leaf tensor
    lora_parts = {}
    mag_logits = {}  # layer -> leaf
    for key, val in dump.items():
        if key in ("logits", "loss") or key.endswith(".grad"):
            continue
        if key + ".grad" not in dump:
            raise ValueError("%s: parameter %s has no .grad" % (dump_path, key))
        leaf = _t(val).requires_grad_(True)
        leaves[key] = leaf
        m = _LORA_RE.match(key)
        mm = _MAG_RE.match(key)
        if m:
            lora_parts.setdefault(m.group(1), {})[m.group(2)] = leaf
        elif mm and int(mm.group(1)) < cfg.L:
            mag_logits[int(mm.group(1))] = leaf
        elif key.startswith(PREFIX) and key[len(PREFIX):] in params:
            name = key[len(PREFIX):]
            if tuple(val.shape) != tuple(shapes[name]):
                raise ValueError("%s: %s has shape %s, model says %s" % (dump_path, key, val.shape, shapes[name]))
            params[name] = leaf
        else:
            raise ValueError("%s: unknown trainable key %s" % (dump_path, key))
    lora = {}
    r = None
    for mod, parts in lora_parts.items():
        if set(parts) != {"A", "B"}:
            raise ValueError("%s: module %s lacks lora_A or lora_B" % (dump_path, mod))
        A, B = parts["A"], parts["B"]
        r = A.shape[0]
        if B.shape[1] != r:
            raise ValueError("%s: %s lora ranks differ" % (dump_path, mod))
        lora[mod] = (A, B)
    scale = 1.0
    if lora:
        r_cfg = int(lcfg.get("r", r))
        if r_cfg != r:
            raise ValueError("%s: lora_config r=%d but A has %d rows" % (dump_path, r_cfg, r))
        alpha = float(lcfg["lora_alpha"])
        rslora = bool(lcfg.get("use_rslora")) != ("rslora" in ablate)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        if float(lcfg.get("lora_dropout", 0.0)) != 0.0:
            raise ValueError("%s: the oracle needs lora_dropout = 0" % dump_path)

    ids = batch["input_ids"]
    doc_starts = batch.get("doc_starts") or [[0] for _ in ids]
    labels = batch.get("labels")
    if labels is None:
        labels = default_labels(ids, doc_starts)
    if "docs" in ablate:
        doc_starts = [[0] for _ in ids]
    if "bias" in ablate:
        params = {n: (torch.zeros_like(t) if n.endswith(".bias") else t) for n, t in params.items()}
    liza = LizaConfig.from_config(conf)
    if liza is None:
        if mag_logits:
            raise ValueError("%s: mag_logit without liza_enabled" % dump_path)
        if set(ablate) & set(LIZA_ABLATIONS):
            raise ValueError("%s: LiZA ablation %s without LiZA" % (dump_path, sorted(set(ablate) & set(LIZA_ABLATIONS))))
    else:
        if mag_logits and liza.mag_mode != "learnable":
            raise ValueError("%s: mag_logit with mag_mode %s" % (dump_path, liza.mag_mode))
        if liza.mag_mode == "learnable":
            want = (1,) if liza.learnable_shape == "scalar" else (cfg.D,)
            for l in range(cfg.L):
                if l not in mag_logits:
                    raise ValueError("%s: learnable MaG but no %s" % (dump_path, mag_logit_key(l)))
                if tuple(mag_logits[l].shape) != want:
                    raise ValueError("%s: %s has shape %s, want %s" % (dump_path, mag_logit_key(l),
                                                                     tuple(mag_logits[l].shape), want))
        ab = {}
        if "phi" in ablate:
            ab["linear"] = True
        if "decay" in ablate:
            ab["alpha_gate"] = "c"
        if "order" in ablate:
            ab["order"] = 1
        if "trick" in ablate:
            ab["trick"] = "dt"
        if "beta" in ablate:
            ab["beta_gate"] = "c"
        if "cross_gate" in ablate:
            ab["cross_gate"] = False
        if "base_scale" in ablate:
            ab["base_scale_attn"] = False
        liza = liza.replace(**ab)
        if "liza" in ablate:
            liza = None
    mag_in = dict(mag_logits)
    if "mag_vector" in ablate:
        mag_in = {l: t.mean().expand(t.shape) for l, t in mag_in.items()}
    model = Decoder(cfg, params, lora, scale, liza=liza, mag_logits=mag_in if liza is not None else None)
    model.gqa_modulo = "gqa" in ablate
    model.rope_adjacent = "rope_pairs" in ablate
    model.liza_no_docs = "liza_docs" in ablate
    model.liza_no_pool = "pool" in ablate
    logits = model.forward(ids, doc_starts)
    loss = cross_entropy(logits, torch.as_tensor(labels, dtype=torch.long))
    keys = list(leaves)
    if not grads:
        keys = []
    gs = torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True) if keys else []
    out = {"logits": logits.detach().numpy(), "loss": loss.detach().numpy()}
    for k, g in zip(keys, gs):
        out[k + ".grad"] = np.zeros(leaves[k].shape) if g is None else g.numpy()
    if info is not None:
        info.update(config=conf, batch=batch, labels=labels, doc_starts=doc_starts, lora_scale=scale,
                    param_keys=list(leaves), model_config=cfg, lora_modules=sorted(lora), liza=liza,
                    mag_layers=sorted(mag_logits))
    return out


# ------------------------------------------------------------------ compare

def tensor_class(key):
    """Class of a dump key for reporting: logits, loss, lora_A, lora_B, mag_logit,
    embed, lm_head, norm, bias, attn_w, mlp_w (gradients of the same)."""
    k = key[:-5] if key.endswith(".grad") else key
    if k in ("logits", "loss"):
        return k
    m = _LORA_RE.match(k)
    if m:
        return "lora_" + m.group(2)
    if _MAG_RE.match(k):
        return "mag_logit"
    if k.endswith("embed_tokens.weight"):
        return "embed"
    if k.endswith("lm_head.weight"):
        return "lm_head"
    if "norm" in k:
        return "norm"
    if k.endswith(".bias"):
        return "bias"
    if ".self_attn." in k:
        return "attn_w"
    if ".mlp." in k:
        return "mlp_w"
    return "other"


def max_rel(a, b):
    """max|a-b| / max|b| (b the reference); 0 when both are exactly zero."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = float(np.max(np.abs(a - b))) if a.size else 0.0
    den = float(np.max(np.abs(b))) if b.size else 0.0
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def rms_rel(a, b):
    """||a-b||_2 / ||b||_2 (b the reference); 0 when both are exactly zero."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = float(np.linalg.norm((a - b).ravel()))
    den = float(np.linalg.norm(b.ravel()))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def compare(dump, oracle):
    """[(class, key, max_rel, rms_rel)] for every key the oracle produced, in
    order; a key missing from the dump, a shape mismatch or a non-finite value
    gives inf. Dump ".grad" keys the oracle lacks are reported as inf too."""
    rows = []
    for key in oracle:
        cls = tensor_class(key)
        if key.endswith(".grad"):
            cls += ".grad"
        if key not in dump:
            rows.append((cls, key, math.inf, math.inf))
            continue
        a = np.asarray(dump[key], dtype=np.float64)
        b = np.asarray(oracle[key], dtype=np.float64)
        if a.shape != b.shape or not np.all(np.isfinite(a)):
            rows.append((cls, key, math.inf, math.inf))
            continue
        rows.append((cls, key, max_rel(a, b), rms_rel(a, b)))
    for key in dump:
        if key.endswith(".grad") and key not in oracle:
            rows.append((tensor_class(key) + ".grad", key, math.inf, math.inf))
    return rows
