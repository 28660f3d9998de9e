#!/usr/bin/env python3
"""test_generate - `tptt generate` end to end on trained checkpoints.

* Against the independent PyTorch oracle (tests/py/oracle.py, float64, written
  from LIZA.md): a checkpoint trained with LiZA (delta_product, learnable mu)
  and one with a sliding window, bf16 weights, linear: false and a gradual mu
  with cross gate; greedy generation (prompt ending mid-chunk, continuation
  crossing several chunks) must pick exactly the oracle's argmax at every
  step, and --logits-out must equal the oracle's logits of the full sequence
  at those positions (fp32 vs float64: 1e-4 relative).
* Sampling: same seed, same output; another seed, another output; prompts of
  an --input file on 2 MPI ranks give the same lines, in input order, as 1.
* Stops: --stop cuts the text before the string; EOS from generation_config.json.
* Bad input: each a clear one-line error (or a warning), never a crash.
"""
import json
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
kit = testkit.Checker("test_generate")
check = kit.check
work = tempfile.mkdtemp(prefix="tptt_test_generate_")
ENV = dict(os.environ)
ENV.update(tu.MPI_ENV)


def run(args, what, mpi=0, timeout=300):
    cmd = [TPTT] + [str(a) for a in args]
    if mpi:
        cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(mpi)] + cmd
    return kit.run(cmd, env=ENV, timeout=timeout, text=True, what=what)


def results(p):
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def make_base(path, arch, dtype, extra=()):
    subprocess.run([TPTT, "init-model", "--arch", arch, "--layers", "2", "--hidden", "32", "--heads", "4",
                    "--kv-heads", "2", "--ffn", "64", "--vocab", "256", "--byte-tokenizer", "--dtype", dtype,
                    "--init-std", "0.2", "--seed", "3", "--force", path] + list(extra),
                   check=True, capture_output=True)


def train(name, base, **over):
    run_dir = os.path.join(work, name)
    cfg = os.path.join(work, name + ".yaml")
    tu.write_config(cfg, base, data, run_dir, lora__dropout=0.0, optimizer__lr=3e-2,
                    schedule__total_steps=4, checkpoint__every=4, **over)
    p = tu.train(cfg, ranks=0)
    kit.succeeds(p, "train " + name)
    return run_dir


def oracle_logits(base, ckpt, seq):
    """The oracle's logits [len(seq), V] for one sequence under a checkpoint:
    a dump-shaped file holding the checkpoint's trainables."""
    tensors, _ = stnp.load(os.path.join(ckpt, "adapter_model.safetensors"))
    extra, _ = stnp.load(os.path.join(ckpt, "liza_model.safetensors"))
    tensors.update(extra)
    out = {"logits": ("F32", np.zeros((1, len(seq), 256), np.float32)), "loss": ("F32", np.zeros((), np.float32))}
    for k, v in tensors.items():
        out[k] = ("F32", v.astype(np.float32))
        out[k + ".grad"] = ("F32", np.zeros_like(v, dtype=np.float32))
    path = os.path.join(work, "fake_dump.safetensors")
    with open(os.path.join(ckpt, "config.json")) as f:
        conf = f.read()
    stnp.save(path, out, {"format": "pt", "config": conf, "batch": json.dumps({"input_ids": [seq]})})
    return oracle.run_case(base, path, grads=False)["logits"][0]


def oracle_case(label, base, run_dir, prompt, n_new):
    ck = tu.latest(run_dir)
    lo = os.path.join(work, label + ".logits.safetensors")
    p = run(["generate", "--checkpoint", run_dir, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens",
             n_new, "--ignore-eos", "--logits-out", lo, "--matmul", "f32"], label + ": generate")
    if not kit.succeeds(p, label + ": generate succeeds"):
        return
    r = results(p)[0]
    gen = r["ids"]
    kit.eq(r["new_tokens"], n_new, label + ": new_tokens")
    kit.eq(r["prompt_tokens"], len(prompt), label + ": prompt_tokens")
    kit.eq(r["stop"], "length", label + ": stop")
    ours, _ = stnp.load(lo)
    ours = ours["logits.0"]
    kit.eq(ours.shape, (n_new, 256), label + ": --logits-out shape")
    ref = oracle_logits(base, ck, prompt + gen[:-1])[len(prompt) - 1:]
    err = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
    check(err <= 1e-4, label + ": logits equal the oracle's", "max relative error %.3g" % err)
    for j, id_ in enumerate(gen):
        top2 = np.sort(ref[j])[-2:]
        if top2[1] - top2[0] < 1e-6:
            continue  # a near tie: either pick is right
        if not check(int(np.argmax(ref[j])) == id_, label + ": greedy id %d equals the oracle's argmax" % j,
                     "ours %d, oracle %d" % (id_, int(np.argmax(ref[j])))):
            break
    return gen


