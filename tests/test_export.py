#!/usr/bin/env python3
"""test_export - `tptt export` merged / peft / titan.

* merged, LoRA-only checkpoints of each architecture (tied embeddings and
  Qwen2 biases included): every exported tensor equals W + s*B*A computed
  here with numpy from the checkpoint's own files, rounded to the chosen
  dtype (f32 and bf16, sharded and not); the export runs under `tptt
  generate --model` with the same logits as the checkpoint through the
  loader (f32: 1e-5 relative) and the same greedy ids.
* peft: PEFT's file conventions (peft/utils/save_and_load.py writes
  "base_model.model.<module>.lora_A.weight" [r, in] / "lora_B.weight"
  [out, r]; peft/tuners/lora/config.py LoraConfig fields r, lora_alpha,
  lora_dropout, target_modules, use_rslora, bias, fan_in_fan_out,
  peft_type, task_type, base_model_name_or_path) and the --base-id value.
* titan: config.json fields, MaG logits, the modeling files; LiZA refusal for
  merged/peft without --drop-liza, and what --drop-liza says it dropped.
* Bad input: corrupt checkpoint, missing base, an output directory that
  exists, the base model's own directory; nothing half-written is left.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "py"))
sys.path.insert(0, HERE)
import numpy as np  # noqa: E402

import safetensors_np as stnp  # noqa: E402
import testkit  # noqa: E402
import train_util as tu  # noqa: E402

TPTT = os.environ.get("TPTT", "tptt")
kit = testkit.Checker("test_export")
check = kit.check
work = tempfile.mkdtemp(prefix="tptt_test_export_")
ENV = dict(os.environ)
ENV.update(tu.MPI_ENV)


def run(args, what, timeout=300):
    return kit.run([TPTT] + [str(a) for a in args], env=ENV, timeout=timeout, text=True, what=what)


def load_dir(d):
    """{name: float64 array} of a model directory (index or single file)."""
    _, t = stnp.load_model_dir(d)
    return {k: v.astype(np.float64) for k, v in t.items()}


def bf16_round(x):
    """float64 -> nearest-even bfloat16, returned as float64."""
    f = np.asarray(x, np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


V = 256
data = os.path.join(work, "data.tok")
tu.make_data(data, vocab=V, docs=30)
prompt = "3,5,7,9,11,13,15,17,19"


def base(name, arch, extra=()):
    d = os.path.join(work, name)
    subprocess.run([TPTT, "init-model", "--arch", arch, "--layers", "2", "--hidden", "32", "--heads", "4",
                    "--kv-heads", "2", "--ffn", "64", "--vocab", str(V), "--byte-tokenizer", "--dtype", "f32",
                    "--init-std", "0.2", "--seed", "3", "--force", d] + list(extra), check=True, capture_output=True)
    return d


def train(name, b, **over):
    run_dir = os.path.join(work, name)
    cfg = os.path.join(work, name + ".yaml")
    tu.write_config(cfg, b, data, run_dir, lora__dropout=0.0, optimizer__lr=3e-2, schedule__total_steps=3,
                    checkpoint__every=3, **over)
    kit.succeeds(tu.train(cfg, ranks=0), "train " + name)
    return run_dir


def gen(args, what):
    lo = os.path.join(work, "lo.safetensors")
    if os.path.exists(lo):
        os.remove(lo)
    p = run(["generate"] + args + ["--prompt-ids", prompt, "--max-new-tokens", 6, "--ignore-eos", "--matmul", "f32",
                                   "--logits-out", lo], what)
    if not kit.succeeds(p, what):
        return None, None
    t, _ = stnp.load(lo)
    return json.loads(p.stdout.splitlines()[-1])["ids"], t["logits.0"].astype(np.float64)


# ---- merged: each arch, LoRA only
cases = [("llama", "llama", ()), ("mistral_tied", "mistral", ("--tie",)), ("qwen2", "qwen2", ())]
for name, arch, extra in cases:
    b = base(name + "_base", arch, extra)
    r = train(name + "_run", b, liza__enabled=False, lora__target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    ck = tu.latest(r)
    for dtype, shard in (("f32", "5GB"), ("bf16", "20KB")):
        out = os.path.join(work, "%s_%s" % (name, dtype))
        p = run(["export", r, "--out", out, "--format", "merged", "--dtype", dtype, "--shard-size", shard],
                "%s %s export" % (name, dtype))
        if not kit.succeeds(p, "%s: merged %s export" % (name, dtype)):
            continue
        got = load_dir(out)
        w = load_dir(b)
        ad, _ = stnp.load(os.path.join(ck, "adapter_model.safetensors"))
        with open(os.path.join(ck, "adapter_config.json")) as f:
            ac = json.load(f)
        s = ac["lora_alpha"] / ac["r"]
        kit.eq(sorted(got), sorted(w), "%s %s: the base's tensor names" % (name, dtype))
        worst = 0.0
        for k, W in w.items():
            mod = k[:-len(".weight")] if k.endswith(".weight") else None
            a = ad.get("base_model.model.%s.lora_A.weight" % mod) if mod else None
            want = W + s * ad["base_model.model.%s.lora_B.weight" % mod].astype(np.float64) @ a.astype(np.float64) \
                if a is not None else W
            if dtype == "bf16":
                want = bf16_round(want)
                # folding is done in fp32, then rounded: allow one bf16 ulp
                tol = np.abs(want) * 2.0 ** -7 + 1e-30
                ok = np.all(np.abs(got[k] - want) <= tol)
            else:
                ok = np.allclose(got[k], want, rtol=1e-6, atol=1e-7)
            worst = max(worst, float(np.max(np.abs(got[k] - want))))
            check(ok, "%s %s: %s = W + s*B*A" % (name, dtype, k), float(np.max(np.abs(got[k] - want))))
        with open(os.path.join(out, "config.json")) as f:
            c = json.load(f)
        kit.eq(c.get("torch_dtype"), {"f32": "float32", "bf16": "bfloat16"}[dtype], "%s %s: torch_dtype" % (name, dtype))
        check(os.path.exists(os.path.join(out, "tokenizer.json")), "%s %s: tokenizer copied" % (name, dtype))
        if dtype == "bf16":
            check(os.path.exists(os.path.join(out, "model.safetensors.index.json")), "%s: sharded with an index" % name)
            _, meta = stnp.load(os.path.join(out, "model-00001-of-%05d.safetensors" %
                                             len({v for v in json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"].values()})))
            kit.eq(meta.get("format"), "pt", "shard metadata format pt")
        else:
            ids_ck, lg_ck = gen(["--checkpoint", r], name + ": generate from the checkpoint")
            ids_ex, lg_ex = gen(["--model", out], name + ": generate from the merged export")
            if lg_ck is not None and lg_ex is not None:
                err = float(np.max(np.abs(lg_ck - lg_ex)) / np.max(np.abs(lg_ck)))
                check(err < 1e-5, name + ": merged export's logits = the checkpoint's", err)
                kit.eq(ids_ex, ids_ck, name + ": same greedy ids")

# ---- a LiZA checkpoint: refusal, --drop-liza, peft, titan
lb = base("liza_base", "llama")
lr = train("liza_run", lb, liza__preset="delta_product", liza__chunk_size=4, mag__mode="learnable",
           mag__learnable_shape="vector")
for fmt in ("merged", "peft"):
    out = os.path.join(work, "refused_" + fmt)
    p = run(["export", lr, "--out", out, "--format", fmt], "refuse " + fmt)
    check(p.returncode == 1 and "LiZA" in p.stderr and "--drop-liza" in p.stderr and not os.path.exists(out),
          fmt + " of a LiZA checkpoint is refused, nothing written", p.stderr)
out = os.path.join(work, "peft")
p = run(["export", lr, "--out", out, "--format", "peft", "--drop-liza", "--base-id", "org/tiny-base"], "peft")
if kit.succeeds(p, "peft export with --drop-liza"):
    check("dropped" in p.stdout and "LiZA" in p.stdout, "the report says what was dropped", p.stdout)
    kit.eq(sorted(os.listdir(out)), ["adapter_config.json", "adapter_model.safetensors"], "peft files")
    t, meta = stnp.load(os.path.join(out, "adapter_model.safetensors"))
    kit.eq(meta, {"format": "pt"}, "adapter metadata")
    ck = tu.latest(lr)
    ref, _ = stnp.load(os.path.join(ck, "adapter_model.safetensors"))
    kit.eq(sorted(t), sorted(ref), "adapter keys = the checkpoint's LoRA keys")
    for k, v in t.items():
        check(np.array_equal(v, ref[k]), "adapter tensor %s exact" % k)
        parts = k.split(".")
        check(k.startswith("base_model.model.model.layers.") and parts[-2] in ("lora_A", "lora_B") and
              parts[-1] == "weight", "PEFT key form: " + k)
        if parts[-2] == "lora_A":
            kit.eq(v.shape[0], 4, k + ": A is [r, in]")
        else:
            kit.eq(v.shape[1], 4, k + ": B is [out, r]")
    with open(os.path.join(out, "adapter_config.json")) as f:
        ac = json.load(f)
    for key, want in (("peft_type", "LORA"), ("task_type", "CAUSAL_LM"), ("r", 4), ("lora_alpha", 8),
                      ("bias", "none"), ("fan_in_fan_out", False), ("use_rslora", False),
                      ("base_model_name_or_path", "org/tiny-base")):
        kit.eq(ac.get(key), want, "adapter_config " + key)
    kit.eq(sorted(ac.get("target_modules", [])), ["k_proj", "o_proj", "q_proj", "v_proj"], "target_modules")
out = os.path.join(work, "titan")
p = run(["export", lr, "--out", out, "--format", "titan", "--dtype", "bf16"], "titan")
if kit.succeeds(p, "titan export"):
    with open(os.path.join(out, "config.json")) as f:
        c = json.load(f)
    kit.eq((c["model_type"], c["architectures"], c["base_model_type"]),
           ("tptt_titan", ["TpttTitanForCausalLM"], "llama"), "titan config identity")
    kit.eq(c["auto_map"]["AutoModelForCausalLM"], "modeling_tptt.TpttTitanForCausalLM", "auto_map")
    kit.eq(c["liza"], {"order": 2, "alpha_gate": "c", "beta_gate": "k", "linear": True, "trick": "dt",
                       "chunk_size": 4, "base_scale_attn": False}, "liza fields")
    kit.eq(c["mag"], {"mode": "learnable", "mu": None, "learnable_shape": "vector", "cross_gate": False}, "mag fields")
    kit.eq(c["tptt_export"]["step"], 3, "exported step")
    t = load_dir(out)
    lz, _ = stnp.load(os.path.join(tu.latest(lr), "liza_model.safetensors"))
    for l in range(2):
        k = "model.layers.%d.self_attn.mag_logit" % l
        check(k in t and np.array_equal(t[k], lz["base_model.model." + k].astype(np.float64)), "titan holds " + k)
    py = sorted(f for f in os.listdir(out) if f.endswith(".py"))
    src = sorted(f for f in os.listdir(os.path.join(os.environ.get("TPTT_SOURCE_DIR", os.path.dirname(HERE)),
                                                    "export", "titan")) if f.endswith(".py")) \
        if os.path.isdir(os.path.join(os.environ.get("TPTT_SOURCE_DIR", os.path.dirname(HERE)), "export", "titan")) else []
    kit.eq(py, src, "the modeling files shipped")
p = run(["export", os.path.join(work, "llama_run"), "--out", os.path.join(work, "t2"), "--format", "titan"],
        "titan without LiZA")
check(p.returncode == 1 and "no LiZA" in p.stderr, "titan of a LoRA-only run is refused", p.stderr)


# ---- titan: the shipped PyTorch math runs our C export and reproduces our logits
SRC = os.environ.get("TPTT_SOURCE_DIR", os.path.dirname(HERE))
sys.path.insert(0, os.path.join(SRC, "export", "titan"))
import torch  # noqa: E402
import tptt_titan_math as ttm  # noqa: E402

torch.set_num_threads(1)
presets = ["delta_rule", "gated_delta_rule", "delta_rule_v", "delta_rule_kv", "delta_rule_gelu", "delta_product",
           "gated_delta_product", "delta_product_r", "delta_product_c"]
variants = [(p_, {}) for p_ in presets] + [
    ("delta_product", {"mag__mode": "constant", "mag__mu0": 1.0}),                        # pure linear
    ("gated_delta_product", {"mag__mode": "gradual", "mag__mu0": 0.2, "mag__mu1": 0.9, "mag__steps": 4,
                             "mag__cross_gate": True, "liza__base_scale_attn": True}),
]
mbase = base("titan_mistral_base", "mistral", ("--sliding-window", "6"))
for i, (preset, over) in enumerate(variants):
    label = "titan %s%s" % (preset, " " + ",".join("%s=%s" % kv for kv in over.items()) if over else "")
    b = mbase if i % 3 == 2 else lb
    ov = {"liza__preset": preset, "liza__chunk_size": 4, "mag__mode": "learnable", "mag__learnable_shape": "scalar"}
    ov.update(over)
    rd = train("titan_run_%d" % i, b, **ov)
    out = os.path.join(work, "titan_%d" % i)
    p = run(["export", rd, "--out", out, "--format", "titan", "--dtype", "f32", "--shard-size", "40KB"], label)
    if not kit.succeeds(p, label + ": export"):
        continue
    ids, lg = gen(["--checkpoint", rd], label + ": generate")
    if ids is None:
        continue
    model = ttm.load_dir(out, dtype=torch.float64)
    seq = torch.tensor([int(x) for x in prompt.split(",")] + ids[:-1])
    full, _ = model.forward(seq)
    ref = full[len(prompt.split(",")) - 1:].numpy()
    err = float(np.max(np.abs(ref - lg)) / np.max(np.abs(ref)))
    check(err < 1e-5, label + ": the shipped math on our export = our logits", err)
    # its cached generation equals its full forward
    cache = None
    steps = []
    pre, _ = None, None
    head = seq[:7]
    lgc, cache = model.forward(head, cache=cache)
    steps.append(lgc[-1])
    for t in range(7, len(seq)):
        lgc, cache = model.forward(seq[t:t + 1], cache=cache)
        steps.append(lgc[-1])
    cached = torch.stack(steps).numpy()
    e2 = float(np.max(np.abs(cached - full[6:].numpy())) / np.max(np.abs(full.numpy())))
    check(e2 < 1e-9, label + ": the shipped math's cache = its full forward", e2)

# ---- bad input
def bad(args, want, what, code=1):
    p = run(args, what)
    check(p.returncode == code and want in p.stderr, what + ": exit %d naming %r" % (code, want),
          "exit %d, stderr: %s" % (p.returncode, p.stderr[:600]))


exists = os.path.join(work, "exists")
os.makedirs(exists)
open(os.path.join(exists, "keep.txt"), "w").write("precious")
bad(["export", lr, "--out", exists, "--format", "titan"], "not empty", "existing non-empty output")
kit.eq(os.listdir(exists), ["keep.txt"], "the existing directory is untouched")
bad(["export", os.path.join(work, "llama_run"), "--out", os.path.join(work, "llama_base"), "--drop-liza"],
    "base model", "export into the base model's directory")
corrupt = os.path.join(work, "corrupt")
shutil.copytree(tu.latest(lr), corrupt)
with open(os.path.join(corrupt, "liza_model.safetensors"), "r+b") as f:
    f.seek(-2, 2)
    f.write(b"\x01\x02")
bad(["export", corrupt, "--out", os.path.join(work, "c_out"), "--format", "titan"], "liza_model.safetensors",
    "corrupt checkpoint")
check(not os.path.exists(os.path.join(work, "c_out")), "nothing written for a corrupt checkpoint")
bad(["export", lr, "--model", os.path.join(work, "gone"), "--out", os.path.join(work, "m_out"), "--format", "titan"],
    "gone", "missing base")
bad(["export", lr, "--out", os.path.join(work, "x"), "--format", "zip"], "--format", "bad format", code=2)
bad(["export", lr, "--out", os.path.join(work, "x"), "--shard-size", "12 parsecs"], "--shard-size", "bad size", code=2)
leftovers = [f for f in os.listdir(work) if ".tmp-export-" in f]
kit.eq(leftovers, [], "no temporary export directories left")

shutil.rmtree(work, ignore_errors=True)
sys.exit(kit.report())
