"""Validation during training (eval.path / eval.split / eval.every /
eval.max_rows) and schedule.epochs, under a real mpirun:

- val_loss / val_ppl in metrics.jsonl and the progress line, at every
  eval.every steps and after the last step; `tptt plot` draws them;
- validation loss on 1 rank equals 2 and 3 ranks (the tolerance of the
  training losses in test_train_mpi: 1e-5 relative);
- a run with eval.every stopped mid-way (TPTT_TEST_STOP_AT_STEP) and resumed
  ends with the same adapter bytes and the same validation losses as an
  uninterrupted one (evaluation changes no training state);
- eval.split: held-out documents never appear in training rows (every rank's
  rows logged through TPTT_TEST_ROWS_LOG; which documents are held out is
  recomputed here from the split hash of src/data/dataset.c), and every
  training document does;
- eval.path: a separate data file, text format tokenized like the data;
- schedule.epochs: total_steps = ceil(epochs * rows / batch.global), the
  start-up line, the >3-epoch warning, a changed epochs refused on resume,
  both keys set refused; metrics "tokens" vs "tokens_trained";
- the efficiency line and each step's gflops / gflops_share (issue 16)."""
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
import testkit  # noqa: E402
import train_util as tu  # noqa: E402

kit = testkit.Checker("test_train_eval")
check = kit.check
M64 = (1 << 64) - 1


def ok(p, what, code=0):
    check(p.returncode == code, f"{what}: exit {p.returncode}, want {code}\nstdout: {p.stdout[-1500:]}\nstderr: {p.stderr[-2500:]}")
    return p.returncode == code


def split_mix(z):
    z = ((z ^ (z >> 30)) * 0xbf58476d1ce4e5b9) & M64
    z = ((z ^ (z >> 27)) * 0x94d049bb133111eb) & M64
    return z ^ (z >> 31)


def heldout(seed, share, doc):
    """tp_dataset_doc_heldout (src/data/dataset.c)."""
    thr = M64 if share >= 1 else int(share * 18446744073709551616.0)
    return split_mix(seed ^ split_mix((doc + 0x5851f42d4c957f2d) & M64)) < thr


def records(run_dir):
    return [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]


def val_losses(run_dir):
    return {r["step"]: r["val_loss"] for r in records(run_dir) if "val_loss" in r}


def ckpt_bytes(run_dir):
    a, b = tu.adapter_bytes(run_dir)
    return a + b


