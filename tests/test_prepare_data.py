"""Text data sets end to end (`tptt prepare-data`, docs/data.md "Text data
sets"), with `tptt tokenize` as the independent tokenizer and Python's json
as the independent record parser:

- the Alpaca fixture (tests/fixtures/data/alpaca.jsonl, Mistral tokenizer):
  every document is [BOS] + tokenize(prompt) + tokenize(output) + [EOS] with
  the Stanford template rendered here, mask 0 on BOS and prompt, 1 on the
  output and EOS; in the rows the trainer reads (`make-shard --rows`, pad),
  the positions with a label are exactly those that predict a response
  token; the bad records are the ones Python's json finds, reported with
  their count and line numbers; abort mode names the first one;
- chat (Qwen3, ChatML) and text (.txt line/paragraph/document, JSONL)
  documents against tokenize of the pieces;
- 1, 2 and 3 ranks build byte-identical shards (JSONL, .txt paragraphs
  whose slices cut through paragraphs);
- JSON array sources (alpaca, chat, text): on 2 and 3 ranks the shard is
  byte for byte the one built from the same records as JSONL, bad elements
  are reported by record number; a broken file is one error with line and
  column;
- the cache: a second run reuses the shard (log line, mtime unchanged), a
  changed template or source rebuilds it."""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
import testkit  # noqa: E402
import train_util as tu  # noqa: E402

kit = testkit.Checker("test_prepare_data")
check, eq = kit.check, kit.eq
TPTT = os.environ.get("TPTT", "tptt")
SRC = os.environ.get("TPTT_SOURCE_DIR", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALPACA = os.path.join(SRC, "tests", "fixtures", "data", "alpaca.jsonl")
MISTRAL = os.path.join(SRC, "tests", "fixtures", "tokenizers", "mistral")
QWEN = os.path.join(SRC, "tests", "fixtures", "tokenizers", "qwen3")
PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
          "### Input:\n{input}\n\n### Response:\n")
PROMPT_NI = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
             "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def read_shard(path):
    """(documents, masks or None) of a token shard, parsed per docs/data.md."""
    b = open(path, "rb").read()
    magic, version, flags, nt, nd, _vocab, _res = struct.unpack_from("<8sIIQQQQ", b, 0)
    assert magic == b"TPTTTOK1" and version == 1
    tok = np.frombuffer(b, "<u4", nt, 48)
    off_at = 48 + (4 * nt + 7) // 8 * 8
    off = np.frombuffer(b, "<u8", nd + 1, off_at)
    mask = np.frombuffer(b, "u1", nt, off_at + 8 * (nd + 1)) if flags & 1 else None
    docs = [tok[off[i]:off[i + 1]].tolist() for i in range(nd)]
    masks = [mask[off[i]:off[i + 1]].tolist() for i in range(nd)] if mask is not None else None
    return docs, masks


# `tptt tokenize` starts no MPI, so LSan needs no full unwinding there (see
# tests/test_tokenizer.py): loading Qwen3's tokenizer.json under ASan takes
# 1.5 s instead of 30 s. prepare-data keeps the suite's options.
TOK_ENV = dict(os.environ)
TOK_ENV["ASAN_OPTIONS"] = TOK_ENV.get("ASAN_OPTIONS", "").replace("fast_unwind_on_malloc=0", "fast_unwind_on_malloc=1")


def tokenize(tokdir, texts):
    """Ids of each text, no BOS/EOS (`tptt tokenize`)."""
    inp = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    p = kit.run([TPTT, "tokenize", "--tokenizer", tokdir], input=inp.encode(), timeout=120, env=TOK_ENV)
    if not kit.succeeds(p, "tptt tokenize"):
        return [[] for _ in texts]
    return [json.loads(line)["ids"] for line in p.stdout.decode().splitlines()]


def alpaca_oracle(path):
    """(good records as (instruction, input or None, output), bad line
    numbers, number of records): Python's strict reading of the file."""
    good, bad, records = [], [], 0
    for n, raw in enumerate(open(path, "rb").read().split(b"\n"), 1):
        if not raw.strip():
            continue
        records += 1
        try:
            r = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            bad.append(n)
            continue
        inp = r.get("input") if isinstance(r, dict) else None
        if (not isinstance(r, dict) or not isinstance(r.get("instruction"), str)
                or not isinstance(r.get("output"), str) or not isinstance(inp, (str, type(None)))):
            bad.append(n)
            continue
        good.append((r["instruction"], inp or None, r["output"]))
    return good, bad, records


