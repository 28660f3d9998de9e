"""test_titan_py - export/titan/tptt_titan_math.py (the Python code shipped with
`tptt export --format titan`) against the independent float64 oracle.

Tiny random models come from `tptt init-model --dtype f32`; a Python export
writer of this test (`write_titan_export`) folds random LoRA adapters into the
weights and adds random MaG logits, in the layout `tptt export --format
titan` writes (merged HF-named weights in bf16/f16/f32, one file or shards +
model.safetensors.index.json, F32 `model.layers.{l}.self_attn.mag_logit` [1]
or [D], config.json = base config + model_type tptt_titan, auto_map,
base_model_type, base_architecture, torch_dtype, liza {...}, mag {...},
tptt_export {...}, and the three .py files of export/titan).

Checks, per case (every liza preset, order 3 with each trick, linear false,
every alpha/beta gate, learnable scalar and vector mu, cross gate,
base_scale_attn, pure-linear, plain (no LiZA), sliding window, GQA/MHA/MQA,
head_dim != D/H with llama3 rope scaling, tied embeddings, each architecture,
bf16 shards):
  (a) TitanMath full-sequence logits vs tests/py/oracle.py's float64 Decoder
      (fed the very tensors of the export files):  float64 max-rel <= 1e-5,
      float32 max-rel <= 1e-4; and the recurrent kernel (liza_impl "steps")
      for the full sequence too;
  (b) the cache: a prefill ending mid-chunk then one token at a time across
      several chunk boundaries, and uneven blocks (chunked kernel for blocks
      > 1), equal the full forward (float64 max-rel <= 1e-9, float32 <= 1e-5);
      greedy generate() equals the argmax chain of full forwards;
  (c) the transformers glue (configuration_tptt / modeling_tptt) when
      transformers is installed, else a visible "SKIP:" line; then the glue
      still runs against a minimal stand-in of the transformers API
      (parameter names = export tensor names, load_state_dict, logits, loss,
      the cached greedy loop through prepare_inputs_for_generation, padding
      refused).
Also: batch of 3 rows through the cache = each row alone; greedy generate();
bf16 compute; the reader against safetensors_np.
Plus: a sensitivity check (perturbing mu moves the logits far beyond the
tolerance) and the safetensors reader against tests/py/safetensors_np.py.

Environment: TPTT (the binary; default: a build directory of this tree).
Ends with "test_titan_py: N passed, N failed".
"""
import json
import math
import os
import shutil
import sys
import tempfile
import zlib

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "py"))
sys.path.insert(0, os.path.join(ROOT, "export", "titan"))
import oracle as O  # noqa: E402
import safetensors_np as stnp  # noqa: E402
import testkit  # noqa: E402
import tptt_titan_math as TM  # noqa: E402

NAME = "test_titan_py"
kit = testkit.Checker(NAME)
check = kit.check
TITAN_DIR = os.path.join(ROOT, "export", "titan")
TITAN_FILES = ("tptt_titan_math.py", "configuration_tptt.py", "modeling_tptt.py")
ARCH_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DT_NAME = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
TOL64, TOL32 = 1e-5, 1e-4          # vs the oracle
TOL_CACHE64, TOL_CACHE32 = 1e-9, 1e-5  # cached vs full forward


def find_tptt():
    t = os.environ.get("TPTT")
    if t:
        return t
    for b in ("build", "build-h5", "build-h4", "build-h3", "build-h2", "build-h1"):
        p = os.path.join(ROOT, b, "tptt")
        if os.access(p, os.X_OK):
            return p
    return "tptt"


TPTT = find_tptt()


def max_rel(a, b):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    den = float(b.abs().max())
    num = float((a - b).abs().max())
    if not math.isfinite(num):
        return math.inf
    return num / den if den else (0.0 if num == 0 else math.inf)


# ------------------------------------------------------------------ export writer

