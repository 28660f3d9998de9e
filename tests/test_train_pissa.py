"""PiSSA in training (lora.init: pissa / pissa_niter_K, issue 15 item 1):

- at the start (lr 0, so the checkpoint holds the initial adapter) the PiSSA
  model (residual base run.dir/pissa-base + adapter) gives the original
  base's loss (`tptt eval perplexity`, 1e-6 relative: the same logits to fp32
  rounding), with LiZA off so that the Titan is base + LoRA;
- the residual identity W_res + s·B·A = W for every target module (numpy,
  fp32 tolerance), B·A non-zero, the singular values of s·B·A equal numpy's
  top-r singular values of W (exact SVD; randomized with K = 4 close);
- pissa-base is a HF model dir (config.json + model.safetensors, F32);
  adapter_config.json / config.json name it as the base;
- 2 ranks give the same initial adapter as 1 (collective SVDs);
- resume: stopped at step 3 and resumed = uninterrupted (adapter bytes), the
  residual base reused without SVDs; a changed pissa-base is refused;
- lora.init: pissa with trainable: projections is refused."""
import json
import os
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


def load_all(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            t, _ = stnp.load(os.path.join(d, f))
            out.update(t)
    return out


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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
