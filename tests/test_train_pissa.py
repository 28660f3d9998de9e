"""PiSSA in training (lora.init: pissa / pissa_niter_K, issue 15 item 1):

- at the start (lr 0, so the checkpoint holds the initial adapter) the PiSSA
  model (residual base run.dir/pissa-base + adapter) gives the original
  base's loss (`tptt eval perplexity`, 1e-6 relative: the same logits to fp32
  rounding), with LiZA off so that the Titan is base + LoRA;
- the residual identity W_res + s·B·A = W for every target module (numpy,
  fp32 tolerance), B·A non-zero, the singular values of s·B·A equal numpy's
  top-r singular values of W (exact SVD; randomized with K = 4 close);
- pissa-base is a HF model dir (config.json + model.safetensors, in the base's dtype: F32 here, BF16
  for a BF16 base, where the identity then holds to BF16 rounding);
  adapter_config.json / config.json name it as the base;
- 2 ranks give the same initial adapter as 1 (collective SVDs);
- resume: stopped at step 3 and resumed = uninterrupted (adapter bytes), the
  residual base reused without SVDs; a changed pissa-base is refused;
- lora.init: pissa with trainable: projections is refused;
- step 0, every arch (llama, mistral with a sliding window, qwen2 with qkv
  biases): `tptt generate --logits-out` of the PiSSA checkpoint (lr 0) equals
  the original base's logits (LiZA off: the Titan is base + LoRA), and with
  LiZA on equals the same Titan trained with the default init (B = 0); the
  residual base alone does not (the adapter carries the principal part);
- convert-pissa: the original base + the converted rank-2r adapter (merged by
  numpy) gives the logits of the residual base + the trained PiSSA adapter;
- a full disk while rank 0 writes pissa-base (RLIMIT_FSIZE with SIGXFSZ
  ignored, so the write fails with EFBIG as on a full disk): one clear error
  line naming pissa-base and the file, exit 1, no pissa-base or temporary
  directory left (also one planted by a run killed mid-write), no checkpoint;
  the same command with space then succeeds."""
import concurrent.futures
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
import safetensors_np as stnp  # noqa: E402
import testkit  # noqa: E402
import train_util as tu  # noqa: E402

kit = testkit.Checker("test_train_pissa")
check = kit.check
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def ok(p, what, code=0):
    check(p.returncode == code, f"{what}: exit {p.returncode}, want {code}\nstdout: {p.stdout[-800:]}\nstderr: {p.stderr[-2000:]}")
    return p.returncode == code


