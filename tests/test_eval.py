#!/usr/bin/env python3
"""test_eval - `tptt eval perplexity` (and `eval mmlu` where present).

* Perplexity of a plain model on packed rows equals exp of `tptt dump`'s loss
  on the same rows (built here independently from the documents), and with
  --stride the Hugging Face sliding-window rule (each token predicted once,
  in the first window that gives it context) computed here.
* Perplexity of a LiZA checkpoint equals the PyTorch oracle's on the same rows.
* 2 ranks give what 1 rank gives; text data is tokenized like training data.
* Bad input: one clear error, never a crash.
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

import oracle  # noqa: E402
import safetensors_np as stnp  # noqa: E402
import testkit  # noqa: E402
import train_util as tu  # noqa: E402

TPTT = os.environ.get("TPTT", "tptt")
kit = testkit.Checker("test_eval")
check = kit.check
work = tempfile.mkdtemp(prefix="tptt_test_eval_")
ENV = dict(os.environ)
ENV.update(tu.MPI_ENV)
ENV["TMPDIR"] = work


def run(args, what, mpi=0, timeout=300):
    cmd = [TPTT] + [str(a) for a in args]
    if mpi:
        cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(mpi)] + cmd
    return kit.run(cmd, env=ENV, timeout=timeout, text=True, what=what)


def report(p):
    lines = [x for x in p.stdout.splitlines() if x.strip()]
    return json.loads(lines[-1]) if lines else {}


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


# documents (ids), a shard of them, packed rows built here
V = 256
docs = []
rnd = np.random.RandomState(4)
for i in range(9):
    n = int(rnd.randint(3, 40))
    docs.append([int(x) for x in rnd.randint(0, V, size=n)])
jl = os.path.join(work, "docs.jsonl")
with open(jl, "w") as f:
    for d in docs:
        f.write(json.dumps({"ids": d}) + "\n")
shard = os.path.join(work, "docs.tok")
subprocess.run([TPTT, "make-shard", "--jsonl", "-o", shard, jl], check=True, capture_output=True)


def packed_rows(docs, T):
    flat, starts = [], []
    for d in docs:
        starts.append(len(flat))
        flat += d
    rows = []
    for r0 in range(0, len(flat), T):
        ids = flat[r0:r0 + T]
        ds = sorted({0} | {s - r0 for s in starts if r0 < s < r0 + len(ids)})
        # a document continuing from the previous row starts this row
        ends = {s - r0 for s in starts} | {len(flat) - r0}
        labels = [ids[j + 1] if j + 1 < len(ids) and (j + 1) not in ends else -100 for j in range(len(ids))]
        pad = T - len(ids)
        if pad:
            ds.append(len(ids))
            ids = ids + [0] * pad
            labels = labels + [-100] * pad
        rows.append((ids, labels, ds))
    return rows


def window_rows(docs, T, S):
    rows = []
    for d in docs:
        n, prev_end, begin = len(d), 1, 0
        while n >= 2:
            end = min(begin + T, n)
            ids = d[begin:end]
            labels = [d[begin + j + 1] if begin + j + 1 < end and begin + j + 1 >= prev_end else -100
                      for j in range(len(ids))]
            ds = [0]
            if len(ids) < T:
                ds.append(len(ids))
                labels += [-100] * (T - len(ids))
                ids = ids + [0] * (T - len(ids))
            rows.append((ids, labels, ds))
            prev_end = end
            if end == n:
                break
            begin += S
    return rows


def dump_loss(model, rows, what):
    b = os.path.join(work, "batch.json")
    with open(b, "w") as f:
        json.dump({"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows],
                   "doc_starts": [r[2] for r in rows]}, f)
    out = os.path.join(work, "dump.safetensors")
    p = run(["dump", "--model", model, "--batch", b, "--out", out, "--set", "compute.matmul=f32"], what)
    kit.succeeds(p, what)
    t, _ = stnp.load(out)
    return float(t["loss"]), sum(1 for r in rows for x in r[1] if x != -100)


llama = os.path.join(work, "llama")
subprocess.run([TPTT, "init-model", "--arch", "llama", "--layers", "2", "--hidden", "32", "--heads", "4",
                "--kv-heads", "2", "--ffn", "64", "--vocab", str(V), "--byte-tokenizer", "--dtype", "f32",
                "--init-std", "0.3", "--seed", "5", "--force", llama], check=True, capture_output=True)

# ---- packed rows vs dump
T = 16
p = run(["eval", "perplexity", "--model", llama, "--data", shard, "--seq-len", T, "--micro-batch", 3,
         "--matmul", "f32", "--report", os.path.join(work, "r.json")], "ppl packed")
if kit.succeeds(p, "perplexity on packed rows"):
    r = report(p)
    loss, cnt = dump_loss(llama, packed_rows(docs, T), "dump packed rows")
    kit.eq(r["tokens"], cnt, "labelled tokens")
    check(rel(r["loss"], loss) < 1e-5, "loss equals dump's", (r["loss"], loss))
    check(rel(r["ppl"], math.exp(loss)) < 1e-5, "ppl = exp(dump loss)", (r["ppl"], math.exp(loss)))
    kit.eq(r["documents"], len(docs), "documents")
    with open(os.path.join(work, "r.json")) as f:
        kit.eq(json.load(f), r, "--report holds the stdout report")
    check("perplexity" in p.stderr and "loss" in p.stderr, "summary on stderr", p.stderr)
    two = run(["eval", "perplexity", "--model", llama, "--data", shard, "--seq-len", T, "--matmul", "f32"],
              "ppl 2 ranks", mpi=2)
    if kit.succeeds(two, "perplexity on 2 ranks"):
        r2 = report(two)
        check(rel(r2["loss"], r["loss"]) < 1e-6 and r2["tokens"] == r["tokens"], "2 ranks = 1 rank",
              (r2["loss"], r["loss"]))

# ---- sliding windows vs dump
for S in (5, 16):
    p = run(["eval", "perplexity", "--model", llama, "--data", shard, "--seq-len", T, "--stride", S,
             "--matmul", "f32"], "ppl stride %d" % S)
    if kit.succeeds(p, "perplexity with stride %d" % S):
        r = report(p)
        rows = window_rows(docs, T, S)
        loss, cnt = dump_loss(llama, rows, "dump windows")
        kit.eq((r["tokens"], r["rows"]), (cnt, len(rows)), "stride %d: tokens and windows" % S)
        check(rel(r["loss"], loss) < 1e-5, "stride %d: loss equals dump's" % S, (r["loss"], loss))
        if S == 5:
            kit.eq(cnt, sum(len(d) - 1 for d in docs), "every token but each document's first scored once")

# ---- a LiZA checkpoint vs the oracle
data = os.path.join(work, "train.tok")
tu.make_data(data, vocab=V, docs=30)
cfgp = os.path.join(work, "run.yaml")
run_dir = os.path.join(work, "run")
tu.write_config(cfgp, llama, data, run_dir, lora__dropout=0.0, optimizer__lr=3e-2, schedule__total_steps=4,
                checkpoint__every=4, liza__preset="gated_delta_product", liza__chunk_size=4,
                mag__mode="learnable", mag__learnable_shape="vector")
kit.succeeds(tu.train(cfgp, ranks=0), "train a LiZA checkpoint")
p = run(["eval", "perplexity", "--checkpoint", run_dir, "--data", shard, "--seq-len", T, "--matmul", "f32"],
        "ppl checkpoint")
if kit.succeeds(p, "perplexity of a checkpoint"):
    r = report(p)
    ck = tu.latest(run_dir)
    rows = packed_rows(docs, T)
    tensors, _ = stnp.load(os.path.join(ck, "adapter_model.safetensors"))
    extra, _ = stnp.load(os.path.join(ck, "liza_model.safetensors"))
    tensors.update(extra)
    out = {"logits": ("F32", np.zeros((1, 1, 1), np.float32)), "loss": ("F32", np.zeros((), np.float32))}
    for k, v in tensors.items():
        out[k] = ("F32", v.astype(np.float32))
        out[k + ".grad"] = ("F32", np.zeros_like(v, dtype=np.float32))
    fake = os.path.join(work, "fake.safetensors")
    with open(os.path.join(ck, "config.json")) as f:
        conf = f.read()
    stnp.save(fake, out, {"format": "pt", "config": conf,
                          "batch": json.dumps({"input_ids": [x[0] for x in rows], "labels": [x[1] for x in rows],
                                               "doc_starts": [x[2] for x in rows]})})
    ref = float(oracle.run_case(llama, fake, grads=False)["loss"])
    check(rel(r["loss"], ref) < 1e-5, "checkpoint loss equals the oracle's", (r["loss"], ref))
    kit.eq(r["step"], 4, "report names the checkpoint's step")

# ---- text data, tokenized like training data (format detected)
txt = os.path.join(work, "notes.jsonl")
with open(txt, "w") as f:
    for s in ["The quick brown fox.", "jumps over the lazy dog", "", "Licence text, more text."]:
        f.write(json.dumps({"text": s}) + "\n")
p = run(["eval", "perplexity", "--checkpoint", run_dir, "--data", txt, "--seq-len", 32], "ppl text")
if kit.succeeds(p, "perplexity on JSONL text"):
    r = report(p)
    kit.eq((r["format"], r["documents"]), ("text", 3), "format detected, empty record skipped")
    byte_docs = [list(t.encode()) for t in ["The quick brown fox.", "jumps over the lazy dog",
                                            "Licence text, more text."]]
    want = sum(1 for row in packed_rows(byte_docs, 32) for x in row[1] if x != -100)
    kit.eq(r["tokens"], want, "byte-level tokens packed like training rows")


# ---- MMLU: the original CSV layout, log-likelihoods against the oracle
mm = os.path.join(work, "mmlu")
os.makedirs(os.path.join(mm, "dev"))
os.makedirs(os.path.join(mm, "test"))
with open(os.path.join(mm, "dev", "astronomy_dev.csv"), "w") as f:
    f.write('"What is the sun?",A star,A planet,"A moon, really",A comet,A\n')
with open(os.path.join(mm, "test", "astronomy_test.csv"), "w") as f:
    f.write('"Which is largest?",Earth,Jupiter,Mars,Venus,B\n'
            '"He said ""hi"", then\nleft. Why?",No reason,Rain,Snow,Wind,A\n'
            'five,fields,only,here,A\n'
            'Bad answer?,a,b,c,d,E\n')
with open(os.path.join(mm, "dev", "law_dev.csv"), "w") as f:
    f.write("Is law old?,Yes,No,Maybe,Never,A\n")
with open(os.path.join(mm, "test", "law_test.csv"), "w") as f:
    f.write("Is law fun?,Yes,No,Maybe,Never,C\n")
items = os.path.join(work, "items.jsonl")
p = run(["eval", "mmlu", "--checkpoint", run_dir, "--data", mm, "--items-out", items, "--matmul", "f32",
         "--compare"], "mmlu")
if kit.succeeds(p, "mmlu on the CSV layout"):
    r = report(p)
    kit.eq((r["items"], r["subjects"], r["skipped_rows"]), (3, 2, 2), "items, subjects, counted skips")
    check("5 fields" in p.stderr and "astronomy_test.csv:4" in p.stderr, "the skipped row is named", p.stderr)
    for key in ("metrics", "base_metrics", "difference"):
        check(key in r and "acc" in r[key] and "pqem" in r[key], "report has " + key)
    check("Titan - base" in p.stderr and "PQEM" in p.stderr, "readable tables on stderr", p.stderr[-800:])
    rows = [json.loads(x) for x in open(items)]
    kit.eq([x["index"] for x in rows], [0, 1, 2], "items in order")
    kit.eq([x["gold"] for x in rows], ["B", "A", "C"], "gold letters")
    # the prompt text, decoded from its ids (byte tokenizer): HELM/lighteval's format, one shot
    text = bytes(rows[1]["prompt_ids"]).decode()
    want = ("The following are multiple choice questions (with answers) about astronomy.\n\n"
            "What is the sun?\nA. A star\nB. A planet\nC. A moon, really\nD. A comet\nAnswer: A\n\n"
            'He said "hi", then\nleft. Why?\nA. No reason\nB. Rain\nC. Snow\nD. Wind\nAnswer:')
    kit.eq(text, want, "prompt text (quotes and newline inside a CSV field)")
    kit.eq(rows[0]["choice_ids"], [[32, 65], [32, 66], [32, 67], [32, 68]], "choice ids of ' A'..' D' (bytes)")
    # the oracle: log p(choice | prompt) from the written ids
    ck = tu.latest(run_dir)
    tensors, _ = stnp.load(os.path.join(ck, "adapter_model.safetensors"))
    extra, _ = stnp.load(os.path.join(ck, "liza_model.safetensors"))
    tensors.update(extra)
    with open(os.path.join(ck, "config.json")) as f:
        conf = f.read()
    worst = 0.0
    for x in rows:
        for k in range(4):
            seq = x["prompt_ids"] + x["choice_ids"][k][:-1]
            out = {"logits": ("F32", np.zeros((1, 1, 1), np.float32)), "loss": ("F32", np.zeros((), np.float32))}
            for kk, v in tensors.items():
                out[kk] = ("F32", v.astype(np.float32))
                out[kk + ".grad"] = ("F32", np.zeros_like(v, dtype=np.float32))
            fake = os.path.join(work, "fake_mmlu.safetensors")
            stnp.save(fake, out, {"format": "pt", "config": conf, "batch": json.dumps({"input_ids": [seq]})})
            lg = oracle.run_case(llama, fake, grads=False)["logits"][0]
            n0 = len(x["prompt_ids"]) - 1
            ll = 0.0
            for i, tid in enumerate(x["choice_ids"][k]):
                row = lg[n0 + i]
                m = row.max()
                ll += row[tid] - (m + math.log(np.exp(row - m).sum()))
            worst = max(worst, abs(ll - x["ll"][k]))
        kit.eq(x["pred"], "ABCD"[int(np.argmax(x["ll"]))], "pred is the argmax of ll")
        kit.eq(x["acc"], int(x["pred"] == x["gold"]), "acc")
    check(worst < 1e-4, "per-choice log-likelihoods equal the oracle's", worst)
    two = run(["eval", "mmlu", "--checkpoint", run_dir, "--data", mm, "--matmul", "f32", "--compare",
               "--items-out", items + "2"], "mmlu 2 ranks", mpi=2)
    if kit.succeeds(two, "mmlu on 2 ranks"):
        kit.eq(open(items + "2").read(), open(items).read(), "2 ranks write the same items as 1")
        kit.eq(report(two)["metrics"], r["metrics"], "2 ranks report the same metrics")
        kit.eq(two.stderr.count("astronomy_test.csv:4"), 1, "2 ranks: a skipped row is reported once, not per rank")
    two = run(["eval", "mmlu", "--model", llama, "--data", mm, "--matmul", "f32", "--shots", 2], "mmlu short dev",
              mpi=2)
    if kit.succeeds(two, "mmlu --shots 2 on 2 ranks (1 dev item per subject)"):
        kit.eq([two.stderr.count("subject %s has 1 dev item for 2 shots" % s) for s in ("astronomy", "law")], [1, 1],
               "2 ranks: one short-dev warning per subject")
p = run(["eval", "mmlu", "--model", llama, "--data", mm, "--shots", 0, "--max-items", 1], "mmlu --max-items")
if kit.succeeds(p, "mmlu --max-items 1"):
    r = report(p)
    kit.eq((r["items"], {k: v["n"] for k, v in r["by_subject"].items()}), (2, {"astronomy": 1, "law": 1}),
           "--max-items 1: one item per subject")
if os.path.exists("/dev/full"):  # --items-out on a full disk: the system's reason, exit 1, no report
    p = run(["eval", "mmlu", "--model", llama, "--data", mm, "--shots", 0, "--items-out", "/dev/full"],
            "mmlu --items-out on a full disk")
    check(p.returncode == 1 and "/dev/full: write failed: No space left on device" in p.stderr
          and not p.stdout.strip(), "--items-out on a full disk: one clear error, exit 1",
          "exit %d: %s | %s" % (p.returncode, p.stderr[-400:], p.stdout[-200:]))
else:
    print("SKIP --items-out on a full disk: no /dev/full")
p = run(["eval", "mmlu", "--model", llama, "--data", mm, "--shots", 0, "--subjects", "law"], "mmlu --subjects")
if kit.succeeds(p, "mmlu --subjects law"):
    kit.eq(list(report(p)["by_subject"]), ["law"], "--subjects keeps only those subjects")
# JSONL with shots from --dev
jtest = os.path.join(work, "mm_test.jsonl")
with open(jtest, "w") as f:
    f.write(json.dumps({"subject": "math", "question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": "B"}) + "\n")
    f.write(json.dumps({"subject": "math", "question": "1+1?", "choices": ["2", "3", "4", "5"], "answer": 0}) + "\n")
p = run(["eval", "mmlu", "--checkpoint", run_dir, "--data", jtest], "mmlu jsonl without dev")
check(p.returncode == 1 and "--dev" in p.stderr, "JSONL with shots needs --dev", p.stderr)
p = run(["eval", "mmlu", "--checkpoint", run_dir, "--data", jtest, "--shots", 0], "mmlu jsonl zero-shot")
if kit.succeeds(p, "zero-shot JSONL"):
    kit.eq(report(p)["items"], 2, "JSONL items")
p = run(["eval", "mmlu", "--model", llama, "--data", jtest, "--dev", jtest], "mmlu jsonl dev")
kit.succeeds(p, "JSONL with --dev shots on a plain model")
p = run(["eval", "mmlu", "--model", llama, "--data", jtest, "--shots", 0, "--compare"], "compare without ckpt")
check(p.returncode == 1 and "--compare" in p.stderr, "--compare needs a checkpoint", p.stderr)
nodev = os.path.join(work, "mm_nodev")
shutil.copytree(mm, nodev)
shutil.rmtree(os.path.join(nodev, "dev"))
p = run(["eval", "mmlu", "--model", llama, "--data", nodev], "mmlu without dev dir")
check(p.returncode == 1 and "dev" in p.stderr, "a missing dev directory is an error naming it", p.stderr)
p = run(["eval", "mmlu", "--model", llama, "--data", nodev, "--shots", 0], "mmlu zero-shot without dev")
kit.succeeds(p, "zero-shot needs no dev directory")
open(os.path.join(work, "empty_mm.jsonl"), "w").close()
p = run(["eval", "mmlu", "--model", llama, "--data", os.path.join(work, "empty_mm.jsonl"), "--shots", 0], "empty")
check(p.returncode == 1 and "empty_mm.jsonl" in p.stderr, "an empty MMLU file is an error naming it", p.stderr)

# ---- passkey: runs, reports a table, same on 2 ranks
p = run(["eval", "passkey", "--checkpoint", run_dir, "--lengths", "128,256", "--depths", "0,1", "--trials", 2,
         "--seed", 4], "passkey")
if kit.succeeds(p, "passkey"):
    r = report(p)
    kit.eq((r["lengths"], r["depths"], r["trials"]), ([128, 256], [0.0, 1.0], 2), "passkey grid")
    kit.eq(len(r["by_length_depth"]), 2, "one row per length")
    png = os.path.join(work, "heat'; system('touch PWNED'); '.png")
    p2 = run(["eval", "passkey", "--checkpoint", run_dir, "--lengths", "128", "--depths", "0,1", "--trials", 1,
              "--png", png], "passkey png")
    if kit.succeeds(p2, "passkey heat map"):
        check(open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n", "a PNG at a path with quotes")
        check(not os.path.exists("PWNED") and not os.path.exists(os.path.join(work, "PWNED")),
              "the output path never reaches gnuplot as code")
    two = run(["eval", "passkey", "--checkpoint", run_dir, "--lengths", "128,256", "--depths", "0,1", "--trials",
               2, "--seed", 4], "passkey 2 ranks", mpi=2)
    if kit.succeeds(two, "passkey on 2 ranks"):
        kit.eq(report(two)["by_length_depth"], r["by_length_depth"], "passkey: 2 ranks = 1")

# ---- bad input
def bad(args, want, what, code=1, mpi=0):
    p = run(args, what, mpi=mpi)
    err = p.stderr.strip()
    check(p.returncode == code and want in err, what + ": exit %d naming %r" % (code, want),
          "exit %d, stderr: %s" % (p.returncode, err[:800]))


empty = os.path.join(work, "empty.jsonl")
open(empty, "w").close()
bad(["eval", "perplexity", "--model", llama, "--data", empty, "--format", "text"], "empty", "empty data file")
bad(["eval", "perplexity", "--model", llama, "--data", os.path.join(work, "none.tok")], "none.tok", "missing data")
bad(["eval", "perplexity", "--model", llama, "--data", shard, "--format", "csv"], "--format", "bad format", code=2)
bad(["eval", "perplexity", "--model", llama, "--data", shard, "--stride", 40, "--seq-len", 16], "--stride",
    "stride > seq-len", code=2)
bad(["eval", "perplexity", "--model", llama], "--data", "no data", code=2)
bad(["eval", "wat"], "wat", "unknown mode", code=2)
big = os.path.join(work, "big.jsonl")
with open(big, "w") as f:
    f.write(json.dumps({"ids": [1, 2, 300]}) + "\n")
bigshard = os.path.join(work, "big.tok")
subprocess.run([TPTT, "make-shard", "--jsonl", "-o", bigshard, big], check=True, capture_output=True)
bad(["eval", "perplexity", "--model", llama, "--data", bigshard], "300", "token id outside the vocabulary", mpi=2)

shutil.rmtree(work, ignore_errors=True)
sys.exit(kit.report())