def write_titan_export(base_dir, out_dir, liza, mag, rng, dtype="F32", shards=1, step=123, lora_r=4,
                       lora_alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"),
                       config_patch=None):
    """The layout of `tptt export --format titan` (see the module docstring).
    liza: the "liza" dict or None; mag: {"mode", "mu", "learnable_shape", "cross_gate"}.
    Random LoRA (A and B both random) is folded as W + (alpha/r) B A in float64."""
    cfg, frozen = stnp.load_model_dir(base_dir)
    cfg = dict(cfg)
    if config_patch:
        cfg.update(config_patch)
    base_arch = cfg["architectures"][0]
    mc = O.ModelConfig.from_dict(cfg)
    s = lora_alpha / lora_r
    tensors = {}
    for name, a in frozen.items():
        w = np.asarray(a, dtype=np.float64)
        mod = name.rsplit(".", 1)[0]
        short = mod.rsplit(".", 1)[-1]
        if name.endswith(".weight") and short in targets and ".layers." in name:
            fin, fout = w.shape[1], w.shape[0]
            A = rng.uniform(-1 / math.sqrt(fin), 1 / math.sqrt(fin), size=(lora_r, fin))
            B = rng.uniform(-1 / math.sqrt(lora_r), 1 / math.sqrt(lora_r), size=(fout, lora_r))
            w = w + s * (B @ A)
        tensors[name] = (dtype, w)
    if liza is not None and mag["mode"] == "learnable":
        n = 1 if mag.get("learnable_shape", "scalar") == "scalar" else mc.D
        for l in range(mc.L):
            tensors["model.layers.%d.self_attn.mag_logit" % l] = ("F32", rng.normal(0.0, 1.0, size=(n,)))
    # order as HF writes: embedding, layers, norm, lm_head (mag logits after each layer's attention)
    def order_key(name):
        if name.startswith("model.embed_tokens"):
            return (0, 0, name)
        if name.startswith("model.layers."):
            return (1, int(name.split(".")[2]), name)
        return (2, 0 if name.startswith("model.norm") else 1, name)
    names = sorted(tensors, key=order_key)
    os.makedirs(out_dir, exist_ok=True)
    meta = {"format": "pt"}
    if shards == 1:
        stnp.save(os.path.join(out_dir, "model.safetensors"), {n: tensors[n] for n in names}, meta)
    else:
        parts = np.array_split(np.arange(len(names)), shards)
        wmap = {}
        total = 0
        for i, part in enumerate(parts):
            fn = "model-%05d-of-%05d.safetensors" % (i + 1, shards)
            sub = {names[j]: tensors[names[j]] for j in part}
            stnp.save(os.path.join(out_dir, fn), sub, meta)
            for n in sub:
                wmap[n] = fn
                total += len(stnp.encode(*sub[n]))
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}, f, indent=2)
    conf = dict(cfg)
    conf.update({
        "model_type": "tptt_titan",
        "architectures": ["TpttTitanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_tptt.TpttTitanConfig",
                     "AutoModelForCausalLM": "modeling_tptt.TpttTitanForCausalLM"},
        "base_model_type": O.ARCHS[base_arch],
        "base_architecture": base_arch,
        "torch_dtype": DT_NAME[dtype],
        "liza": liza,
        "mag": mag if liza is not None else None,
        "tptt_export": {"step": step, "checkpoint": "runs/test/checkpoints/step-%08d" % step,
                        "tptt_version": "test"},
    })
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    for fn in TITAN_FILES:
        src = os.path.join(TITAN_DIR, fn)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(out_dir, fn))
    return conf