# ---- models, data, checkpoints
llama = os.path.join(work, "llama")
mistral = os.path.join(work, "mistral")
make_base(llama, "llama", "f32")
make_base(mistral, "mistral", "bf16", ["--sliding-window", "16"])
data = os.path.join(work, "data.tok")
tu.make_data(data, vocab=256, docs=40)
run_a = train("run_a", llama, liza__preset="delta_product", liza__chunk_size=4,
              mag__mode="learnable", mag__mu0=0.5)
run_b = train("run_b", mistral, liza__preset="delta_rule_gelu", liza__chunk_size=4,
              mag__mode="gradual", mag__mu0=0.2, mag__mu1=0.8, mag__steps=6, mag__cross_gate=True,
              compute__matmul="auto")

# ---- the oracle
prompt = [7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31]  # 13 tokens: ends mid-chunk (C = 4)
gen_a = oracle_case("delta_product + learnable mu", llama, run_a, prompt, 14)
oracle_case("mistral window 16, bf16, linear false, gradual mu + cross gate", mistral, run_b, prompt * 2, 12)
p = run(["generate", "--checkpoint", run_b, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", 12,
         "--matmul", "bf16"], "bf16 matmul")
kit.succeeds(p, "--matmul bf16 generates (oneDNN, or the f32 fallback without AVX512_BF16)")

# ---- sampling: determinism and seeds
samp = ["generate", "--checkpoint", run_a, "--prompt", "Hello", "--max-new-tokens", 24, "--ignore-eos",
        "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95"]
p1 = run(samp + ["--seed", 7], "sample seed 7")
p2 = run(samp + ["--seed", 7], "sample seed 7 again")
p3 = run(samp + ["--seed", 8], "sample seed 8")
if kit.succeeds(p1, "sampling succeeds") and p2.returncode == 0 and p3.returncode == 0:
    kit.eq(p2.stdout, p1.stdout, "same seed, same output")
    check(results(p3)[0]["ids"] != results(p1)[0]["ids"], "another seed, another output")
    r = results(p1)[0]
    check(isinstance(r["text"], str) and r["prompt_tokens"] == 5, "text prompt through the byte tokenizer", r)
greedy = run(["generate", "--checkpoint", run_a, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens",
              14, "--ignore-eos"], "greedy")
if greedy.returncode == 0 and gen_a:
    kit.eq(results(greedy)[0]["ids"], gen_a, "greedy without --logits-out gives the same ids")
pen = run(["generate", "--checkpoint", run_a, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", 14,
           "--ignore-eos", "--repetition-penalty", "5"], "repetition penalty")
if pen.returncode == 0 and gen_a:
    g = results(pen)[0]["ids"]
    check(len(set(g)) >= len(set(gen_a)), "repetition penalty repeats no more than greedy", (g, gen_a))

# ---- MPI: prompts shared over ranks, results in input order
inp = os.path.join(work, "prompts.jsonl")
with open(inp, "w") as f:
    f.write(json.dumps({"prompt": "The "}) + "\n\n")
    f.write(json.dumps({"ids": [1, 2, 3, 4, 5]}) + "\n")
    f.write(json.dumps({"prompt": "Licen\u00e7e"}) + "\n")
    f.write(json.dumps({"ids": [200, 100]}) + "\n")
args = ["generate", "--checkpoint", run_a, "--input", inp, "--max-new-tokens", 10, "--temperature", "0.8",
        "--seed", 3, "--ignore-eos"]
one = run(args, "input file, 1 rank")
two = run(args, "input file, 2 ranks", mpi=2)
if kit.succeeds(one, "1 rank succeeds") and kit.succeeds(two, "2 ranks succeed"):
    kit.eq(two.stdout, one.stdout, "2 ranks print what 1 rank prints, in input order")
    kit.eq([r["prompt_tokens"] for r in results(one)], [4, 5, 8, 2], "prompt order kept")  # ç is two bytes

# ---- stops
if greedy.returncode == 0:
    text = results(greedy)[0]["text"]
    stop = text[4:6] if len(text) >= 6 else None
    if stop and stop not in text[:4] and stop[0] not in text[:4]:
        p = run(["generate", "--checkpoint", run_a, "--prompt-ids", ",".join(map(str, prompt)),
                 "--max-new-tokens", 14, "--ignore-eos", "--stop", stop], "stop string")
        if kit.succeeds(p, "stop string run"):
            r = results(p)[0]
            kit.eq(r["stop"], "stop_string", "stop reason")
            kit.eq(r["text"], text[:text.index(stop)], "text cut before the stop string")
    # EOS from generation_config.json: the third greedy token
    eos_base = os.path.join(work, "llama_eos")
    shutil.copytree(llama, eos_base)
    with open(os.path.join(eos_base, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [250, gen_a[2]]}, f)
    p = run(["generate", "--checkpoint", run_a, "--model", eos_base, "--prompt-ids", ",".join(map(str, prompt)),
             "--max-new-tokens", 14], "eos")
    if kit.succeeds(p, "eos run"):
        r = results(p)[0]
        kit.eq((r["stop"], r["new_tokens"], r["ids"]), ("eos", 3, gen_a[:3]), "stops at EOS, keeps it in ids")

