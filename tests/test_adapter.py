"""`tptt adapter resize` and `tptt adapter convert-pissa` (src/cli/cmd_adapter.c)
against numpy, on 1, 2 and 4 MPI ranks.

  - resize to R: s'*B'*A' equals numpy's rank-R truncation of s*B*A for every
    module; the reported energy equals numpy's; r' = R and lora_alpha keeps s;
    R >= r reproduces s*B*A; PEFT file layout (keys, F32, [R, in] / [out, R],
    {"format": "pt"}); same answer on 1, 2 and 4 ranks;
  - a real checkpoint (tptt train, 2 steps) given as a run directory;
  - convert-pissa: s*(B'A') == s*(B*A - B0*A0), rank 2r, and with --rank R the
    rank-R truncation of that;
  - bad input: rank larger than min(in, out), a non-empty --out, no adapter,
    a corrupted checkpoint, a mismatched initial adapter."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
import safetensors_np as stnp  # noqa: E402
import train_util as tu  # noqa: E402

TPTT = os.environ.get("TPTT", "tptt")
ENV = dict(os.environ, **tu.MPI_ENV)
fails = []


def check(cond, msg):
    if not cond:
        fails.append(msg)
        print("FAIL:", msg, flush=True)


def tptt(args, ranks=1):
    cmd = [TPTT] + [str(a) for a in args]
    if ranks > 1:
        cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(ranks)] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


MODS = [("model.layers.0.self_attn.q_proj", 32, 32), ("model.layers.0.mlp.down_proj", 48, 20),
        ("model.layers.1.mlp.up_proj", 20, 48), ("model.layers.1.self_attn.k_proj", 32, 16)]


def make_adapter(d, r, alpha, rng, rslora=False, decay=0.5):
    os.makedirs(d, exist_ok=True)
    t = {}
    for name, inn, out in MODS:
        # factors with a decaying spectrum so truncation keeps most energy
        A = (rng.standard_normal((r, inn)) * np.exp(-decay * np.arange(r))[:, None]).astype(np.float32)
        B = rng.standard_normal((out, r)).astype(np.float32)
        t[f"base_model.model.{name}.lora_A.weight"] = ("F32", A)
        t[f"base_model.model.{name}.lora_B.weight"] = ("F32", B)
    stnp.save(os.path.join(d, "adapter_model.safetensors"), t, {"format": "pt"})
    cfg = {"base_model_name_or_path": "/nowhere", "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
           "lora_alpha": alpha, "lora_dropout": 0.0, "peft_type": "LORA", "r": r,
           "target_modules": ["q_proj", "k_proj", "up_proj", "down_proj"], "task_type": "CAUSAL_LM",
           "use_rslora": rslora}
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return {k: v[1] for k, v in t.items()}


def scale_of(cfg):
    return cfg["lora_alpha"] / (np.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])


def load(d):
    t, meta = stnp.load(os.path.join(d, "adapter_model.safetensors"))
    with open(os.path.join(d, "adapter_config.json")) as f:
        cfg = json.load(f)
    return t, meta, cfg


def prods(t, s):
    out = {}
    for k in t:
        if k.endswith(".lora_A.weight"):
            p = k[:-len(".lora_A.weight")]
            out[p] = s * (t[p + ".lora_B.weight"].astype(np.float64) @ t[p + ".lora_A.weight"].astype(np.float64))
    return out


def check_resize(tag, src_t, src_cfg, out_dir, R, p):
    check(p.returncode == 0, f"{tag}: exit {p.returncode}: {p.stderr[-600:]}")
    if p.returncode:
        return None
    t, meta, cfg = load(out_dir)
    s0, s1 = scale_of(src_cfg), scale_of(cfg)
    check(cfg["r"] == R, f"{tag}: r = {cfg['r']}, expected {R}")
    check(abs(s1 - s0) < 1e-12 * s0, f"{tag}: scale changed {s0} -> {s1} (lora_alpha {cfg['lora_alpha']})")
    check(meta == {"format": "pt"}, f"{tag}: metadata {meta}")
    check(list(t) == list(src_t), f"{tag}: keys/order {list(t)[:4]} vs {list(src_t)[:4]}")
    with open(os.path.join(out_dir, "resize_report.json")) as f:
        rep = json.load(f)
    before, after = prods(src_t, s0), prods(t, s1)
    for i, (p_, dw) in enumerate(before.items()):
        A, B = t[p_ + ".lora_A.weight"], t[p_ + ".lora_B.weight"]
        check(A.dtype == np.float32 and A.shape == (R, dw.shape[1]) and B.shape == (dw.shape[0], R),
              f"{tag}: {p_}: A {A.dtype} {A.shape}, B {B.shape}")
        U, S, Vt = np.linalg.svd(dw, full_matrices=False)
        keep = min(R, len(S))
        ref = (U[:, :keep] * S[:keep]) @ Vt[:keep]
        e = np.max(np.abs(after[p_] - ref)) / np.max(np.abs(dw))
        check(e < 2e-6, f"{tag}: {p_}: product differs from numpy's rank-{R} truncation by {e:.3g}")
        en = np.sum(S[:keep] ** 2) / np.sum(S ** 2)
        m = rep["modules"][i]
        check(m["module"] == p_ and abs(m["energy"] - en) < 1e-10,
              f"{tag}: {p_}: report energy {m['energy']} ({m['module']}) vs numpy {en}")
        check(p_ in p.stdout, f"{tag}: {p_} not in the printed report")
    return after


def main():
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        src_t = make_adapter(src, 8, 16, rng)
        _, _, src_cfg = load(src)
        dw = prods(src_t, scale_of(src_cfg))
        results = {}
        for ranks in (1, 2, 4):
            for R in (3, 8, 16):
                out = os.path.join(tmp, f"r{R}_np{ranks}")
                p = tptt(["adapter", "resize", src, "--rank", R, "--out", out, "--block", 4], ranks)
                after = check_resize(f"resize R{R} np{ranks}", src_t, src_cfg, out, R, p)
                if after is not None:
                    results[(R, ranks)] = after
                    if R >= 8:
                        e = max(np.max(np.abs(after[k] - dw[k])) / np.max(np.abs(dw[k])) for k in dw)
                        check(e < 2e-6, f"resize R{R} np{ranks}: does not reproduce s*B*A ({e:.3g})")
        for R in (3, 8, 16):
            if all((R, n) in results for n in (1, 2, 4)):
                e = max(np.max(np.abs(results[(R, n)][k] - results[(R, 1)][k])) for n in (2, 4) for k in dw)
                check(e < 1e-6, f"resize R{R}: results differ across rank counts by {e:.3g}")
        print("ok: resize on 1, 2, 4 ranks", flush=True)

        # rslora and an explicit --alpha
        src2 = os.path.join(tmp, "src_rs")
        t2 = make_adapter(src2, 6, 12, rng, rslora=True)
        _, _, c2 = load(src2)
        out = os.path.join(tmp, "rs")
        p = tptt(["adapter", "resize", src2, "--rank", 4, "--out", out])
        check_resize("resize rslora", t2, c2, out, 4, p)
        out = os.path.join(tmp, "alpha")
        p = tptt(["adapter", "resize", src, "--rank", 4, "--out", out, "--alpha", 4])
        check(p.returncode == 0, f"--alpha: {p.stderr}")
        if p.returncode == 0:
            t, _, cfg = load(out)
            check(cfg["lora_alpha"] == 4 and cfg["r"] == 4, f"--alpha: config {cfg}")
            after = prods(t, 1.0)
            for k, d in dw.items():
                U, S, Vt = np.linalg.svd(d, full_matrices=False)
                ref = (U[:, :4] * S[:4]) @ Vt[:4]
                check(np.max(np.abs(after[k] - ref)) < 2e-6 * np.max(np.abs(d)), f"--alpha: {k}: product")

        # convert-pissa: the trained adapter minus its initialisation, rank 2r
        init = os.path.join(tmp, "init")
        t0 = make_adapter(init, 8, 16, rng)
        out = os.path.join(tmp, "conv")
        for ranks in (1, 2):
            o = out + str(ranks)
            p = tptt(["adapter", "convert-pissa", src, "--initial", init, "--out", o], ranks)
            check(p.returncode == 0, f"convert-pissa np{ranks}: {p.stderr[-600:]}")
            if p.returncode:
                continue
            t, meta, cfg = load(o)
            check(cfg["r"] == 16 and cfg["lora_alpha"] == 32, f"convert-pissa: config r {cfg['r']} alpha {cfg['lora_alpha']}")
            s = scale_of(cfg)
            d0 = prods(t0, scale_of(src_cfg))
            got = prods(t, s)
            for k in dw:
                ref = dw[k] - d0[k]
                check(np.max(np.abs(got[k] - ref)) < 1e-6 * np.max(np.abs(ref)), f"convert-pissa np{ranks}: {k}")
            o = out + f"R{ranks}"
            p = tptt(["adapter", "convert-pissa", src, "--initial", init, "--out", o, "--rank", 5], ranks)
            check(p.returncode == 0, f"convert-pissa --rank np{ranks}: {p.stderr[-600:]}")
            if p.returncode == 0:
                t, _, cfg = load(o)
                got = prods(t, scale_of(cfg))
                check(cfg["r"] == 5 and abs(scale_of(cfg) - scale_of(src_cfg)) < 1e-12, f"convert-pissa --rank: {cfg}")
                for k in dw:
                    ref = dw[k] - d0[k]
                    U, S, Vt = np.linalg.svd(ref, full_matrices=False)
                    tr = (U[:, :5] * S[:5]) @ Vt[:5]
                    check(np.max(np.abs(got[k] - tr)) < 2e-6 * np.max(np.abs(ref)), f"convert-pissa --rank np{ranks}: {k}")
        print("ok: convert-pissa", flush=True)

        # bad input
        p = tptt(["adapter", "resize", src, "--rank", 17, "--out", os.path.join(tmp, "bad1")])
        check(p.returncode == 1 and "min(in, out) = 16" in p.stderr and "k_proj" in p.stderr,
              f"rank 17: {p.returncode} {p.stderr}")
        check(not os.path.exists(os.path.join(tmp, "bad1")), "rank 17: output directory left behind")
        p = tptt(["adapter", "resize", src, "--rank", 2, "--out", os.path.join(tmp, "r3_np1")])
        check(p.returncode == 1 and "not empty" in p.stderr, f"non-empty --out: {p.stderr}")
        p = tptt(["adapter", "resize", tmp, "--rank", 2, "--out", os.path.join(tmp, "bad2")])
        check(p.returncode == 1 and "no adapter_model.safetensors" in p.stderr, f"no adapter: {p.stderr}")
        p = tptt(["adapter", "resize", src, "--out", os.path.join(tmp, "bad3")])
        check(p.returncode == 2 and "--rank" in p.stderr, f"no --rank: {p.returncode} {p.stderr}")
        p = tptt(["adapter", "convert-pissa", src, "--initial", src2, "--out", os.path.join(tmp, "bad4")])
        check(p.returncode == 1 and "not its PiSSA initialisation" in p.stderr, f"mismatched init: {p.stderr}")
        p = tptt(["adapter", "resize", src, "--rank", 2, "--out", os.path.join(tmp, "bad5")], 2)
        check(p.returncode == 0, f"np2 rank 2: {p.stderr}")

        # a real checkpoint, given as its run directory, then corrupted
        model, data, run = os.path.join(tmp, "model"), os.path.join(tmp, "data.tok"), os.path.join(tmp, "run")
        tu.make_model(model)
        tu.make_data(data)
        conf = os.path.join(tmp, "c.yaml")
        tu.write_config(conf, model, data, run, schedule__total_steps=2, checkpoint__every=2)
        p = tu.train(conf, ranks=1)
        check(p.returncode == 0, f"tptt train (for a checkpoint): {p.stderr[-600:]}")
        if p.returncode == 0:
            ck = tu.latest(run)
            ct, _, ccfg = load(ck)
            out = os.path.join(tmp, "fromrun")
            p = tptt(["adapter", "resize", run, "--rank", 2, "--out", out], 2)
            check_resize("resize of a run directory", ct, ccfg, out, 2, p)
            with open(os.path.join(ck, "adapter_model.safetensors"), "r+b") as f:
                f.seek(-3, 2)
                f.write(b"\x01\x02\x03")
            p = tptt(["adapter", "resize", ck, "--rank", 2, "--out", os.path.join(tmp, "bad6")])
            check(p.returncode == 1 and "adapter_model.safetensors" in p.stderr, f"corrupted checkpoint: {p.stderr}")
        print("ok: bad input and a real checkpoint", flush=True)
    print("test_adapter:", "FAILED" if fails else "all passed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
