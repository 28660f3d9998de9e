"""Training from text data (docs/data.md "Text data sets"), on a tiny model
with the Mistral tokenizer's 32000 ids:

- no attention across documents: in a packed row of the Alpaca shard (as
  `make-shard --rows` gives it to `tptt dump`), the logits of every document
  equal those of the document run alone, LiZA + MaG included; the same row
  with its document boundaries ignored gives different logits (so the check
  can fail);
- training from the Alpaca JSONL (tokenized on 2 ranks) gives bit-identical
  losses to training from a shard built with `tptt make-shard --jsonl` from
  ids and masks computed with `tptt tokenize`;
- a tokenizer whose ids do not fit the model's vocabulary is refused."""
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
from test_prepare_data import ALPACA, MISTRAL, PROMPT, PROMPT_NI, QWEN, TOK_ENV, TPTT, alpaca_oracle  # noqa: E402

kit = testkit.Checker("test_data_train")
check, eq = kit.check, kit.eq
LIZA = ["--set", "liza.enabled=true", "--set", "liza.preset=gated_delta_rule", "--set", "liza.chunk_size=8",
        "--set", "compute.matmul=f32"]


def dump_logits(tmp, model, batch, name):
    bpath, out = os.path.join(tmp, name + ".json"), os.path.join(tmp, name + ".safetensors")
    json.dump(batch, open(bpath, "w"))
    p = kit.run([TPTT, "dump", "--model", model, "--batch", bpath, "--out", out] + LIZA, timeout=300)
    if not kit.succeeds(p, "dump " + name):
        return None
    t, _ = stnp.load(out)
    return t["logits"]


def test_boundaries(tmp, model, shard):
    T = 128
    p = kit.run([TPTT, "make-shard", "--rows", "1:2", "--seq-len", str(T), shard])
    if not kit.succeeds(p, "make-shard --rows"):
        return
    rows = json.loads(p.stdout)
    packed = dump_logits(tmp, model, rows, "packed")
    flat = dump_logits(tmp, model, {"input_ids": rows["input_ids"]}, "flat")  # one document per row
    if packed is None or flat is None:
        return
    segs, errs, diffs = 0, [], []
    for r in range(2):
        starts = rows["doc_starts"][r] + [T]
        check(len(starts) >= 3, "row %d holds at least two documents" % r, str(starts))
        for a, b in zip(starts, starts[1:]):
            alone = dump_logits(tmp, model, {"input_ids": [rows["input_ids"][r][a:b]]}, "alone-%d-%d" % (r, a))
            if alone is None:
                continue
            want = alone[0]
            scale = float(np.abs(want).max())
            err = float(np.abs(packed[r, a:b] - want).max()) / scale
            errs.append(err)
            check(err < 1e-5, "row %d, document at %d..%d: packed logits = alone (rel %.1e)" % (r, a, b, err))
            if a > 0:  # with the boundaries ignored, later documents see the earlier ones
                diff = float(np.abs(flat[r, a:b] - want).max()) / scale
                diffs.append(diff)
                check(diff > 1e-3, "row %d, document at %d: ignoring boundaries changes the logits (rel %.1e)"
                      % (r, a, diff))
            segs += 1
    check(segs >= 4, "documents compared: %d" % segs)
    print("%d documents: packed vs alone max rel %.1e; boundaries ignored: min rel %.1e"
          % (segs, max(errs, default=0), min(diffs, default=0)))


def tokens_shard(tmp):
    """The Alpaca fixture as ids + mask from `tptt tokenize`, through make-shard --jsonl."""
    good, _, _ = alpaca_oracle(ALPACA)
    prompts = [(PROMPT.replace("{instruction}", i).replace("{input}", x) if x else
                PROMPT_NI.replace("{instruction}", i)) for i, x, _ in good]
    texts = prompts + [o for _, _, o in good]
    p = kit.run([TPTT, "tokenize", "--tokenizer", MISTRAL],
                input="".join(json.dumps({"text": t}) + "\n" for t in texts).encode(), timeout=120, env=TOK_ENV)
    if not kit.succeeds(p, "tokenize"):
        return None
    ids = [json.loads(line)["ids"] for line in p.stdout.decode().splitlines()]
    n = len(good)
    jl, out = os.path.join(tmp, "alpaca-ids.jsonl"), os.path.join(tmp, "alpaca-ids.tok")
    with open(jl, "w") as f:
        for k in range(n):
            pr, o = ids[k], ids[n + k]
            f.write(json.dumps({"ids": [1] + pr + o + [2], "mask": [0] * (1 + len(pr)) + [1] * (len(o) + 1)}) + "\n")
    p = kit.run([TPTT, "make-shard", "--jsonl", "-o", out, jl])
    return out if kit.succeeds(p, "make-shard --jsonl") else None


def test_training(tmp, model):
    ref = tokens_shard(tmp)
    if not ref:
        return
    runs = {}
    for name, data in (("jsonl", {"data__format": "alpaca", "data__path": ALPACA, "data__tokenizer": MISTRAL}),
                       ("tokens", {"data__format": "tokens", "data__path": ref})):
        cfg, run = os.path.join(tmp, name + ".yaml"), os.path.join(tmp, "run-" + name)
        tu.write_config(cfg, model, "unused", run, data__seq_len=64, batch__global=4, batch__micro=1,
                        schedule__total_steps=6, checkpoint__every=0, **data)
        p = tu.train(cfg, ranks=2)
        if check(p.returncode == 0, "train from %s on 2 ranks" % name, p.stderr[-2500:]):
            runs[name] = tu.losses(run)
            if name == "jsonl":
                check("tptt: data: tokenizing %s" % ALPACA in p.stderr and "on 2 ranks" in p.stderr,
                      "the JSONL was tokenized on 2 ranks", p.stderr[-1500:])
    if len(runs) == 2:
        eq(sorted(runs["jsonl"]), list(range(1, 7)), "steps logged")
        check(runs["jsonl"] == runs["tokens"], "JSONL and pre-built shard: bit-identical losses",
              "%s vs %s" % (runs["jsonl"], runs["tokens"]))
        check(len(set(runs["jsonl"].values())) > 1, "losses change between steps")
    # Qwen3's ids (151669) do not fit the 32000-token model
    cfg = os.path.join(tmp, "qwen.yaml")
    tu.write_config(cfg, model, ALPACA, os.path.join(tmp, "run-qwen"), data__format="alpaca", data__tokenizer=QWEN)
    p = tu.train(cfg, ranks=2)
    check(p.returncode == 1 and "outside the model's vocabulary (vocab_size 32000" in p.stderr
          and p.stderr.count("tptt: data.tokenizer") == 1, "a tokenizer larger than the vocabulary is refused once",
          p.stderr[-1500:])


def main():
    tmp = tempfile.mkdtemp(prefix="tptt-data-train-")
    try:
        model = os.path.join(tmp, "model")
        tu.make_model(model, arch="mistral", vocab=32000)
        cfg = os.path.join(tmp, "prep.yaml")
        tu.write_config(cfg, model, ALPACA, os.path.join(tmp, "prep"), data__format="alpaca",
                        data__tokenizer=MISTRAL)
        p = subprocess.run([TPTT, "prepare-data", cfg], capture_output=True, text=True, timeout=300)
        if not kit.succeeds(p, "prepare-data"):
            return kit.report()
        kit.call(test_boundaries, tmp, model, p.stdout.strip())
        kit.call(test_training, tmp, model)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