def config(tmp, name, data_path, fmt, tokenizer, **data):
    """A run config whose data section is format/path/tokenizer plus data."""
    path = os.path.join(tmp, name + ".yaml")
    d = {"format": fmt, "path": data_path, "tokenizer": tokenizer, "seq_len": 512}
    d.update(data)
    lines = ["model: {path: %s}" % tmp, "run: {dir: %s}" % os.path.join(tmp, name), "batch: {global: 6}",
             "schedule: {total_steps: 1}", "data:"]
    lines += ["  %s: %s" % (k, json.dumps(v) if isinstance(v, str) else tu.scalar(v)) for k, v in d.items()]
    open(path, "w").write("\n".join(lines) + "\n")
    return path


def prepare(cfg, ranks=0, extra=(), what="prepare-data"):
    """Run prepare-data (under mpirun when ranks > 0); (shard path, stderr, rc)."""
    cmd = [TPTT, "prepare-data", cfg] + list(extra)
    env = dict(os.environ)
    env.update(tu.MPI_ENV)
    if ranks:
        cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(ranks)] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    kit.no_crash(p, what)
    return p.stdout.strip(), p.stderr, p.returncode


def test_alpaca(tmp):
    good, bad, records = alpaca_oracle(ALPACA)
    check(len(good) >= 20 and len(bad) >= 5, "fixture: %d good, %d bad records" % (len(good), len(bad)))
    cfg = config(tmp, "alpaca", ALPACA, "alpaca", MISTRAL)
    shard, err, rc = prepare(cfg)
    if not check(rc == 0, "alpaca prepare-data", err):
        return
    # the documents against tokenize of the rendered prompt and the output
    prompts = [(PROMPT.replace("{instruction}", i).replace("{input}", x) if x else
                PROMPT_NI.replace("{instruction}", i)) for i, x, _ in good]
    p_ids = tokenize(MISTRAL, prompts)
    o_ids = tokenize(MISTRAL, [o for _, _, o in good])
    docs, masks = read_shard(shard)
    eq(len(docs), len(good), "alpaca: one document per good record")
    check(masks is not None, "alpaca shard has a label mask")
    bad_docs = [k for k in range(min(len(docs), len(good)))
                if docs[k] != [1] + p_ids[k] + o_ids[k] + [2]
                or masks[k] != [0] * (1 + len(p_ids[k])) + [1] * (len(o_ids[k]) + 1)]
    check(not bad_docs, "alpaca documents = [BOS] + prompt + output + [EOS], mask 0 then 1",
          "differ: %s" % bad_docs[:5])
    # the rows the trainer reads (pad: document k is row k): the labelled
    # positions are exactly those predicting the response tokens and EOS
    p = kit.run([TPTT, "make-shard", "--rows", "0:%d" % len(docs), "--seq-len", "512", "--packing", "pad", shard])
    if kit.succeeds(p, "make-shard --rows"):
        rows = json.loads(p.stdout)
        wrong = []
        for k in range(len(docs)):
            ids, lab = rows["input_ids"][k], rows["labels"][k]
            P, L = 1 + len(p_ids[k]), len(docs[k])
            got = [t for t in range(512) if lab[t] != -100]
            if got != list(range(P - 1, L - 1)) or any(lab[t] != ids[t + 1] for t in got) or ids[:L] != docs[k]:
                wrong.append(k)
        check(not wrong, "labels set exactly on the response positions", "rows %s" % wrong[:5])
    # bad records: count, lines, the first reason
    lines = ", ".join(str(n) for n in bad)
    want = "skipped %d bad records of %d in %s (lines %s): line %d: missing field 'output'" % (
        len(bad), records, ALPACA, lines, bad[0])
    check(want in err, "bad-record report", "want %r in:\n%s" % (want, err))
    side = json.load(open(shard[:-4] + ".json"))
    eq((side["records"], side["documents"], side["skipped"], side["bad_lines"]), (records, len(good), len(bad), bad),
       "sidecar counts")
    # abort mode: the first bad record, by line
    _, err, rc = prepare(cfg, extra=["--set", "data.bad_records=abort"], what="abort mode")
    want = "%s:%d: missing field 'output' (data.bad_records: abort" % (ALPACA, bad[0])
    check(rc == 1 and want in err, "abort mode names the first bad record", err)
    return shard