def oracle_logits(export_dir, ids):
    """float64 logits [T, V] of tests/py/oracle.py's Decoder on the export's tensors."""
    with open(os.path.join(export_dir, "config.json")) as f:
        conf = json.load(f)
    tensors = {}
    index = os.path.join(export_dir, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
        else ["model.safetensors"]
    for fn in files:
        t, _ = stnp.load(os.path.join(export_dir, fn))
        tensors.update(t)
    cfg = O.ModelConfig.from_dict(dict(conf, architectures=[conf["base_architecture"]]))
    params, mag_logits = {}, {}
    for name, a in tensors.items():
        tt = torch.from_numpy(np.asarray(a, dtype=np.float64))
        if name.endswith(".mag_logit"):
            mag_logits[int(name.split(".")[2])] = tt
        else:
            params[name] = tt
    lz = conf.get("liza")
    liza = None
    if lz is not None:
        mag = conf["mag"]
        kw = dict(order=lz["order"], alpha_gate=lz["alpha_gate"], beta_gate=lz["beta_gate"], linear=lz["linear"],
                  trick=lz["trick"], chunk=lz["chunk_size"], base_scale_attn=lz["base_scale_attn"],
                  cross_gate=mag["cross_gate"])
        if mag["mode"] == "learnable":
            kw.update(mag_mode="learnable", learnable_shape=mag["learnable_shape"])
        else:
            kw.update(mag_mode="constant", mu0=mag["mu"])
        liza = O.LizaConfig(**kw)
    dec = O.Decoder(cfg, params, liza=liza, mag_logits=mag_logits or None)
    with torch.no_grad():
        return dec.forward([list(ids)])[0]


# ------------------------------------------------------------------ cases

BASE = dict(arch="llama", layers=2, hidden=32, heads=4, kv_heads=2, ffn=48, vocab=61)
MODELS = {
    "llama_gqa": dict(BASE),
    "llama_mha_hd": dict(BASE, heads=2, kv_heads=2, head_dim=12),  # H*d != D, with llama3 scaling
    "mistral_mqa_win": dict(BASE, arch="mistral", kv_heads=1, window=5),
    "qwen2_tied": dict(BASE, arch="qwen2", heads=4, kv_heads=2, tie=True),
}
PATCH = {"llama_mha_hd": {"rope_scaling": LLAMA3}}


def lz(preset="delta_rule", C=4, base_scale=False, **over):
    d = dict(O.PRESETS[preset])
    d.update(over)
    return {"order": d["order"], "alpha_gate": d["alpha_gate"], "beta_gate": d["beta_gate"], "linear": d["linear"],
            "trick": d["trick"], "chunk_size": C, "base_scale_attn": base_scale}


def fixed(mu=0.5, cross=False):
    return {"mode": "fixed", "mu": mu, "learnable_shape": "scalar", "cross_gate": cross}


def learn(shape="scalar", cross=False):
    return {"mode": "learnable", "mu": None, "learnable_shape": shape, "cross_gate": cross}


CASES = [(p, "llama_gqa", lz(p, C=(5 if i % 2 else 4)), fixed(0.6), {}) for i, p in enumerate(O.PRESETS)]
CASES += [
    ("order3_dt", "llama_gqa", lz(order=3, trick="dt", C=4), fixed(0.7), {}),
    ("order3_rot", "llama_gqa", lz(order=3, trick="rot", C=5), fixed(0.7), {}),
    ("order3_rdt_decay_phi", "llama_gqa", lz(order=3, trick="rdt", alpha_gate="k", linear=False, C=4), fixed(0.7), {}),
    ("gelu_order2_C3", "llama_gqa", lz("delta_product", C=3, linear=False, alpha_gate="kv"), fixed(0.5), {}),
    ("alpha_v_beta_c", "llama_gqa", lz(alpha_gate="v", beta_gate="c", C=4), fixed(0.5), {}),
    ("alpha_kv_beta_kv", "llama_gqa", lz(alpha_gate="kv", beta_gate="kv", C=6), fixed(0.5), {}),
    ("C64_single_chunk", "llama_gqa", lz("gated_delta_product", C=64), fixed(0.5), {}),
    ("learnable_scalar", "llama_gqa", lz("gated_delta_rule", C=4), learn("scalar"), {}),
    ("learnable_vector_cross", "llama_gqa", lz("delta_product", C=4), learn("vector", cross=True), {}),
    ("cross_gate", "llama_gqa", lz("delta_rule_kv", C=4), fixed(0.4, cross=True), {}),
    ("base_scale", "llama_gqa", lz("delta_rule", C=4, base_scale=True), fixed(0.5), {}),
    ("pure_linear", "llama_gqa", lz("gated_delta_product", C=4), fixed(1.0), {}),
    ("pure_linear_phi", "mistral_mqa_win", lz("delta_rule_gelu", C=3), fixed(1.0), {}),
    ("mu0_plain_mix", "llama_gqa", lz("delta_rule", C=4), fixed(0.0), {}),
    ("no_liza", "mistral_mqa_win", None, None, {}),
    ("mistral_window", "mistral_mqa_win", lz("gated_delta_product", C=4), fixed(0.5), {}),
    ("mistral_window_learn", "mistral_mqa_win", lz("delta_product_r", C=5, linear=False), learn("vector"), {}),
    ("qwen2_tied", "qwen2_tied", lz("delta_product_c", C=4, alpha_gate="k"), fixed(0.5, cross=True), {}),
    ("llama_mha_hd_rope3", "llama_mha_hd", lz("gated_delta_rule", C=4), fixed(0.5), {}),
    ("bf16_shards", "qwen2_tied", lz("gated_delta_product", C=4), learn("scalar"), dict(dtype="BF16", shards=3)),
    ("f16_shards", "llama_gqa", lz("delta_product_c", C=4), fixed(0.5), dict(dtype="F16", shards=2)),
]
T_FULL = 19


def init_model(tmp, name, m):
    out = os.path.join(tmp, "base_" + name)
    if os.path.exists(out):
        return out
    args = [TPTT, "init-model", "--arch", m["arch"], "--layers", m["layers"], "--hidden", m["hidden"],
            "--heads", m["heads"], "--kv-heads", m["kv_heads"], "--ffn", m["ffn"], "--vocab", m["vocab"],
            "--dtype", "f32", "--init-std", "0.3", "--seed", len(name)]
    if m.get("head_dim"):
        args += ["--head-dim", m["head_dim"]]
    if m.get("tie"):
        args.append("--tie")
    if m.get("window"):
        args += ["--sliding-window", m["window"]]
    p = kit.run(args + [out], text=True, timeout=120)
    if not kit.succeeds(p, "init-model %s" % name):
        return None
    return out


def cached_logits(model, ids, blocks):
    """Logits of ids fed in the given block sizes through one cache."""
    cache = None
    outs = []
    s = 0
    for b in blocks:
        lg, cache = model.forward(ids[s:s + b], cache)
        outs.append(lg)
        s += b
    assert s == len(ids)
    return torch.cat(outs, 0), cache


def run_case(tmp, name, mname, liza, mag, opts, stats):
    base = init_model(tmp, mname, MODELS[mname])
    if base is None:
        return
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    out = os.path.join(tmp, "exp_" + name)
    write_titan_export(base, out, liza, mag, rng, config_patch=PATCH.get(mname), **opts)
    V = MODELS[mname]["vocab"]
    ids = torch.as_tensor(rng.integers(0, V, size=T_FULL), dtype=torch.long)
    ref = oracle_logits(out, ids.tolist())
    m64 = TM.load_dir(out, dtype=torch.float64)
    m32 = TM.load_dir(out, dtype=torch.float32)
    full64, c64 = m64.forward(ids)
    full32, _ = m32.forward(ids)
    e64, e32 = max_rel(full64, ref), max_rel(full32, ref)
    check(e64 <= TOL64, "%s: float64 full forward vs oracle" % name, "max-rel %.3g" % e64)
    check(e32 <= TOL32, "%s: float32 full forward vs oracle" % name, "max-rel %.3g" % e32)
    check(c64.pos == T_FULL, "%s: cache position after the full forward" % name, c64.pos)
    if liza is not None:
        m64.liza_impl = "steps"
        st64, _ = m64.forward(ids)
        m64.liza_impl = "auto"
        es = max_rel(st64, ref)
        check(es <= TOL64, "%s: float64 recurrent kernel (full sequence) vs oracle" % name, "max-rel %.3g" % es)
        stats["steps64"] = max(stats.get("steps64", 0), es)
        if m64.pure_linear:
            check(all(lc.k is None for lc in c64.layers), "%s: pure-linear keeps no KV cache" % name)
    # (b) prefill ending mid-chunk, then one token at a time across chunk boundaries
    C = liza["chunk_size"] if liza else 4
    P = C + C // 2 + 1 if C < 8 else 6
    blocks1 = [P] + [1] * (T_FULL - P)
    blocks2 = [3, 1, 5, 2, 1, 7]
    for tag, blocks in (("prefill+steps", blocks1), ("uneven blocks", blocks2)):
        lg64, cc = cached_logits(m64, ids, blocks)
        lg32, _ = cached_logits(m32, ids, blocks)
        a, b = max_rel(lg64, full64), max_rel(lg32, full32)
        check(a <= TOL_CACHE64, "%s: float64 cached (%s) = full" % (name, tag), "max-rel %.3g" % a)
        check(b <= TOL_CACHE32, "%s: float32 cached (%s) = full" % (name, tag), "max-rel %.3g" % b)
        stats["cache64"] = max(stats.get("cache64", 0), a)
        stats["cache32"] = max(stats.get("cache32", 0), b)
        if MODELS[mname].get("window") and cc.layers[0].k is not None:
            check(cc.layers[0].k.shape[2] <= MODELS[mname]["window"], "%s: window-bounded KV cache" % name,
                  cc.layers[0].k.shape)
    # chunked kernel for single tokens too
    if liza is not None:
        m64.liza_impl = "chunk"
        lgc, _ = cached_logits(m64, ids, blocks1)
        m64.liza_impl = "auto"
        a = max_rel(lgc, full64)
        check(a <= TOL_CACHE64, "%s: chunked kernel one token at a time = full" % name, "max-rel %.3g" % a)
    stats["full64"] = max(stats.get("full64", 0), e64)
    stats["full32"] = max(stats.get("full32", 0), e32)
    print("%-24s f64 %.2e  f32 %.2e" % (name, e64, e32), flush=True)
    return out


def test_batch_and_generate(tmp, export_dir):
    m = TM.load_dir(export_dir, dtype=torch.float64)
    rng = np.random.default_rng(7)
    ids = torch.as_tensor(rng.integers(0, 61, size=(3, 11)), dtype=torch.long)
    lb, cache = m.forward(ids[:, :6])
    lb2, _ = m.forward(ids[:, 6:], cache)
    lb = torch.cat([lb, lb2], 1)
    for r in range(3):
        single, _ = m.forward(ids[r])
        e = max_rel(lb[r], single)
        check(e <= TOL_CACHE64, "batch row %d (cached, 2 blocks) = single-sequence forward" % r, "max-rel %.3g" % e)
    prompt = ids[0, :5].tolist()
    gen = m.generate(prompt, 9)
    seq = list(prompt)
    want = []
    for _ in range(9):
        lg, _ = m.forward(torch.tensor(seq))
        nxt = int(torch.argmax(lg[-1]))
        want.append(nxt)
        seq.append(nxt)
    check(gen == want, "greedy generate() with the cache = argmax of full forwards", "%s vs %s" % (gen, want))


def test_sensitivity(tmp, export_dir):
    """A wrong mu (the exported config's mu perturbed) must move the logits far past the tolerance."""
    with open(os.path.join(export_dir, "config.json")) as f:
        conf = json.load(f)
    ids = list(range(3, 3 + T_FULL))
    ref = oracle_logits(export_dir, ids)
    tensors = TM.read_model_tensors(export_dir)
    bad = json.loads(json.dumps(conf))
    bad["mag"]["mu"] = conf["mag"]["mu"] + 0.01
    lg, _ = TM.TitanMath(bad, tensors, dtype=torch.float64).forward(torch.tensor(ids))
    e = max_rel(lg, ref)
    check(e > 100 * TOL64, "sensitivity: mu + 0.01 is detected", "max-rel %.3g" % e)
    bad = json.loads(json.dumps(conf))
    bad["liza"]["chunk_size"] = conf["liza"]["chunk_size"] + 1
    lg, _ = TM.TitanMath(bad, tensors, dtype=torch.float64).forward(torch.tensor(ids))
    e = max_rel(lg, ref)
    check(e > 100 * TOL64, "sensitivity: another chunk size (linear false) is detected", "max-rel %.3g" % e)


def test_reader(export_dir):
    got = TM.read_model_tensors(export_dir)
    index = os.path.join(export_dir, "model.safetensors.index.json")
    want = {}
    for fn in sorted(set(json.load(open(index))["weight_map"].values())):
        want.update(stnp.load(os.path.join(export_dir, fn))[0])
    check(set(got) == set(want), "reader: same tensor names as safetensors_np", sorted(set(got) ^ set(want))[:5])
    bad = [n for n in want if n in got and not np.array_equal(got[n].to(torch.float32).numpy(),
                                                              np.asarray(want[n], dtype=np.float32))]
    check(not bad, "reader: same values (bf16/f32) as safetensors_np", bad[:5])
    dts = {str(t.dtype) for n, t in got.items() if not n.endswith("mag_logit")}
    check(dts == {"torch.bfloat16"}, "reader: bf16 tensors stay bf16", dts)
    # low-precision compute runs (LiZA, norms and softmax stay float32) and stays close
    ids = list(range(2, 2 + T_FULL))
    ref = oracle_logits(export_dir, ids)
    for dt in (None, torch.bfloat16):
        m = TM.TitanMath(json.load(open(os.path.join(export_dir, "config.json"))), got, dtype=dt)
        lg, cache = m.forward(torch.tensor(ids[:7]))
        lg2, _ = m.forward(torch.tensor(ids[7:8]), cache)
        e = max_rel(torch.cat([lg, lg2]).float(), ref[:8])
        check(e <= 5e-2 and m.ldtype == torch.float32, "bf16 compute (dtype=%s) runs and stays close" % dt,
              "max-rel %.3g" % e)
        print("bf16 compute dtype=%s: max-rel %.2e" % (dt, e), flush=True)


def test_transformers(tmp, export_dir):
    try:
        import transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print("SKIP: transformers not installed: modeling_tptt glue not run (%s)" % type(e).__name__, flush=True)
        return
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(export_dir, trust_remote_code=True)
    check(cfg.model_type == "tptt_titan", "glue: AutoConfig model_type", cfg.model_type)
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, torch_dtype=torch.float32)
    model.eval()
    m = TM.load_dir(export_dir, dtype=torch.float32)
    ids = torch.as_tensor(np.random.default_rng(3).integers(0, 61, size=(2, 13)), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids)
    want, _ = m.forward(ids)
    e = max_rel(out.logits, want)
    check(e <= 1e-5, "glue: logits = TitanMath", "max-rel %.3g" % e)
    with torch.no_grad():
        gen = model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, use_cache=True,
                             eos_token_id=None, pad_token_id=0)
    mine = m.generate(ids[0, :5].tolist(), 8)
    check(gen[0, 5:].tolist() == mine, "glue: greedy generate = TitanMath.generate", "%s vs %s" %
          (gen[0, 5:].tolist(), mine))


