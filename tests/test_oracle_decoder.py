"""test_oracle_decoder - `tptt dump` against the independent float64 PyTorch oracle.

For a matrix of tiny models (`tptt init-model`, every architecture, GQA,
head_dim != D/H, sliding window, tied/untied, BF16/F16/F32 weights, llama3
rope scaling) and batches (packed rows with 3 documents and different
doc_starts per row, explicit labels with -100), one forward + backward is
dumped with `tptt dump` and rebuilt by tests/py/oracle.py (LIZA.md sections 1,
4, 5, written without reading the C code). Trainable values are taken from the
dump, frozen weights from the model directory.

Tolerances (b = oracle, a = dump; max-rel = max|a-b|/max|b|,
RMS-rel = ||a-b||/||b||):
  compute.matmul=f32   logits, loss max-rel <= 1e-4; every gradient RMS-rel <= 1e-4
  compute.matmul=bf16  loss rel <= 1e-2, logits max-rel <= 3e-2, gradients RMS-rel <= 3e-2
Also checked: the dump's metadata (settings, batch after defaults, default
labels), its key set per trainable mode, that full trainable weights equal the
model's values and that LoRA init follows docs/dump.md.

LiZA + MaG cases (LIZA_CASES, LIZA.md sections 2, 3): every liza.preset,
order 3 with each trick, decay on/off, every alpha/beta gate, linear: false
with small C and T not a multiple of C (C 3/4/5/8, T 13/21/40), 3 documents
per row, GQA (kv 1, 2) and MHA, learnable MaG scalar and vector (lora, all,
projections; gradients of mag_logit compared), gradual (mid, past the end) and
cyclic schedules, additive and cross gate, base_scale_attn, the pure-linear
model (mu0 = 1, no cross gate), recompute, every architecture. Checked on top:
the metadata's liza/mag fields (recurrent_config = the preset table with the
overrides, operator_mode, max_chunk_size, mag_weight = the schedule at mag_step (mag_mu0 its start),
...), the mag_logit init logit(mu0), and sensitivity: switching LiZA off
(= mag.mu0=0) and each LiZA feature in use (document resets, phi, decay,
order, trick, beta gate, pooling, cross gate, base_scale_attn) must move the
logits by > 100x the tolerance. Same f32 tolerances.

If `tptt dump` does not exist the test FAILS (it is not skipped).
Environment: TPTT (binary). Prints one line per case and
"test_oracle_decoder: N passed, N failed"; exit status 1 on any failure.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
import safetensors_np as stnp  # noqa: E402
import oracle as O  # noqa: E402
import testkit  # noqa: E402

NAME = "test_oracle_decoder"
TPTT = os.environ.get("TPTT", "tptt")
kit = testkit.Checker(NAME)
check = kit.check
MLP_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
TOL = {  # compute.matmul -> (loss max-rel, logits max-rel, gradient RMS-rel)
    "f32": (1e-4, 1e-4, 1e-4),
    "bf16": (1e-2, 3e-2, 3e-2),
}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def tptt(args):
    """Run tptt (text output); returns (p, crashed). A binary that cannot be
    started or a timeout gives exit code 127. Callers require exit 0, so
    crashed only adds the sanitizer report check."""
    try:
        p = kit.run([TPTT] + args, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        p = subprocess.CompletedProcess([TPTT] + args, 127, "", "%s: %s" % (type(e).__name__, e))
    return p, testkit.crashed(p)


# --------------------------------------------------------------------- cases
# model: init-model arguments; sets: --set pairs besides compute.matmul;
# batch: rows/length/doc_starts (None: leave out of the JSON) / explicit labels.
BASE = dict(layers=2, hidden=32, heads=4, kv_heads=2, ffn=48, vocab=61, dtype="f32", std=0.3)
PACKED = [[0, 5, 11], [0, 3, 9]]  # 3 documents per row, different per row

CASES = [
    # ---------------------------------------------------------------- llama
    dict(name="llama_gqa_lora", model=dict(arch="llama"),
         sets={"lora.init": "random", "lora.r": 4, "lora.alpha": 8},
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="llama_hd12_tied_bf16w_mlp_rslora", model=dict(arch="llama", dtype="bf16", head_dim=12, tie=True),
         sets={"lora.init": "random", "lora.target_modules": MLP_TARGETS, "lora.rslora": "true"},
         batch=dict(B=2, T=14, doc_starts=None, labels=True)),
    dict(name="llama_mha_lora_default_init", model=dict(arch="llama", dtype="bf16", kv_heads=4),
         sets={"lora.init": "default"},
         batch=dict(B=1, T=12, doc_starts=[[0, 4, 9]])),
    dict(name="llama_projections_attn_mlp", model=dict(arch="llama"),
         sets={"trainable": "projections", "lora.target_modules": MLP_TARGETS},
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="llama_all_untied_bf16w", model=dict(arch="llama", dtype="bf16"),
         sets={"trainable": "all"},
         batch=dict(B=2, T=16, doc_starts=PACKED, labels=True)),
    dict(name="llama_all_tied_kv1", model=dict(arch="llama", kv_heads=1, tie=True),
         sets={"trainable": "all"},
         batch=dict(B=2, T=12, doc_starts=[[0, 6], [0]])),
    dict(name="llama3_rope_scaling_T40", model=dict(arch="llama", heads=2, kv_heads=1, rope_scaling=LLAMA3),
         sets={"lora.init": "random", "lora.target_modules": MLP_TARGETS, "lora.r": 4, "lora.alpha": 4},
         batch=dict(B=2, T=40, doc_starts=[[0], [0, 7, 30]])),
    # -------------------------------------------------------------- mistral
    dict(name="mistral_window4_gqa_lora", model=dict(arch="mistral", window=4),
         sets={"lora.init": "random", "lora.r": 4, "lora.alpha": 8},
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="mistral_window6_tied_all_bf16w", model=dict(arch="mistral", window=6, dtype="bf16", tie=True),
         sets={"trainable": "all"},
         batch=dict(B=2, T=16, doc_starts=[[0, 9, 12], [0, 2, 8]])),
    dict(name="mistral_hd16_kv1_window5_projections", model=dict(arch="mistral", window=5, kv_heads=1, head_dim=16),
         sets={"trainable": "projections"},
         batch=dict(B=2, T=14, doc_starts=None, labels=True)),
    dict(name="mistral_window3_mlp_rslora", model=dict(arch="mistral", window=3, dtype="bf16", seed=1),
         sets={"lora.init": "random", "lora.target_modules": MLP_TARGETS, "lora.rslora": "true", "lora.r": 4},
         batch=dict(B=2, T=16, doc_starts=PACKED, labels=True)),
    # ---------------------------------------------------------------- qwen2
    dict(name="qwen2_tied_bf16w_mlp_rslora", model=dict(arch="qwen2", dtype="bf16", tie=True),
         sets={"lora.init": "random", "lora.target_modules": MLP_TARGETS, "lora.rslora": "true",
               "lora.r": 4, "lora.alpha": 8},
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="qwen2_untied_all", model=dict(arch="qwen2"),
         sets={"trainable": "all"},
         batch=dict(B=2, T=14, doc_starts=[[0, 5, 10], [0, 4, 7]], labels=True)),
    dict(name="qwen2_f16w_gqa_projections", model=dict(arch="qwen2", dtype="f16"),
         sets={"trainable": "projections"},
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="qwen2_hd6_r2_lora", model=dict(arch="qwen2", head_dim=6),
         sets={"lora.init": "random", "lora.r": 2, "lora.alpha": 3},
         batch=dict(B=1, T=16, doc_starts=[[0]])),
    # ------------------------------------------- bf16 matmuls (a few, std 0.1)
    dict(name="bf16mm_llama_gqa_lora", matmul="bf16", model=dict(arch="llama", dtype="bf16", std=0.1),
         sets={"lora.init": "random", "lora.r": 4, "lora.alpha": 8},
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="bf16mm_mistral_window4_mlp", matmul="bf16", model=dict(arch="mistral", window=4, dtype="bf16", std=0.1),
         sets={"lora.init": "random", "lora.target_modules": MLP_TARGETS, "lora.r": 4, "lora.alpha": 8},
         batch=dict(B=2, T=16, doc_starts=PACKED, labels=True)),
    dict(name="bf16mm_qwen2_tied_projections", matmul="bf16", model=dict(arch="qwen2", dtype="bf16", tie=True, std=0.1),
         sets={"trainable": "projections"},
         batch=dict(B=2, T=16, doc_starts=PACKED)),
]

def onednn_bf16_expected():
    """oneDNN 2.6 builds bf16 matmuls from avx512_core (F, BW, VL, DQ) up;
    tptt falls back to f32 below that or when TPTT_ISA caps it under avx512
    (src/kernels/matmul.c bf16_supported)."""
    if os.environ.get("TPTT_ISA", "") in ("avx2", "scalar"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags)


# ------------------------------------------------------------------- LiZA + MaG
# LIZA.md sections 2, 3 and docs/dump.md "LiZA semantics fixed here"; all with
# compute.matmul=f32 and the f32 tolerances. With a binary that does not know
# the liza.* / mag.* settings they FAIL cleanly (one line each), not crash.
LR4 = {"lora.init": "random", "lora.r": 4, "lora.alpha": 8}
DOCS13 = [[0, 5, 9], [0, 9, 11]]        # T = 13: documents of 5,4,4 and 9,2,2 tokens
DOCS21 = [[0, 6, 15], [0, 4, 13]]       # T = 21: 6,9,6 and 4,9,8


def liza(preset=None, **kw):
    d = {"liza.enabled": "true"}
    if preset:
        d["liza.preset"] = preset
    d.update({k.replace("__", "."): v for k, v in kw.items()})
    return d


LIZA_CASES = [
    # ------------------------------------------------ every preset (defaults otherwise: C 64, mu 0.5 constant)
    dict(name="liza_llama_delta_rule", model=dict(arch="llama"),
         sets=dict(LR4, **liza("delta_rule")), batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_mistral_w4_delta_rule_v", model=dict(arch="mistral", window=4),
         sets=dict(LR4, **liza("delta_rule_v")), batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_qwen2_delta_rule_kv_labels", model=dict(arch="qwen2"),
         sets=dict(LR4, **liza("delta_rule_kv")), batch=dict(B=2, T=16, doc_starts=PACKED, labels=True)),
    dict(name="liza_llama_delta_rule_gelu_C4_T13", model=dict(arch="llama"),
         sets=dict(LR4, **liza("delta_rule_gelu", liza__chunk_size=4)), batch=dict(B=2, T=13, doc_starts=DOCS13)),
    dict(name="liza_qwen2_kv1_gated_delta_rule", model=dict(arch="qwen2", kv_heads=1),
         sets=dict(LR4, **liza("gated_delta_rule")), batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_llama_mha_delta_product", model=dict(arch="llama", kv_heads=4),
         sets=dict(LR4, **liza("delta_product")), batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_mistral_w6_gated_delta_product", model=dict(arch="mistral", window=6),
         sets=dict(LR4, **liza("gated_delta_product")), batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_qwen2_hd12_delta_product_r", model=dict(arch="qwen2", head_dim=12),
         sets=dict(LR4, **liza("delta_product_r")), batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_llama_tied_delta_product_c", model=dict(arch="llama", tie=True),
         sets=dict(LR4, **liza("delta_product_c")), batch=dict(B=2, T=16, doc_starts=PACKED)),
    # ------------------------------------------------ order 3, every trick, decay on/off, small C, T % C != 0
    dict(name="liza_llama_order3_dt_decay_C4_T21", model=dict(arch="llama"),
         sets=dict(LR4, **liza("gated_delta_product", liza__order=3, liza__chunk_size=4)),
         batch=dict(B=2, T=21, doc_starts=DOCS21)),
    dict(name="liza_mistral_order3_rot_nodecay_C4_T13", model=dict(arch="mistral", window=5),
         sets=dict(LR4, **liza("delta_product_r", liza__order=3, liza__chunk_size=4)),
         batch=dict(B=2, T=13, doc_starts=DOCS13)),
    dict(name="liza_qwen2_order3_rdt_kv_gelu_C4_T21", model=dict(arch="qwen2"),
         sets=dict(LR4, **liza("delta_product_c", liza__order=3, liza__alpha_gate="kv", liza__linear="false",
                               liza__chunk_size=4)),
         batch=dict(B=2, T=21, doc_starts=DOCS21)),
    dict(name="liza_llama_order3_dt_gelu_C5_T21", model=dict(arch="llama", kv_heads=1),
         sets=dict(LR4, **liza(None, liza__order=3, liza__linear="false", liza__chunk_size=5)),
         batch=dict(B=2, T=21, doc_starts=DOCS21)),
    dict(name="liza_llama_alpha_v_beta_c", model=dict(arch="llama"),
         sets=dict(LR4, **liza("delta_rule", liza__alpha_gate="v", liza__beta_gate="c")),
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_mistral_alpha_kv_beta_v_order2_gelu_C3", model=dict(arch="mistral", window=4),
         sets=dict(LR4, **liza("gated_delta_product", liza__alpha_gate="kv", liza__beta_gate="v",
                               liza__linear="false", liza__chunk_size=3)),
         batch=dict(B=2, T=13, doc_starts=DOCS13)),
    # ------------------------------------------------ MaG
    dict(name="liza_llama_mag_learnable_scalar", model=dict(arch="llama"),
         sets=dict(LR4, **liza("gated_delta_rule", mag__mode="learnable", mag__mu0=0.3)),
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_qwen2_mag_learnable_vector_all", model=dict(arch="qwen2"),
         sets=dict(trainable="all", **liza("delta_product", mag__mode="learnable", mag__learnable_shape="vector",
                                           mag__mu0=0.6)),
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_mistral_mag_vector_projections_cross", model=dict(arch="mistral", window=4),
         sets=dict(trainable="projections", **liza("gated_delta_rule", mag__mode="learnable",
                                                   mag__learnable_shape="vector", mag__mu0=0.4, mag__cross_gate="true")),
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_llama_mag_gradual_mid", model=dict(arch="llama"),
         sets=dict(LR4, **liza("delta_product", mag__mode="gradual", mag__mu0=0.1, mag__mu1=0.9, mag__steps=200,
                               mag__step=75)),
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_mistral_w3_mag_gradual_past_end", model=dict(arch="mistral", window=3),
         sets=dict(LR4, **liza("delta_rule", mag__mode="gradual", mag__mu0=0.9, mag__mu1=0.35, mag__steps=10,
                               mag__step=25)),
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_qwen2_mag_cyclic", model=dict(arch="qwen2"),
         sets=dict(LR4, **liza("gated_delta_product", mag__mode="cyclic", mag__values="0.2,0.7,0.35",
                               mag__period=7, mag__step=16)),
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_llama_cross_gate", model=dict(arch="llama"),
         sets=dict(LR4, **liza("delta_product", mag__mu0=0.4, mag__cross_gate="true")),
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_mistral_base_scale_attn", model=dict(arch="mistral", window=4),
         sets=dict(LR4, **liza("gated_delta_rule", liza__base_scale_attn="true")),
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_qwen2_cross_base_scale_gelu_C4", model=dict(arch="qwen2", head_dim=6),
         sets=dict(LR4, **liza("delta_rule_gelu", liza__chunk_size=4, liza__base_scale_attn="true",
                               mag__cross_gate="true", mag__mu0=0.7)),
         batch=dict(B=2, T=13, doc_starts=DOCS13)),
    # ------------------------------------------------ pure linear: mu = 1, no cross gate
    dict(name="liza_llama_pure_linear_gated_product", model=dict(arch="llama"),
         sets=dict(LR4, **liza("gated_delta_product", mag__mu0=1)),
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_qwen2_pure_linear_gelu_C4_T21", model=dict(arch="qwen2", kv_heads=1),
         sets=dict(LR4, **liza("delta_rule_gelu", liza__chunk_size=4, mag__mode="constant", mag__mu0="1.0")),
         batch=dict(B=2, T=21, doc_starts=DOCS21)),
    # ------------------------------------------------ LoRA on the MLP too, recompute, long llama3 rows
    dict(name="liza_llama_recompute_mlp_lora", model=dict(arch="llama"),
         sets=dict(LR4, **{"lora.target_modules": MLP_TARGETS, "compute.recompute": "true"},
                   **liza("gated_delta_product", liza__linear="false", liza__chunk_size=4, mag__cross_gate="true")),
         batch=dict(B=2, T=16, doc_starts=PACKED)),
    dict(name="liza_llama3_rope_T40_C8", model=dict(arch="llama", heads=2, kv_heads=1, rope_scaling=LLAMA3),
         sets=dict(LR4, **liza("delta_product_c", liza__linear="false", liza__chunk_size=8, liza__alpha_gate="k")),
         batch=dict(B=2, T=40, doc_starts=[[0], [0, 7, 30]])),
]
CASES = CASES + LIZA_CASES


def init_args(m, out):
    args = ["init-model", "--arch", m["arch"], "--layers", str(m["layers"]), "--hidden", str(m["hidden"]),
            "--heads", str(m["heads"]), "--kv-heads", str(m["kv_heads"]), "--ffn", str(m["ffn"]),
            "--vocab", str(m["vocab"]), "--dtype", m["dtype"], "--init-std", str(m["std"]),
            "--seed", str(m.get("seed", 0))]
    if m.get("head_dim"):
        args += ["--head-dim", str(m["head_dim"])]
    if m.get("tie"):
        args.append("--tie")
    if m.get("window"):
        args += ["--sliding-window", str(m["window"])]
    return args + [out]


def make_batch(case, V, rng):
    b = case["batch"]
    B, T = b["B"], b["T"]
    ids = rng.integers(0, V, size=(B, T)).tolist()
    batch = {"input_ids": ids}
    if b.get("doc_starts") is not None:
        batch["doc_starts"] = b["doc_starts"]
    if b.get("labels"):
        labels = O.default_labels(ids, b.get("doc_starts"))
        for r in range(B):
            for t in range(T):
                u = rng.random()
                if u < 0.25:
                    labels[r][t] = -100          # prompt tokens / padding
                elif u < 0.4:
                    labels[r][t] = int(rng.integers(0, V))  # any target, not just the next token
            labels[r][0] = int(rng.integers(0, V))  # at least one counted label per row
        batch["labels"] = labels
    return batch


def expected_keys(cfg, trainable, targets, mag_learnable=False):
    """(required parameter keys, optional parameter keys) for a trainable mode
    (+ the per-layer MaG logits in learnable mode, trained in every mode)."""
    req, opt = set(), set()
    if mag_learnable:
        req |= {O.mag_logit_key(l) for l in range(cfg.L)}
    shapes = O.hf_tensor_shapes(cfg)
    if trainable == "lora":
        for l in range(cfg.L):
            for m in targets:
                mod = O.module_name(l, m)
                req |= {O.PREFIX + mod + ".lora_A.weight", O.PREFIX + mod + ".lora_B.weight"}
    elif trainable == "projections":
        for l in range(cfg.L):
            for m in targets:
                mod = O.module_name(l, m)
                req.add(O.PREFIX + mod + ".weight")
                if mod + ".bias" in shapes:  # docs/dump.md: "the target modules' full weights" - bias either way
                    opt.add(O.PREFIX + mod + ".bias")
    else:  # all
        req |= {O.PREFIX + n for n in shapes}
        for l in range(cfg.L):  # "every weight": LoRA adapters may or may not be part of it
            for m in targets:
                mod = O.module_name(l, m)
                opt |= {O.PREFIX + mod + ".lora_A.weight", O.PREFIX + mod + ".lora_B.weight"}
    return req, opt


# --------------------------------------------------------------------- LiZA metadata

LIZA_FIELDS = ("order", "alpha_gate", "beta_gate", "linear", "trick")


def want_liza_config(sets):
    """(LizaConfig the settings ask for, preset name, whether the five preset fields were changed), or None."""
    if sets.get("liza.enabled", "false") != "true":
        return None
    preset = sets.get("liza.preset", "delta_rule")
    rc = dict(O.PRESETS[preset])
    for f in LIZA_FIELDS:
        if "liza." + f in sets:
            v = sets["liza." + f]
            rc[f] = int(v) if f == "order" else (str(v) == "true") if f == "linear" else str(v)
    kw = dict(rc, chunk=int(sets.get("liza.chunk_size", 64)),
              base_scale_attn=sets.get("liza.base_scale_attn", "false") == "true",
              cross_gate=sets.get("mag.cross_gate", "false") == "true", mag_mode=sets.get("mag.mode", "constant"),
              mu0=float(sets.get("mag.mu0", 0.5)), mu1=float(sets.get("mag.mu1", 1.0)),
              steps=int(sets.get("mag.steps", 1000)), values=sets.get("mag.values", "0.1,0.5,0.9"),
              period=int(sets.get("mag.period", 100)), learnable_shape=sets.get("mag.learnable_shape", "scalar"),
              step=int(sets.get("mag.step", 0)))
    return O.LizaConfig(**kw), preset, rc != O.PRESETS[preset]


def check_liza_meta(name, sets, conf, cfg):
    """The liza/mag fields of the metadata config (docs/dump.md); returns the wanted LizaConfig or None."""
    w = want_liza_config(sets)
    if w is None:
        check(not conf.get("liza_enabled", False), "%s: liza_enabled %r without liza.enabled" % (name, conf.get("liza_enabled")))
        return None
    lz, preset, changed = w
    close = lambda a, b: a is not None and abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    check(conf.get("liza_enabled") is True, "%s: liza_enabled %r" % (name, conf.get("liza_enabled")))
    rc = conf.get("recurrent_config") or {}
    want_rc = {f: getattr(lz, f) for f in LIZA_FIELDS}
    check(rc == want_rc and isinstance(rc.get("linear"), bool),
          "%s: recurrent_config %s want %s" % (name, rc, want_rc))
    ok_modes = ({None} | {p for p, f in O.PRESETS.items() if f == want_rc}) if changed else {preset}
    check(conf.get("operator_mode", "absent") in ok_modes,
          "%s: operator_mode %r want one of %s" % (name, conf.get("operator_mode", "absent"), sorted(ok_modes, key=str)))
    check(conf.get("max_chunk_size") == lz.chunk, "%s: max_chunk_size %r want %d" % (name, conf.get("max_chunk_size"), lz.chunk))
    check(conf.get("base_scale_attn") is lz.base_scale_attn, "%s: base_scale_attn %r" % (name, conf.get("base_scale_attn")))
    check(conf.get("cross_gate") is lz.cross_gate, "%s: cross_gate %r" % (name, conf.get("cross_gate")))
    check(conf.get("mag_mode") == lz.mag_mode, "%s: mag_mode %r want %s" % (name, conf.get("mag_mode"), lz.mag_mode))
    # one mu with one meaning: mag_weight = the mu at mag_step, mag_mu0 = the schedule's start
    check(close(conf.get("mag_mu0"), lz.mu0), "%s: mag_mu0 %r want %g" % (name, conf.get("mag_mu0"), lz.mu0))
    check(close(conf.get("mag_weight"), lz.mu()), "%s: mag_weight %r want %g (the schedule at step %d)"
          % (name, conf.get("mag_weight"), lz.mu(), lz.step))
    check("mag_mu" not in conf, "%s: mag_mu duplicates mag_weight" % name)
    check(conf.get("mag_step") == lz.step, "%s: mag_step %r" % (name, conf.get("mag_step")))
    check(conf.get("mag_learnable_shape") == lz.learnable_shape, "%s: mag_learnable_shape %r" % (name, conf.get("mag_learnable_shape")))
    check(close(conf.get("mag_mu1"), lz.mu1) and conf.get("mag_steps") == lz.steps and conf.get("mag_period") == lz.period,
          "%s: mag_mu1/steps/period %r %r %r" % (name, conf.get("mag_mu1"), conf.get("mag_steps"), conf.get("mag_period")))
    try:
        vals = O._as_values(conf.get("mag_values"))
    except (TypeError, ValueError):
        vals = None
    check(vals is not None and len(vals) == len(lz.values) and all(close(a, b) for a, b in zip(vals, lz.values)),
          "%s: mag_values %r want %s" % (name, conf.get("mag_values"), lz.values))
    return lz


def liza_ablations(lz, doc_starts):
    """Oracle ablations a LiZA case must be sensitive to (see oracle.run_case)."""
    ab = ["liza"]
    if any(len(ds) > 1 for ds in doc_starts):
        ab.append("liza_docs")
    if not lz.linear:
        ab.append("phi")
    if lz.alpha_gate != "c":
        ab.append("decay")
    if lz.order > 1:
        ab.append("order")
        if lz.trick != "dt":
            ab.append("trick")
    if lz.beta_gate != "c":
        ab.append("beta")
    if lz.beta_gate != "c" or lz.alpha_gate != "c":
        ab.append("pool")
    if lz.cross_gate:
        ab.append("cross_gate")
    if lz.base_scale_attn:
        ab.append("base_scale")
    return ab


def fmt_classes(rows):
    """'class err ...' with max-rel for logits/loss and RMS-rel for gradients, worst per class."""
    worst = {}
    for cls, _, mx, rms in rows:
        e = mx if cls in ("logits", "loss") else rms
        worst[cls] = max(worst.get(cls, 0.0), e)
    order = sorted(worst, key=lambda c: (c not in ("logits", "loss"), c != "loss", c))
    return worst, " ".join("%s %.1e" % (c, worst[c]) for c in order)


def run_case(case, tmp, totals):
    name = case["name"]
    matmul = case.get("matmul", "f32")
    m = dict(BASE, **case["model"])
    mdir = os.path.join(tmp, name)
    p, bad = tptt(init_args(m, mdir))
    if not check(p.returncode == 0 and not bad, "%s: init-model rc %d\n%s" % (name, p.returncode, p.stderr)):
        return
    if m.get("rope_scaling"):
        cpath = os.path.join(mdir, "config.json")
        cj = json.load(open(cpath))
        cj["rope_scaling"] = m["rope_scaling"]
        with open(cpath, "w") as f:
            json.dump(cj, f, indent=2)
    cfg_json, frozen = stnp.load_model_dir(mdir)
    cfg = O.ModelConfig.from_dict(cfg_json)
    if m.get("head_dim"):
        check(cfg.d != cfg.D // cfg.H, "%s: head_dim %d should differ from D/H" % (name, cfg.d))
    if m.get("window"):
        check(cfg.window is not None and cfg.window < case["batch"]["T"], "%s: window %s not < T" % (name, cfg.window))
    if cfg.rope_scaling:
        # every llama3 band (unchanged / smoothed / divided) must be present, and positions past orig
        inv = O.rope_inv_freq(cfg.d, cfg.theta).numpy()
        wl = 2 * math.pi / inv
        sc = cfg.rope_scaling
        hi, lo = sc["original_max_position_embeddings"] / sc["high_freq_factor"], \
            sc["original_max_position_embeddings"] / sc["low_freq_factor"]
        bands = (int(np.sum(wl < hi)), int(np.sum((wl >= hi) & (wl <= lo))), int(np.sum(wl > lo)))
        check(min(bands) > 0, "%s: llama3 bands (high, medium, low) = %s" % (name, bands))
        check(case["batch"]["T"] > sc["original_max_position_embeddings"], "%s: T <= original max positions" % name)

    rng = np.random.default_rng(sum(map(ord, name)))  # fixed per case
    batch = make_batch(case, cfg.V, rng)
    bpath = os.path.join(tmp, name + ".batch.json")
    with open(bpath, "w") as f:
        json.dump(batch, f)
    sets = dict(case["sets"])
    sets["compute.matmul"] = matmul
    out = os.path.join(tmp, name + ".dump.safetensors")
    args = ["dump", "--model", mdir, "--batch", bpath, "--out", out]
    for k, v in sets.items():
        args += ["--set", "%s=%s" % (k, v)]
    p, bad = tptt(args)
    if not check(p.returncode == 0 and not bad and os.path.exists(out),
                 "%s: tptt %s: rc %d\n%s" % (name, " ".join(args), p.returncode, p.stderr)):
        return
    try:
        dump, meta = stnp.load(out)
        conf = json.loads(meta["config"])
        mbatch = json.loads(meta["batch"])
    except (ValueError, KeyError, OSError) as e:
        check(False, "%s: unreadable dump or metadata: %s" % (name, e))
        return

    # ---- metadata: the settings and the batch after defaults
    trainable = sets.get("trainable", "lora")
    targets = sets.get("lora.target_modules", "q_proj,k_proj,v_proj,o_proj").split(",")
    lc = conf.get("lora_config") or {}
    check(meta.get("format") == "pt", "%s: __metadata__ format %r" % (name, meta.get("format")))
    # the dump records the backend it used: bf16 falls back to f32 (with a
    # notice) where oneDNN has no bf16 matmul
    used = matmul if matmul != "bf16" or onednn_bf16_expected() else "f32"
    check(conf.get("compute_matmul") == used, "%s: compute_matmul %r want %r" % (name, conf.get("compute_matmul"), used))
    if used != matmul:
        check("no bf16 matmul" in p.stderr, "%s: no fallback notice on stderr: %s" % (name, p.stderr[-300:]))
    check(conf.get("trainable") == trainable, "%s: trainable %r want %r" % (name, conf.get("trainable"), trainable))
    r = int(sets.get("lora.r", 8))
    alpha = float(sets.get("lora.alpha", 16))
    rs = sets.get("lora.rslora", "false") == "true"
    tm = lc.get("target_modules")
    tm = tm.split(",") if isinstance(tm, str) else tm
    check(lc.get("r") == r and float(lc.get("lora_alpha", -1)) == alpha and bool(lc.get("use_rslora")) == rs
          and float(lc.get("lora_dropout", -1)) == 0.0 and sorted(tm or []) == sorted(targets),
          "%s: lora_config %s" % (name, lc))
    if "lora.init" in sets:
        check(lc.get("init") == sets["lora.init"], "%s: lora_config init %r" % (name, lc.get("init")))
    B, T = case["batch"]["B"], case["batch"]["T"]
    want_ds = batch.get("doc_starts", [[0]] * B)
    want_labels = batch.get("labels") or O.default_labels(batch["input_ids"], want_ds)
    check(mbatch.get("input_ids") == batch["input_ids"], "%s: metadata batch input_ids differ" % name)
    check(mbatch.get("doc_starts") == want_ds, "%s: metadata doc_starts %s want %s" % (name, mbatch.get("doc_starts"), want_ds))
    check(mbatch.get("labels") == want_labels, "%s: metadata labels %s want %s" % (name, mbatch.get("labels"), want_labels))

    # ---- LiZA / MaG settings in the metadata
    want_liza = check_liza_meta(name, sets, conf, cfg)

    # ---- key set, dtypes, shapes, trainable values
    req, opt = expected_keys(cfg, trainable, targets, want_liza is not None and want_liza.mag_mode == "learnable")
    params = {k for k in dump if k not in ("logits", "loss") and not k.endswith(".grad")}
    check(req <= params and params <= req | opt,
          "%s: trainable keys: missing %s, unexpected %s" % (name, sorted(req - params), sorted(params - req - opt)))
    extra = sorted(params & opt)
    for k in dump:
        if k.endswith(".grad"):
            check(k[:-5] in params, "%s: %s without its parameter" % (name, k))
        check(dump[k].dtype == np.float32, "%s: %s is %s, want F32" % (name, k, dump[k].dtype))
    check(dump.get("logits", np.zeros(0)).shape == (B, T, cfg.V), "%s: logits shape" % name)
    check(dump.get("loss", np.zeros(0)).shape == (), "%s: loss shape" % name)
    for k in sorted(params):
        cls = O.tensor_class(k)
        if cls == "mag_logit":
            # docs/dump.md: initialised to logit(mu0), [1] or [D]
            shape = (1,) if want_liza.learnable_shape == "scalar" else (cfg.D,)
            a = dump[k].astype(np.float64)
            check(a.shape == shape and np.all(np.abs(a - O.logit(want_liza.mu0)) <= 1e-6 * max(1.0, abs(O.logit(want_liza.mu0)))),
                  "%s: %s shape %s value %s, want %s filled with logit(%g)" % (name, k, a.shape, a.ravel()[:4], shape, want_liza.mu0))
        elif cls in ("lora_A", "lora_B"):
            short = k.split(".")[-3]
            fin, fout = O.lora_in_out(cfg, short)
            want_shape = (r, fin) if cls == "lora_A" else (fout, r)
            check(dump[k].shape == want_shape, "%s: %s shape %s want %s" % (name, k, dump[k].shape, want_shape))
            bound = 1 / math.sqrt(fin) if cls == "lora_A" else 1 / math.sqrt(r)
            a = dump[k].astype(np.float64)
            if cls == "lora_B" and sets.get("lora.init", "default") == "default":
                check(np.all(a == 0), "%s: %s should be 0 with lora.init=default" % (name, k))
            else:
                check(np.all(np.abs(a) <= bound * (1 + 1e-6)) and np.std(a) > 0.3 * bound,
                      "%s: %s not ~U(-%.3g, %.3g): min %.3g max %.3g" % (name, k, bound, bound, a.min(), a.max()))
        else:
            hf = k[len(O.PREFIX):]
            check(hf in frozen and np.array_equal(dump[k], frozen[hf].astype(np.float32)),
                  "%s: trainable %s differs from the model's value" % (name, k))

    # ---- the oracle
    try:
        ref = O.run_case(mdir, out)
    except Exception as e:  # a malformed dump is a failure, not a crash of the test
        check(False, "%s: oracle failed: %s: %s" % (name, type(e).__name__, e))
        return
    rows = O.compare(dump, ref)
    tl, tg, tgrad = TOL[matmul]
    ok = True
    for cls, key, mx, rms in rows:
        if cls == "loss":
            ok &= check(mx <= tl, "%s: loss rel err %.3g > %g (dump %s, oracle %s)" % (name, mx, tl, dump.get("loss"), ref["loss"]))
        elif cls == "logits":
            ok &= check(mx <= tg, "%s: logits max-rel err %.3g > %g" % (name, mx, tg))
        else:
            ok &= check(rms <= tgrad, "%s: %s RMS-rel err %.3g > %g (max-rel %.3g)" % (name, key, rms, tgrad, mx))
    # a model whose logits are nearly uniform would hide errors
    logV = math.log(cfg.V)
    loss = float(ref["loss"])
    if matmul == "f32":
        ok &= check(abs(loss - logV) > 0.1 * logV, "%s: oracle loss %.3f too close to log V %.3f" % (name, loss, logV))
    # sensitivity: a case only tests a feature if switching it off in the oracle
    # moves the logits far outside the tolerance
    ablations = []
    if cfg.window is not None:
        ablations.append("window")
    if cfg.rope_scaling:
        ablations.append("rope_scaling")
    if any(len(ds) > 1 for ds in want_ds):
        ablations.append("docs")
    if rs and any(O.tensor_class(k) == "lora_A" for k in params):
        ablations.append("rslora")
    if cfg.bias:
        ablations.append("bias")
    if cfg.H != cfg.Hkv and cfg.Hkv > 1:
        ablations.append("gqa")
    if name in ("llama_gqa_lora", "qwen2_hd6_r2_lora", "mistral_hd16_kv1_window5_projections"):
        ablations.append("rope_pairs")
    if want_liza is not None:
        ablations += liza_ablations(want_liza, want_ds)
        if want_liza.pure_linear():  # the softmax branch has no effect, so these cannot be tested here
            ablations = [a for a in ablations if a not in ("window", "rope_scaling", "gqa", "rope_pairs")]
    sens = []
    for ab in ablations if matmul == "f32" else []:
        alt = O.run_case(mdir, out, ablate=(ab,), grads=False)
        e = O.max_rel(dump["logits"], alt["logits"])
        sens.append("%s %.0e" % (ab, e))
        # ("liza" is the same model with mag.mu0=0: the mix must matter far beyond the tolerance)
        ok &= check(e > 100 * tg, "%s: switching off %s in the oracle changes the logits by only %.3g: "
                    "the case does not test it" % (name, ab, e))
    worst, text = fmt_classes(rows)
    for c, e in worst.items():
        totals.setdefault(matmul, {})
        totals[matmul][c] = max(totals[matmul].get(c, 0.0), e)
    note = (" +optional: %s" % ",".join(sorted({O.tensor_class(k) for k in extra}))) if extra else ""
    sens = (" | off: " + ", ".join(sens)) if sens else ""
    print("%s %-38s [%s] %s | loss %.3f (log V %.3f)%s%s"
          % ("ok  " if ok else "FAIL", name, matmul, text, loss, logV, sens, note))
    totals.setdefault("cases", [0, 0])[0 if ok else 1] += 1


def main():
    t_start = time.time()
    p, bad = tptt(["dump", "--help"])
    if not check(p.returncode == 0 and not bad,
                 "`%s dump --help` failed (rc %d): tptt dump is not built\n%s" % (TPTT, p.returncode, p.stderr.strip())):
        return kit.report()
    tmp = tempfile.mkdtemp(prefix="tptt-oracle-")
    totals = {}
    try:
        for case in CASES:
            counted = sum(totals.get("cases", [0, 0]))
            run_case(case, tmp, totals)
            if sum(totals.get("cases", [0, 0])) == counted:  # stopped early: a failure was reported
                print("FAIL %-38s (stopped before the comparison)" % case["name"])
                totals.setdefault("cases", [0, 0])[1] += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    c = totals.get("cases", [0, 0])
    print("cases: %d ok, %d failed, of %d (%.1fs)" % (c[0], c[1], len(CASES), time.time() - t_start))
    for mm in ("f32", "bf16"):
        if mm in totals:
            tl, tg, tgrad = TOL[mm]
            print("worst over %s cases (loss/logits max-rel, gradients RMS-rel; tol %g/%g/%g): %s"
                  % (mm, tl, tg, tgrad, " ".join("%s %.1e" % (k, v) for k, v in sorted(totals[mm].items()))))
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