def ppl_loss(args, data):
    p = subprocess.run([tu.TPTT, "eval", "perplexity"] + args + ["--data", data, "--seq-len", "32", "--matmul", "f32"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    check(p.returncode == 0, f"eval {args}", p.stderr[-800:])
    return json.loads(p.stdout.strip().splitlines()[-1])["loss"] if p.returncode == 0 else float("nan")


PROMPT = "5,9,13,17,21,25,29,33,37,41,45,49"


def gen_logits(args, tag):
    """Greedy ids and --logits-out logits [16, V] (fp64) of one prompt."""
    out = os.path.join(tempfile.gettempdir(), f"tptt-pissa-{os.getpid()}-{tag}.safetensors")
    p = subprocess.run([tu.TPTT, "generate"] + args + ["--prompt-ids", PROMPT, "--max-new-tokens", "16", "--ignore-eos",
                                                       "--logits-out", out, "--matmul", "f32"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    check(p.returncode == 0, f"generate {tag}: {p.stderr[-800:]}")
    if p.returncode:
        return None, None
    t, _ = stnp.load(out)
    os.unlink(out)
    return json.loads(p.stdout.strip().splitlines()[-1])["ids"], t["logits.0"].astype(np.float64)


def logits_err(a, b):
    return float(np.abs(a[1] - b[1]).max() / np.abs(b[1]).max())


def same_logits(a, b, tag, tol=1e-5):
    if a[0] is None or b[0] is None:
        return
    check(a[0] == b[0], f"{tag}: greedy ids {a[0]} vs {b[0]}")
    e = logits_err(a, b)
    print(f"{tag}: max |dlogits| / max |logits| = {e:.2e}")
    check(e < tol, f"{tag}: logits differ by {e:.2e} relative (tolerance {tol:g})")


def differ(a, b, tag, least=1e-3):
    """Non-vacuity: two models that must NOT give the same logits."""
    if a[0] is not None and b[0] is not None:
        e = logits_err(a, b)
        print(f"{tag}: differ by {e:.2e} (must be > {least:g})")
        check(e > least, f"{tag}: logits should differ, {e:.2e}")


def load_all(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            t, _ = stnp.load(os.path.join(d, f))
            out.update(t)
    return out


def step0(tmp, data, arch, extra):
    """Step 0 (lr 0): the PiSSA model's logits = the base's (LiZA off) and =
    the default-init Titan's (LiZA on)."""
    m = os.path.join(tmp, "model-" + arch)
    tu.make_model(m, arch, extra=extra)
    lr0 = dict(optimizer__lr=0.0, schedule__warmup_steps=0, schedule__total_steps=1, checkpoint__every=0)
    runs = {}
    for name, over in (("p0", dict(lora__init="pissa", liza__enabled=False)), ("p1", dict(lora__init="pissa")),
                       ("d1", dict())):
        path, rdir = os.path.join(tmp, f"{arch}-{name}.yaml"), os.path.join(tmp, f"{arch}-{name}")
        tu.write_config(path, m, data, rdir, **dict(lr0, **over))
        if ok(tu.train(path, ranks=1), f"{arch} {name} (lr 0)"):
            runs[name] = gen_logits(["--checkpoint", rdir], f"{arch}-{name}")
    base = gen_logits(["--model", m], arch + "-base")
    if len(runs) == 3:
        same_logits(runs["p0"], base, f"{arch}: PiSSA (residual base + adapter, LiZA off) vs the base")
        same_logits(runs["p1"], runs["d1"], f"{arch}: PiSSA Titan vs default-init Titan (LiZA on)")
        differ(gen_logits(["--model", os.path.join(tmp, f"{arch}-p0", "pissa-base")], arch + "-res"), base,
               f"{arch}: the residual base alone vs the base")
        differ(runs["d1"], base, f"{arch}: the Titan (LiZA on) vs the base")


def convert_pissa(tmp, model, data, init_ck, r):
    """Original base + converted rank-2r adapter = residual base + trained
    PiSSA adapter (LiZA off: convert-pissa moves the LoRA part only). The
    initial adapter is the one the trainer keeps in run.dir/pissa-init,
    checked equal to the lr-0 run's (the same seed and SVDs)."""
    ct, rt = os.path.join(tmp, "trained.yaml"), os.path.join(tmp, "trained")
    tu.write_config(ct, model, data, rt, lora__init="pissa", liza__enabled=False, schedule__total_steps=4,
                    checkpoint__every=0)
    if not ok(tu.train(ct, ranks=1), "PiSSA training (LiZA off, 4 steps)") or not init_ck:
        return
    # the trainer kept the initial adapter as run.dir/pissa-init: the lr-0 run's, bit for bit
    pi = os.path.join(rt, "pissa-init")
    i0, _ = stnp.load(os.path.join(init_ck, "adapter_model.safetensors"))
    if check(os.path.isfile(os.path.join(pi, "adapter_model.safetensors")), "pissa-init written by the trainer"):
        ip, _ = stnp.load(os.path.join(pi, "adapter_model.safetensors"))
        check(sorted(ip) == sorted(i0) and all(np.array_equal(ip[k], i0[k]) for k in i0),
              "pissa-init holds the initial adapter (the lr-0 run's)")
    conv = os.path.join(tmp, "conv")
    # no --initial: convert-pissa finds pissa-init beside the adapter's base (run.dir/pissa-base)
    p = subprocess.run([tu.TPTT, "adapter", "convert-pissa", rt, "--out", conv], capture_output=True, text=True)
    if not ok(p, "convert-pissa of the trained run"):
        return
    check("initial adapter " + pi in p.stderr or "initial adapter " + os.path.realpath(pi) in p.stderr,
          f"convert-pissa names the initial adapter it found: {p.stderr[-300:]}")
    cc = json.load(open(os.path.join(conv, "adapter_config.json")))
    check(cc["r"] == 2 * r, f"converted rank {cc['r']}")
    s2 = cc["lora_alpha"] / cc["r"]
    ad, _ = stnp.load(os.path.join(conv, "adapter_model.safetensors"))
    W = load_all(model)
    n = 0
    for k in list(W):
        a = ad.get("base_model.model." + k[:-len(".weight")] + ".lora_A.weight")
        if a is not None:
            b = ad["base_model.model." + k[:-len(".weight")] + ".lora_B.weight"]
            W[k] = (W[k].astype(np.float64) + s2 * b.astype(np.float64) @ a.astype(np.float64)).astype(np.float32)
            n += 1
    check(n == 8, f"converted adapter modules merged: {n}")
    merged = os.path.join(tmp, "base+converted")
    shutil.copytree(model, merged)
    for f in os.listdir(merged):
        if f.endswith(".safetensors"):
            os.unlink(os.path.join(merged, f))
    stnp.save(os.path.join(merged, "model.safetensors"), {k: ("F32", v) for k, v in W.items()}, {"format": "pt"})
    tr = gen_logits(["--checkpoint", rt], "trained")
    same_logits(gen_logits(["--model", merged], "merged"), tr,
                "convert-pissa: base + converted adapter vs residual base + trained adapter")
    differ(tr, gen_logits(["--model", model], "base"), "the trained PiSSA model vs the base")


# run under mpirun as the rank program: SIGXFSZ ignored and a file size limit,
# so a write past it fails with EFBIG (what a full disk does with ENOSPC);
# exec keeps both (mpirun itself resets signal dispositions of its children)
FSIZE_WRAP = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); os.execv(sys.argv[2], sys.argv[2:])")


def disk_full(tmp, model, data):
    path, rd = os.path.join(tmp, "diskfull.yaml"), os.path.join(tmp, "diskfull")
    tu.write_config(path, model, data, rd, lora__init="pissa", schedule__total_steps=2, checkpoint__every=0)
    # an earlier run killed while writing the residual base left this behind
    stale = os.path.join(rd, "pissa-base.tmp-export-99999")
    os.makedirs(stale)
    with open(os.path.join(stale, "model.safetensors.tmp.99999"), "wb") as f:
        f.write(b"\0" * 1000)
    # the residual base (F32, the size of this F32 base) cannot be written;
    # everything written before it (LOCK, checkpoints/) is far smaller
    limit = os.path.getsize(os.path.join(model, "model.safetensors")) // 3
    env = dict(os.environ, **tu.MPI_ENV)
    # PMIx's shared-memory store and the vader BTL create large files of their own
    env.update(PMIX_MCA_gds="hash", OMPI_MCA_btl="self,tcp")
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", "2", sys.executable, "-c", FSIZE_WRAP, str(limit),
           tu.TPTT, "train", path]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if "residual base" in ln and "tptt:" in ln and "PiSSA:" not in ln]
    pb = os.path.join(rd, "pissa-base")
    check(p.returncode == 1, f"full disk: exit {p.returncode}, want 1: {p.stderr[-1500:]}")
    check(len(lines) == 1, f"full disk: one error line, got {lines}")
    if lines:
        ln = lines[0]
        print("full disk:", ln)
        check(ln.startswith("tptt: lora.init: pissa: not enough disk space for the residual base " + pb)
              and re.search(r"\(it needs [0-9.]+ kB, F32\)", ln) and os.strerror(errno.EFBIG) in ln
              and "pissa-base.tmp-export-" in ln and "model.safetensors" in ln,
              f"full disk: message {ln}")
    left = sorted(os.listdir(rd))
    # pissa-init (the small initial adapter, written first and atomically) may stay, complete
    check(left in (["checkpoints"], ["checkpoints", "pissa-init"]) and os.listdir(os.path.join(rd, "checkpoints")) == []
          and ("pissa-init" not in left or sorted(os.listdir(os.path.join(rd, "pissa-init")))
               == ["adapter_config.json", "adapter_model.safetensors"]),
          f"full disk: left in run.dir {left} (pissa-base, temporary directories, LOCK or a checkpoint)")
    # the same command with space: writes the residual base and trains
    p = tu.train(path, ranks=2)
    if ok(p, "the run after the full disk"):
        check("wrote the residual base" in p.stderr and "reusing" not in p.stderr, f"after the full disk: {p.stderr[:600]}")
        check(sorted(os.listdir(pb)) == ["config.json", "model.safetensors"], f"pissa-base: {os.listdir(pb)}")
        check(os.path.exists(os.path.join(rd, "checkpoints", "LATEST")), "after the full disk: no checkpoint")


def main():
    tmp = tempfile.mkdtemp(prefix="tptt-pissa-")
    try:
        model, data = os.path.join(tmp, "model"), os.path.join(tmp, "data.tok")
        tu.make_model(model)
        tu.make_data(data)

        def cfg(name, **over):
            path, rd = os.path.join(tmp, name + ".yaml"), os.path.join(tmp, name)
            tu.write_config(path, model, data, rd, **over)
            return path, rd

        r, alpha = 4, 8
        init0 = dict(lora__init="pissa", liza__enabled=False, optimizer__lr=0.0, schedule__warmup_steps=0,
                     schedule__total_steps=1, checkpoint__every=0)
        c, rd = cfg("init", **init0)
        p = tu.train(c, ranks=1)
        if ok(p, "PiSSA run (lr 0)"):
            check("PiSSA: 8 LoRA modules initialised" in p.stderr and "wrote the residual base" in p.stderr,
                  f"PiSSA notes: {p.stderr[:600]}")
            pb = os.path.join(rd, "pissa-base")
            check(sorted(os.listdir(pb)) == ["config.json", "model.safetensors"], f"pissa-base: {os.listdir(pb)}")
            lb, lp = ppl_loss(["--model", model], data), ppl_loss(["--checkpoint", rd], data)
            d = abs(lb - lp) / abs(lb)
            print(f"loss base {lb:.9f} vs PiSSA residual + adapter {lp:.9f}: {d:.2e}")
            check(d < 1e-6, f"PiSSA model's loss {lp} vs base {lb}: {d:.2e} relative")
            ck = tu.latest(rd)
            ac = json.load(open(os.path.join(ck, "adapter_config.json")))
            cf = json.load(open(os.path.join(ck, "config.json")))
            check(ac["base_model_name_or_path"] == os.path.realpath(pb) and cf["base_model_path"] == os.path.realpath(pb),
                  f"the adapter's base is pissa-base: {ac['base_model_name_or_path']} {cf.get('base_model_path')}")
            st = json.load(open(os.path.join(ck, "trainer_state.json")))
            check(str(st.get("pissa_base_digest", "")).startswith("xxh3:"), f"pissa_base_digest: {st.get('pissa_base_digest')}")
            check(st["resume_config"]["lora"].get("init") == "pissa", f"resume_config lora: {st['resume_config']['lora']}")
            W, R, A = load_all(model), load_all(pb), tu.adapter_tensors(rd)
            s = alpha / r
            worst = 0.0
            for l in range(2):
                for m in TARGETS:
                    key = f"model.layers.{l}.self_attn.{m}.weight"
                    a = A[f"base_model.model.model.layers.{l}.self_attn.{m}.lora_A.weight"].astype(np.float64)
                    b = A[f"base_model.model.model.layers.{l}.self_attn.{m}.lora_B.weight"].astype(np.float64)
                    w = W[key].astype(np.float64)
                    check(R[key].dtype == np.float32, f"{key}: residual stored F32")
                    err = np.abs(R[key].astype(np.float64) + s * b @ a - w).max() / np.abs(w).max()
                    worst = max(worst, err)
                    sv = np.linalg.svd(w, compute_uv=False)[:r]
                    svba = np.linalg.svd(s * b @ a, compute_uv=False)[:r]
                    check(np.allclose(svba, sv, rtol=1e-5, atol=1e-6), f"{key}: singular values {svba} vs {sv}")
            print(f"residual identity: max |W_res + s·B·A - W| / max|W| = {worst:.2e}")
            check(worst < 1e-6, f"residual identity {worst:.2e}")
            # 2 ranks: the same initial adapter (collective SVDs on a 2x1 grid)
            c2, rd2 = cfg("init2", **init0)
            if ok(tu.train(c2, ranks=2), "PiSSA on 2 ranks"):
                A2 = tu.adapter_tensors(rd2)
                da = max(float(np.abs(A[k] - A2[k]).max() / max(np.abs(A[k]).max(), 1e-30)) for k in A)
                check(da < 1e-5, f"1 vs 2 ranks initial adapter: {da:.2e}")
        # a BF16 base: the residual base is written in BF16 (the base's dtype, as PEFT keeps it), so the
        # identity holds to BF16 rounding of W - s·B·A, not exactly
        mb = os.path.join(tmp, "model-bf16")
        tu.make_model(mb, extra=["--dtype", "bf16"])
        cb, rdb = os.path.join(tmp, "bf16.yaml"), os.path.join(tmp, "bf16")
        tu.write_config(cb, mb, data, rdb, **init0)
        p = tu.train(cb, ranks=1)
        if ok(p, "PiSSA on a BF16 base") and check("(BF16)" in p.stderr, f"BF16 residual base: {p.stderr[-400:]}"):
            hdr = json.loads(open(os.path.join(rdb, "pissa-base", "model.safetensors"), "rb").read()[8:][:int.from_bytes(
                open(os.path.join(rdb, "pissa-base", "model.safetensors"), "rb").read(8), "little")])
            key = "model.layers.0.self_attn.q_proj.weight"
            check(hdr[key]["dtype"] == "BF16", f"residual stored {hdr[key]['dtype']}, want BF16")
            W, R, A = load_all(mb), load_all(os.path.join(rdb, "pissa-base")), tu.adapter_tensors(rdb)
            a = A["base_model.model." + key.replace(".weight", ".lora_A.weight")].astype(np.float64)
            b = A["base_model.model." + key.replace(".weight", ".lora_B.weight")].astype(np.float64)
            w, res = W[key].astype(np.float64), R[key].astype(np.float64)
            exact = w - (alpha / r) * b @ a
            e = np.abs(res - exact).max() / np.abs(exact).max()
            check(0 < e <= 2.0 ** -8, f"BF16 residual: |W_res - (W - s·B·A)| = {e:.2e} of max, want BF16 rounding")
        # randomized variant
        c, rd = cfg("niter", **dict(init0, lora__init="pissa_niter_4"))
        if ok(tu.train(c, ranks=1), "pissa_niter_4"):
            check(abs(ppl_loss(["--checkpoint", rd], data) - ppl_loss(["--model", model], data)) < 1e-5,
                  "pissa_niter_4: the loss of the base")
        # resume bit-identical with PiSSA and LiZA on
        over = dict(lora__init="pissa", batch__global=4, batch__micro=2, schedule__total_steps=6, checkpoint__every=0)
        cf_, rf = cfg("full", **over)
        ok(tu.train(cf_, ranks=2), "uninterrupted PiSSA run")
        cs, rs = cfg("stop", **over)
        ok(tu.train(cs, ranks=2, env={"TPTT_TEST_STOP_AT_STEP": "3"}), "PiSSA run stopped at 3", code=3)
        p = tu.train(cs, ranks=2)
        if ok(p, "PiSSA run resumed"):
            check("reusing the residual base" in p.stderr and "initialised" not in p.stderr,
                  f"resume reuses pissa-base without SVDs: {p.stderr[:600]}")
            check(tu.adapter_bytes(rf) == tu.adapter_bytes(rs), "PiSSA resume: adapter bytes differ")
            check(tu.losses(rf) == tu.losses(rs), "PiSSA resume: losses differ")
        # a changed residual base is refused
        with open(os.path.join(rs, "pissa-base", "config.json"), "a") as f:
            f.write(" ")
        p = tu.train(cs, ranks=1, extra=["--set", "schedule.total_steps=8"])
        check(p.returncode != 0 and "pissa_base_digest" in p.stderr, f"changed pissa-base: {p.returncode} {p.stderr[-400:]}")
        # bad settings
        c, rd = cfg("proj", lora__init="pissa")
        text = open(c).read().replace("trainable: lora\n", "trainable: projections\n")
        open(c, "w").write(text)
        p = tu.train(c, ranks=1)
        check(p.returncode == 2 and "pissa needs trainable: lora" in p.stderr, f"pissa + projections: {p.stderr[-300:]}")
        c, rd = cfg("badk", lora__init="pissa_niter_x")
        p = tu.train(c, ranks=1)
        check(p.returncode == 2 and "pissa_niter_K with K an integer in [0, 64]" in p.stderr, f"bad K: {p.stderr[-300:]}")
        # the rest runs as independent jobs side by side: each is mostly MPI
        # start-up latency, not CPU
        init_ck = tu.latest(os.path.join(tmp, "init")) if os.path.isdir(os.path.join(tmp, "init", "checkpoints")) else None
        jobs = [lambda a=a, x=x: step0(tmp, data, a, x) for a, x in
                (("llama", ()), ("mistral", ("--sliding-window", "16")), ("qwen2", ()))]
        jobs += [lambda: convert_pissa(tmp, model, data, init_ck, r), lambda: disk_full(tmp, model, data)]
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            for f in [ex.submit(j) for j in jobs]:
                f.result()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