def install_transformers_stub():
    """A minimal stand-in for the parts of transformers the glue uses, to check
    its structure (parameter names = the export's tensor names, cache flow)
    where transformers is missing. Returns the names it put in sys.modules."""
    import types
    tf = types.ModuleType("transformers")
    mo = types.ModuleType("transformers.modeling_outputs")

    class PretrainedConfig:
        def __init__(self, tie_word_embeddings=True, **kw):
            self.tie_word_embeddings = tie_word_embeddings
            self.__dict__.update(kw)

        def to_dict(self):
            return json.loads(json.dumps(self.__dict__))

    class PreTrainedModel(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config

        def post_init(self):
            pass

    class GenerationMixin:
        pass

    class CausalLMOutputWithPast:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    tf.PretrainedConfig, tf.PreTrainedModel, tf.GenerationMixin = PretrainedConfig, PreTrainedModel, GenerationMixin
    mo.CausalLMOutputWithPast = CausalLMOutputWithPast
    tf.modeling_outputs = mo
    sys.modules["transformers"] = tf
    sys.modules["transformers.modeling_outputs"] = mo
    return ["transformers", "transformers.modeling_outputs"]


def test_glue_stub(export_dirs):
    """modeling_tptt under the stub: names, load, logits, cached greedy loop."""
    import importlib
    added = install_transformers_stub()
    sys.path.insert(0, export_dirs[0])
    try:
        for mod in ("configuration_tptt", "modeling_tptt"):
            sys.modules.pop(mod, None)
        mt = importlib.import_module("modeling_tptt")
        check(os.path.dirname(os.path.abspath(mt.__file__)) == os.path.abspath(export_dirs[0]),
              "stub glue: modeling_tptt imported from the export directory", mt.__file__)
        for d in export_dirs:
            name = os.path.basename(d)
            with open(os.path.join(d, "config.json")) as f:
                conf = json.load(f)
            model = mt.TpttTitanForCausalLM(mt.TpttTitanConfig(**conf))
            state = TM.read_model_tensors(d)
            tied = bool(conf.get("tie_word_embeddings"))
            if tied:
                model.lm_head.weight = model.model.embed_tokens.weight
            pnames = set(dict(model.named_parameters())) | ({"lm_head.weight"} if tied else set())
            want = set(state) | ({"lm_head.weight"} if tied else set())
            check(pnames == want, "stub glue %s: parameter names = export tensor names" % name,
                  sorted(pnames ^ want)[:6])
            res = model.load_state_dict(state, strict=False)
            check(list(res.unexpected_keys) == [] and set(res.missing_keys) <= {"lm_head.weight"},
                  "stub glue %s: load_state_dict" % name, res)
            m = TM.load_dir(d, dtype=torch.float32)
            ids = torch.as_tensor(np.random.default_rng(5).integers(0, 61, size=(2, 9)), dtype=torch.long)
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
                want_lg, _ = m.forward(ids)
                e = max_rel(out.logits, want_lg)
                check(e <= 1e-6, "stub glue %s: logits = TitanMath" % name, "max-rel %.3g" % e)
                check(out.loss is None and isinstance(out.past_key_values, TM.TitanCache),
                      "stub glue %s: output fields" % name)
                lab = model(input_ids=ids, labels=ids).loss
                ref = torch.nn.functional.cross_entropy(want_lg[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1))
                check(abs(float(lab) - float(ref)) <= 1e-5 * abs(float(ref)), "stub glue %s: loss" % name)
                seq = ids[:1, :4]
                past = None
                for _ in range(7):
                    inp = model.prepare_inputs_for_generation(seq, past_key_values=past, use_cache=True)
                    o = model(**inp)
                    past = o.past_key_values
                    seq = torch.cat([seq, o.logits[:, -1:].argmax(-1)], 1)
                mine = m.generate(ids[0, :4].tolist(), 7)
                check(seq[0, 4:].tolist() == mine, "stub glue %s: cached greedy loop = TitanMath.generate" % name,
                      "%s vs %s" % (seq[0, 4:].tolist(), mine))
                try:
                    model(input_ids=ids, attention_mask=torch.tensor([[1] * 9, [0] + [1] * 8]))
                    check(False, "stub glue %s: padding refused" % name)
                except NotImplementedError:
                    check(True, "stub glue %s: padding refused" % name)
    finally:
        sys.path.remove(export_dirs[0])
        for mod in added + ["configuration_tptt", "modeling_tptt"]:
            sys.modules.pop(mod, None)


def main():
    tmp = tempfile.mkdtemp(prefix="titan_py_")
    stats = {}
    exports = {}
    try:
        p = kit.run([TPTT, "version"], text=True)
        if p.returncode != 0:
            return kit.abort("cannot run %s" % TPTT)
        for name, mname, liza, mag, opts in CASES:
            kit.call(lambda: exports.__setitem__(name, run_case(tmp, name, mname, liza, mag, opts, stats)))
        if exports.get("learnable_vector_cross"):
            kit.call(test_batch_and_generate, tmp, exports["learnable_vector_cross"])
        if exports.get("gelu_order2_C3"):
            kit.call(test_sensitivity, tmp, exports["gelu_order2_C3"])
        if exports.get("bf16_shards"):
            kit.call(test_reader, exports["bf16_shards"])
        if exports.get("qwen2_tied"):
            kit.call(test_transformers, tmp, exports["qwen2_tied"])
        try:
            import transformers  # noqa: F401
        except Exception:  # noqa: BLE001
            dirs = [exports.get(n) for n in ("qwen2_tied", "learnable_vector_cross", "pure_linear_phi")]
            if all(dirs):
                kit.call(test_glue_stub, dirs)
        print("max errors: " + ", ".join("%s %.2e" % kv for kv in sorted(stats.items())), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