# ---- a plain model and a run directory vs a step directory
p = run(["generate", "--model", llama, "--prompt", "abc", "--max-new-tokens", 3, "--ignore-eos"], "plain model")
kit.succeeds(p, "a plain base model generates")
p = run(["generate", "--checkpoint", tu.latest(run_a), "--prompt-ids", ",".join(map(str, prompt)),
         "--max-new-tokens", 14, "--ignore-eos"], "step directory")
if kit.succeeds(p, "a step directory loads") and gen_a:
    kit.eq(results(p)[0]["ids"], gen_a, "step directory = run directory's LATEST")


# ---- bad input: one clear line, exit 1 (2 for usage), never a crash
def bad(args, want, what, code=1, mpi=0):
    p = run(args, what, mpi=mpi)
    err = p.stderr.strip()
    check(p.returncode == code and want in err, what + ": exit %d naming %r" % (code, want),
          "exit %d, stderr: %s" % (p.returncode, err[:800]))


ids = ",".join(map(str, prompt))
bad(["generate", "--checkpoint", os.path.join(work, "nope"), "--prompt-ids", ids], "nope", "missing checkpoint")
corrupt = os.path.join(work, "corrupt")
shutil.copytree(tu.latest(run_a), corrupt)
with open(os.path.join(corrupt, "adapter_model.safetensors"), "r+b") as f:
    f.seek(-3, 2)
    f.write(b"\x7f\x7f\x7f")
bad(["generate", "--checkpoint", corrupt, "--prompt-ids", ids], "adapter_model.safetensors", "corrupt adapter file")
shutil.rmtree(corrupt)
shutil.copytree(tu.latest(run_a), corrupt)
os.remove(os.path.join(corrupt, "liza_model.safetensors"))
bad(["generate", "--checkpoint", corrupt, "--prompt-ids", ids], "liza_model.safetensors", "missing liza file")
other = os.path.join(work, "other_base")
subprocess.run([TPTT, "init-model", "--arch", "llama", "--layers", "2", "--hidden", "48", "--heads", "4",
                "--ffn", "64", "--vocab", "256", "--dtype", "f32", "--force", other], check=True, capture_output=True)
bad(["generate", "--checkpoint", run_a, "--model", other, "--prompt-ids", ids], "shape", "base of another shape")
bad(["generate", "--checkpoint", run_a, "--prompt-ids", "1,256"], "256", "prompt id out of range")
bad(["generate", "--checkpoint", run_a, "--prompt-ids", "1,x"], "--prompt-ids", "prompt ids not integers")
badin = os.path.join(work, "bad.jsonl")
with open(badin, "w") as f:
    f.write('{"ids": [1, 2]}\n{"prompt": 5}\n')
bad(["generate", "--checkpoint", run_a, "--input", badin], "bad.jsonl:2", "bad JSONL line")
with open(badin, "w") as f:
    f.write('{"ids": [1, 2]}\n{"ids": [3, -1]}\n')
bad(["generate", "--checkpoint", run_a, "--input", badin], "bad.jsonl:2", "negative id in JSONL", mpi=2)
notok = os.path.join(work, "notok")
shutil.copytree(llama, notok)
os.remove(os.path.join(notok, "tokenizer.json"))
bad(["generate", "--model", notok, "--prompt", "hi"], "tokenizer", "text prompt without a tokenizer")
bad(["generate", "--checkpoint", run_a, "--prompt-ids", ids, "--logits-out", os.path.join(work, "x.st")],
    "one rank", "--logits-out on 2 ranks", mpi=2)
bad(["generate", "--checkpoint", run_a], "exactly one", "no prompt", code=2)
bad(["generate", "--checkpoint", run_a, "--prompt-ids", ids, "--top-p", "0"], "--top-p", "top-p 0", code=2)
bad(["generate", "--model", work, "--prompt-ids", ids], "config.json", "a directory that is no model")
# a prompt longer than max_position_embeddings (no sliding window): a warning, not a crash
short = os.path.join(work, "short_ctx")
shutil.copytree(llama, short)
with open(os.path.join(short, "config.json")) as f:
    c = json.load(f)
c["max_position_embeddings"] = 16
with open(os.path.join(short, "config.json"), "w") as f:
    json.dump(c, f)
p = run(["generate", "--checkpoint", run_a, "--model", short, "--prompt-ids", ids, "--max-new-tokens", 8,
         "--ignore-eos"], "past max_position_embeddings")
kit.succeeds(p, "a prompt past max_position_embeddings still generates")
check("max_position_embeddings" in p.stderr and "warning" in p.stderr, "... with a warning", p.stderr[:500])

shutil.rmtree(work, ignore_errors=True)
sys.exit(kit.report())