def main():
    tmp = tempfile.mkdtemp(prefix="tptt-train-eval-")
    try:
        model, data = os.path.join(tmp, "model"), os.path.join(tmp, "data.tok")
        tu.make_model(model)
        tu.make_data(data, docs=80)

        def cfg(name, **over):
            path = os.path.join(tmp, name + ".yaml")
            tu.write_config(path, model, data, os.path.join(tmp, name), **over)
            return path, os.path.join(tmp, name)

        # --- eval.split on 1, 2, 3 ranks (global 6): same validation losses
        runs = {}
        for n in (1, 2, 3):
            c, r = cfg(f"split{n}", batch__global=6, batch__micro={1: 2, 2: 3, 3: 2}[n], eval__split=0.25,
                       eval__every=3, **{"schedule__total_steps": 7})
            p = tu.train(c, ranks=n)
            if ok(p, f"eval.split on {n} ranks"):
                runs[n] = val_losses(r)
                if n == 1:
                    check("val_loss" in p.stdout and "val_ppl" in p.stdout, f"progress line: {p.stdout[-400:]}")
                    check(re.search(r"data: \d+ documents \(\d+ more held out for validation, eval.split 0.25\)",
                                    p.stderr) is not None, f"start-up line: {p.stderr[:600]}")
                    check("validation:" in p.stderr, f"validation line: {p.stderr[:800]}")
                    recs = records(r)
                    vr = [x for x in recs if "val_loss" in x]
                    check([x["step"] for x in vr] == [3, 6, 7], f"evaluated at steps {[x['step'] for x in vr]}")
                    check(all(abs(x["val_ppl"] - math.exp(x["val_loss"])) < 1e-6 * x["val_ppl"] and x["val_tokens"] > 0
                              for x in vr), f"val_ppl = exp(val_loss): {vr[:1]}")
                    check(all(x["tokens"] == x["step"] * 6 * 32 and 0 < x["tokens_trained"] < x["tokens"] for x in recs),
                          f"tokens vs tokens_trained: {[(x['tokens'], x['tokens_trained']) for x in recs]}")
                    check(all(x.get("gflops", 0) > 0 and x.get("gflops_share", 0) > 0 and x.get("matmul_gflops", 0) > 0
                              for x in recs), f"efficiency fields: {recs[0]}")
                    check("GFLOP/s (" in p.stdout and "efficiency:" in p.stderr and "matmul rate" in p.stderr,
                          f"efficiency on the progress line: {p.stdout[-300:]}")
                    # the rate on the step's own products is a FLOP-weighted harmonic
                    # mean of per-product rates: above 0, not above the fastest one (4 shapes: q/o,
                    # k/v, down, and gate/up = the 64-token head [64 x 32] at the same rows)
                    m = re.search(r"raw matmul rate ([0-9.]+) GFLOP/s per rank on them \(.* on the step's (\d+) "
                                  r"weight shapes x 2 directions.*fastest product ([0-9.]+) GFLOP/s", p.stderr)
                    check(m is not None and 0 < float(m.group(1)) <= float(m.group(3)) * 1.0005 and
                          int(m.group(2)) == 4 and abs(recs[0]["matmul_gflops"] - float(m.group(1))) <= 0.05 + 1e-3 *
                          float(m.group(1)), f"efficiency line: {[l for l in p.stderr.splitlines() if 'efficiency' in l]}")
                    png = os.path.join(tmp, "val.png")
                    q = subprocess.run([tu.TPTT, "plot", os.path.join(r, "metrics.jsonl"), "-o", png], capture_output=True,
                                       text=True)
                    check(q.returncode == 0 and "3 validation points" in q.stdout and
                          open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n", f"plot: {q.stdout} {q.stderr}")
        if len(runs) == 3:
            for n in (2, 3):
                check(sorted(runs[n]) == sorted(runs[1]), f"eval steps 1 vs {n} ranks: {sorted(runs[1])} {sorted(runs[n])}")
                dl = max(abs(runs[1][s] - runs[n][s]) / abs(runs[1][s]) for s in runs[1] if s in runs[n])
                print(f"val_loss 1 vs {n} ranks: {dl:.2e}")
                check(dl < 1e-5, f"val_loss 1 vs {n} ranks differ by {dl:.2e} relative")

        # --- resume stays bit-identical with evaluation on (2 ranks, stop at 3, 5)
        over = dict(batch__global=4, batch__micro=1, eval__split=0.25, eval__every=2, eval__max_rows=5,
                    checkpoint__every=0, schedule__total_steps=8)
        cf, rf = cfg("full", **over)
        ok(tu.train(cf, ranks=2), "uninterrupted run with eval.every")
        cs, rs = cfg("stopped", **over)
        ok(tu.train(cs, ranks=2, env={"TPTT_TEST_STOP_AT_STEP": "3"}), "stopped at step 3", code=3)
        ok(tu.train(cs, ranks=2, env={"TPTT_TEST_STOP_AT_STEP": "5"}), "resumed, stopped at step 5", code=3)
        p = tu.train(cs, ranks=2)
        if ok(p, "resumed to the end"):
            check(ckpt_bytes(rf) == ckpt_bytes(rs), "adapter bytes: interrupted run with evaluation differs from the "
                                                    "uninterrupted one")
            vf, vs = val_losses(rf), val_losses(rs)
            check(vf == vs and sorted(vf) == [2, 4, 6, 8], f"validation losses: {vf} vs {vs}")
            lf = tu.losses(rf)
            ls = tu.losses(rs)
            check(lf == ls, f"training losses differ: {lf} vs {ls}")
            tt = [x["tokens_trained"] for x in records(rs)]
            ttf = [x["tokens_trained"] for x in records(rf)]
            check(tt == ttf, f"tokens_trained across resumes: {tt} vs {ttf}")
        # evaluating changes nothing: the same run without evaluation ends with the same bytes
        # (same training rows, evaluated only after the last step)
        cn, rn = cfg("noeval", **{k: v for k, v in over.items() if k != "eval__every"})
        if ok(tu.train(cn, ranks=2), "run evaluated only at the end"):
            check(ckpt_bytes(rf) == ckpt_bytes(rn), "adapter bytes: evaluating every 2 steps changed training")
            vn = val_losses(rn)
            check(sorted(vn) == [8] and vn[8] == val_losses(rf).get(8), f"final validation loss: {vn} vs {val_losses(rf)}")

        # --- held-out documents never appear in training rows
        hdata = os.path.join(tmp, "docs.tok")
        rnd = random.Random(7)
        jl = hdata + ".jsonl"
        ndocs = 60
        with open(jl, "w") as f:
            for i in range(ndocs):  # document i is token i+1 repeated: a row's tokens name its documents
                f.write(json.dumps({"ids": [i + 1] * rnd.randint(3, 20)}) + "\n")
        subprocess.run([tu.TPTT, "make-shard", "--jsonl", "-o", hdata, jl], check=True, capture_output=True)
        held = {i + 1 for i in range(ndocs) if heldout(5, 0.3, i)}
        check(0 < len(held) < ndocs, f"held-out documents: {len(held)}")
        ch = os.path.join(tmp, "held.yaml")
        rh = os.path.join(tmp, "held")
        tu.write_config(ch, model, hdata, rh, batch__global=4, batch__micro=1, eval__split=0.3, eval__every=5,
                        schedule__total_steps=30, checkpoint__every=0)
        log = os.path.join(tmp, "rows.log")
        p = tu.train(ch, ranks=2, env={"TPTT_TEST_ROWS_LOG": log})
        if ok(p, "held-out run"):
            seen = set()
            for rk in (0, 1):
                for line in open(f"{log}.{rk}"):
                    seen.update(int(t) for t in line.split()[2:])
            check(not (seen & held), f"held-out documents trained on: {sorted(seen & held)}")
            train_docs = set(range(1, ndocs + 1)) - held
            check(seen == train_docs, f"training documents not seen: {sorted(train_docs - seen)}")
            m = re.search(r"data: (\d+) documents \((\d+) more held out", p.stderr)
            check(m is not None and int(m.group(1)) == ndocs - len(held) and int(m.group(2)) == len(held),
                  f"documents line: {p.stderr[:400]}")

        # --- eval.path: a separate data file (tokens), 1 vs 2 ranks
        edata = os.path.join(tmp, "eval.tok")
        tu.make_data(edata, docs=20, seed=11)
        pv = {}
        for n in (1, 2):
            c, r = cfg(f"path{n}", batch__global=4, batch__micro=2 // n if n < 2 else 1, eval__path=edata,
                       eval__every=4)
            if ok(tu.train(c, ranks=n), f"eval.path on {n} ranks"):
                pv[n] = val_losses(r)
        if len(pv) == 2:
            check(sorted(pv[1]) == [4, 8], f"eval.path steps: {sorted(pv[1])}")
            dl = max(abs(pv[1][s] - pv[2][s]) / abs(pv[1][s]) for s in pv[1])
            check(dl < 1e-5, f"eval.path val_loss 1 vs 2 ranks differ by {dl:.2e}")

        # --- schedule.epochs
        c, r = cfg("epochs", batch__global=4, schedule__total_steps=None)
        txt = open(c).read().replace("  total_steps: None\n", "  epochs: 1.5\n")
        open(c, "w").write(txt)
        p = tu.train(c, ranks=1)
        if ok(p, "schedule.epochs"):
            m = re.search(r"(\d+) rows of 32 tokens, (\d+) trained \(labelled\) tokens per epoch; ([\d.]+) steps per "
                          r"epoch at batch.global 4; this run: (\d+) steps = ([\d.]+) epochs", p.stderr)
            if check(m is not None, f"start-up line: {p.stderr[:600]}"):
                rows, steps = int(m.group(1)), int(m.group(4))
                check(steps == math.ceil(1.5 * rows / 4), f"epochs 1.5 over {rows} rows: {steps} steps")
                check(sorted(tu.losses(r)) == list(range(1, steps + 1)), f"steps run: {sorted(tu.losses(r))}")
                st = json.load(open(os.path.join(tu.latest(r), "trainer_state.json")))
                check(st["resume_config"].get("schedule", {}).get("epochs") == 1.5, f"resume_config: {st['resume_config']}")
                check(0 < st["tokens_trained"] <= st["tokens_seen"], f"state tokens: {st['tokens_trained']} {st['tokens_seen']}")
            check("warning: the run repeats" not in p.stderr, "no repeat warning at 1.5 epochs")
            # a changed epochs is refused on resume (it decides total_steps)
            p = tu.train(c, ranks=1, extra=["--set", "schedule.epochs=3"])
            check(p.returncode != 0 and "epochs" in p.stderr and "cannot resume" in p.stderr,
                  f"changed epochs on resume: {p.returncode} {p.stderr[-400:]}")
        both = os.path.join(tmp, "both.yaml")
        open(both, "w").write(txt.replace("  epochs: 1.5\n", "  epochs: 1.5\n  total_steps: 4\n"))
        p = tu.train(both, ranks=1)
        check(p.returncode == 2 and "not both" in p.stderr, f"both epochs and total_steps: {p.returncode} {p.stderr[-300:]}")
        c, r = cfg("many", batch__global=4, schedule__total_steps=60, checkpoint__every=0)
        p = tu.train(c, ranks=1)
        if ok(p, "many epochs"):
            check("warning: the run repeats the training data" in p.stderr, f"repeat warning: {p.stderr[:800]}")
        # bad eval settings
        c, r = cfg("bothev", eval__split=0.2, eval__path=edata)
        p = tu.train(c, ranks=1)
        check(p.returncode == 2 and "eval.split" in p.stderr and "not both" in p.stderr, f"eval.path + split: {p.stderr[-300:]}")
        c, r = cfg("noev", eval__every=3)
        p = tu.train(c, ranks=1)
        check(p.returncode == 2 and "nothing to evaluate" in p.stderr, f"eval.every alone: {p.stderr[-300:]}")
        c, r = cfg("tiny", eval__split=0.001)
        p = tu.train(c, ranks=1)
        check(p.returncode == 1 and "eval.split" in p.stderr and "no documents" in p.stderr, f"empty held-out side: {p.stderr[-300:]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