def test_chat(tmp):
    msgs = [[("system", "You are terse."), ("user", "Capital of France?"), ("assistant", "Paris.")],
            [("user", "2+2?"), ("assistant", "4"), ("user", "times 3?"), ("assistant", "12 — easy 😀")],
            [("user", "Say \"hi\" in 中文"), ("assistant", "你好")]]
    path = os.path.join(tmp, "chat.jsonl")
    with open(path, "w") as f:
        for m in msgs:
            f.write(json.dumps({"messages": [{"role": r, "content": c} for r, c in m]}) + "\n")
        f.write(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    shard, err, rc = prepare(config(tmp, "chat", path, "chat", QWEN))
    if not check(rc == 0, "chat prepare-data", err):
        return
    check("skipped 1 bad record of 4" in err and "line 4: messages[0].role is 'robot'" in err, "chat bad record", err)
    pieces, trained = [], []
    for m in msgs:
        for r, c in m:
            if r == "assistant":
                pieces += ["<|im_start|>assistant\n", c + "<|im_end|>\n"]
                trained += [0, 1]
            else:
                pieces.append("<|im_start|>%s\n%s<|im_end|>\n" % (r, c))
                trained.append(0)
    ids = tokenize(QWEN, pieces)
    docs, masks = read_shard(shard)
    k = 0
    want_docs, want_masks = [], []
    for m in msgs:
        d, mk = [], []
        for r, _c in m:
            for _i in range(2 if r == "assistant" else 1):
                d += ids[k]
                mk += [trained[k]] * len(ids[k])
                k += 1
        want_docs.append(d + [151645])  # EOS of Qwen3: <|im_end|>
        want_masks.append(mk + [1])
    eq(docs, want_docs, "chat documents")
    eq(masks, want_masks, "chat masks: assistant content and closing tag, EOS")


def test_text(tmp):
    txt = os.path.join(tmp, "notes.txt")
    body = "The first line.\r\n\nA paragraph\nof two lines.\n   \nLast — ünïcödé.\n"
    open(txt, "w", newline="").write(body)
    units = {"line": ["The first line.", "A paragraph", "of two lines.", "Last — ünïcödé."],
             "paragraph": ["The first line.", "A paragraph\nof two lines.", "Last — ünïcödé."],
             "document": [body]}
    for unit, texts in units.items():
        shard, err, rc = prepare(config(tmp, "txt-" + unit, txt, "text", MISTRAL, txt_unit=unit), what=unit)
        if check(rc == 0, ".txt %s" % unit, err):
            docs, masks = read_shard(shard)
            eq(docs, [[1] + ids + [2] for ids in tokenize(MISTRAL, texts)], ".txt %s documents" % unit)
            check(masks is None, ".txt: no label mask")
    jl = os.path.join(tmp, "text.jsonl")
    with open(jl, "w") as f:
        for t in ["alpha", "", "beta\u0000gamma", 7]:
            f.write(json.dumps({"content": t}) + "\n")
    shard, err, rc = prepare(config(tmp, "jsonl-text", jl, "text", MISTRAL, text_field="content", add_eos=False,
                                    add_bos="false"))
    if check(rc == 0, "text JSONL", err):
        docs, _ = read_shard(shard)
        eq(docs, tokenize(MISTRAL, ["alpha", "beta\u0000gamma"]), "text JSONL documents (no BOS, no EOS)")
        check("line 4: field 'content' is a number" in err, "text JSONL bad record", err)

    # eval.path is prepared too, with the training data's format and options: its shard on a second line
    ev = os.path.join(tmp, "held-out.txt")
    open(ev, "w").write("Held out one.\nHeld out two.\n")
    cfg = config(tmp, "txt-eval", txt, "text", MISTRAL, txt_unit="line")
    open(cfg, "a").write("eval: {path: %s}\n" % json.dumps(ev))
    out, err, rc = prepare(cfg, ranks=2, what="prepare-data with eval.path")
    lines = out.splitlines()
    if check(rc == 0 and len(lines) == 2, "eval.path: two shard paths printed", out + err):
        eq(read_shard(lines[0])[0], [[1] + ids + [2] for ids in tokenize(MISTRAL, units["line"])],
           "eval.path: the training shard unchanged")
        eq(read_shard(lines[1])[0], [[1] + ids + [2] for ids in tokenize(MISTRAL, ["Held out one.", "Held out two."])],
           "eval.path: its shard holds the held-out text, tokenized as the training data")


def test_ranks(tmp):
    # JSONL: the fixture; .txt paragraphs: 300 of them, so slices cut inside
    big = os.path.join(tmp, "big.txt")
    with open(big, "w") as f:
        for i in range(300):
            f.write("\n".join("paragraph %d line %d %s" % (i, j, "x" * (i % 7)) for j in range(1 + i % 4)))
            f.write("\n\n" if i % 5 else "\n \n\n")
    for name, path, fmt, extra in [("alpaca", ALPACA, "alpaca", {}),
                                   ("para", big, "text", {"txt_unit": "paragraph"})]:
        shards = {}
        for n in (1, 2, 3):
            cfg = config(tmp, "%s-r%d" % (name, n), path, fmt, MISTRAL, **extra)
            shard, err, rc = prepare(cfg, ranks=n, what="%s on %d ranks" % (name, n))
            if check(rc == 0, "%s on %d ranks" % (name, n), err):
                shards[n] = open(shard, "rb").read()
                if name == "alpaca":  # line numbers count the lines of the ranks before
                    eq(json.load(open(shard[:-4] + ".json"))["bad_lines"], alpaca_oracle(ALPACA)[1],
                       "alpaca on %d ranks: bad lines" % n)
                check(("on %d rank" % n) in err, "%s: log names %d ranks" % (name, n), err)
                left = [e for e in os.listdir(os.path.dirname(shard)) if not e.endswith((".tok", ".json"))]
                check(not left, "%s on %d ranks: no part or temporary files left" % (name, n), left)
        if len(shards) == 3:
            check(shards[1] == shards[2] == shards[3], "%s: 1, 2, 3 ranks give byte-identical shards" % name)
    docs, _ = read_shard(shard)
    eq(len(docs), 300, ".txt paragraphs: 300 documents")


def same_as_jsonl(tmp, name, records, fmt, tokdir, ranks, **data):
    """Build records as a JSON array on each number of ranks and as JSONL on
    one: the shards must be the same bytes; returns the array's sidecar."""
    arr, jl = os.path.join(tmp, name + ".json"), os.path.join(tmp, name + ".jsonl")
    with open(arr, "w") as f:
        f.write("\n" + json.dumps(records, indent=1))
    with open(jl, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    want, err, rc = prepare(config(tmp, name + "-jsonl", jl, fmt, tokdir, **data), what=name + " as JSONL")
    if not check(rc == 0, name + " as JSONL", err):
        return None
    side = None
    for n in ranks:
        shard, err, rc = prepare(config(tmp, "%s-r%d" % (name, n), arr, fmt, tokdir, **data), ranks=n,
                                 what="%s as a JSON array on %d ranks" % (name, n))
        if check(rc == 0 and "a JSON array" in err, "%s as a JSON array on %d ranks" % (name, n), err):
            check(open(shard, "rb").read() == open(want, "rb").read(),
                  "%s: the JSON array on %d ranks gives the JSONL shard" % (name, n))
            side = json.load(open(shard[:-4] + ".json"))
    return side


def test_json_array(tmp):
    # the Alpaca fixture's records that are JSON at all (the others cannot sit in an array)
    recs = []
    for raw in open(ALPACA, "rb").read().split(b"\n"):
        try:
            recs.append(json.loads(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError):
            pass
    recs *= 3  # so the slices of 2 and 3 ranks hold bad and good records
    bad = [k + 1 for k, r in enumerate(recs) if not (isinstance(r, dict) and isinstance(r.get("instruction"), str)
                                                     and isinstance(r.get("output"), str))]
    # (one rank: tests/test_textdata.c; the tokenizers loaded here are Mistral's,
    # which loads in 6 s under ASan, Qwen3's in 30 s)
    side = same_as_jsonl(tmp, "arr-alpaca", recs, "alpaca", MISTRAL, ranks=(2, 3))
    if side:
        eq((side["records"], side["skipped"], side["bad_records"]), (len(recs), len(bad), bad[:10]),
           "JSON array sidecar: counts and record numbers")
        check(side["first_bad"].startswith("record %d: " % bad[0]) and "bad_lines" not in side,
              "JSON array sidecar: records, not lines", side)
    chats = [{"messages": [{"role": "user", "content": "Q%d" % i}, {"role": "assistant", "content": "A %d" % i}]}
             for i in range(7)] + [{"messages": []}]
    same_as_jsonl(tmp, "arr-chat", chats, "chat", MISTRAL, ranks=(3,))
    texts = [{"text": "t%d" % i} for i in range(5)] + [{"text": ""}, {"text": 3}]
    same_as_jsonl(tmp, "arr-text", texts, "text", MISTRAL, ranks=(2,))
    # abort mode names the record; a broken file gives line and column on every rank count
    arr = os.path.join(tmp, "arr-alpaca.json")
    _, err, rc = prepare(config(tmp, "arr-abort", arr, "alpaca", MISTRAL, bad_records="abort"), ranks=2)
    want = "%s: record %d: missing field 'output' (data.bad_records: abort" % (arr, bad[0])
    check(rc == 1 and want in err, "JSON array abort mode names the record", err)
    broken = os.path.join(tmp, "broken.json")
    open(broken, "w").write('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c", "output": }\n]\n')
    _, err, rc = prepare(config(tmp, "broken", broken, "alpaca", MISTRAL), ranks=2)
    check(rc == 1 and err.count("%s:3:" % broken) == 1 and "not valid JSON" in err,
          "broken JSON array on 2 ranks: one error with line and column", err)


def test_cache(tmp):
    src = os.path.join(tmp, "mine.jsonl")
    shutil.copy(ALPACA, src)
    cfg = config(tmp, "cache", src, "alpaca", MISTRAL)
    s1, err1, rc1 = prepare(cfg)
    if not check(rc1 == 0 and "tokenizing" in err1, "cache: first build", err1):
        return
    m1, ms1 = os.stat(s1).st_mtime_ns, os.stat(s1[:-4] + ".json").st_mtime_ns
    s2, err2, rc2 = prepare(cfg)
    check(rc2 == 0 and s2 == s1 and "reusing cached shard %s" % s1 in err2 and "tokenizing" not in err2,
          "cache: second run reuses", err2)
    check(os.stat(s1).st_mtime_ns == m1 and os.stat(s1[:-4] + ".json").st_mtime_ns == ms1,
          "cache: shard and sidecar untouched")
    s3, err3, rc3 = prepare(cfg, extra=["--set", "data.alpaca.prompt_no_input='### {instruction}\n'"])
    check(rc3 == 0 and s3 != s1 and "tokenizing" in err3, "cache: a template change rebuilds", err3)
    with open(src, "a") as f:
        f.write(json.dumps({"instruction": "One more.", "output": "Sure."}) + "\n")
    s4, err4, rc4 = prepare(cfg)
    check(rc4 == 0 and s4 not in (s1, s3) and "tokenizing" in err4, "cache: a changed source rebuilds", err4)
    if rc4 == 0:
        eq(len(read_shard(s4)[0]), len(read_shard(s1)[0]) + 1, "cache: the rebuilt shard has the new record")
    # two jobs at once on one cache directory: both succeed, one valid shard, nothing left over
    shared = os.path.join(tmp, "shared-cache")
    env = dict(os.environ)
    env.update(tu.MPI_ENV)
    jobs = [subprocess.Popen(["mpirun", "--oversubscribe", "--bind-to", "none", "-np", "2", TPTT, "prepare-data", cfg,
                              "--set", "data.cache_dir=" + shared], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env) for _ in range(3)]
    outs = [j.communicate(timeout=300) for j in jobs]
    check(all(j.returncode == 0 for j in jobs), "concurrent jobs sharing a cache succeed", [o[1][-500:] for o in outs])
    paths = set(o[0].strip() for o in outs)
    check(len(paths) == 1 and open(paths.pop(), "rb").read() == open(s4, "rb").read(),
          "concurrent jobs: one shard, the same bytes")
    eq(sorted(e.rsplit(".", 1)[1] for e in os.listdir(shared)), ["json", "tok"], "concurrent jobs: nothing left over")


def main():
    tmp = tempfile.mkdtemp(prefix="tptt-textdata-")
    try:
        for fn in (test_alpaca, test_chat, test_text, test_ranks, test_json_array, test_cache):
            kit.call(fn, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
