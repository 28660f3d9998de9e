"""test_make_shard - `tptt make-shard` (docs/data.md).

Shards written by --bytes and --jsonl are parsed here independently of the C
reader (header, tokens, doc_offsets, label mask, zero padding, exact size) and
compared with what the inputs should give; --info's counts and row numbers are
checked against a small packer written here; bad inputs must fail with exit 1
and exactly one stderr line naming the file (and the line number for JSONL),
leaving no output or temporary file behind.

Environment: TPTT (path to the tptt binary). MAKE_SHARD_VERBOSE=1 prints every
error message. Last line: "test_make_shard: N passed, N failed".
"""
import json
import os
import struct
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
import testkit  # noqa: E402
from testkit import crash_reason  # noqa: E402

NAME = "test_make_shard"
TPTT = os.environ.get("TPTT", "tptt")
VERBOSE = bool(os.environ.get("MAKE_SHARD_VERBOSE"))

kit = testkit.Checker(NAME)
check = kit.check


def run(args):
    """Run `tptt ARGS...`."""
    return kit.run([TPTT] + list(args))


def expect_ok(args, what):
    p = run(args)
    kit.succeeds(p, what + ": succeeds")
    return p.stdout.decode("utf-8", "replace")


def expect_error(args, what, names, keywords, code=1):
    """exit `code`, exactly one stderr line, containing every string in names
    and keywords (case-insensitive)."""
    p = run(args)
    err = p.stderr.decode("utf-8", "replace")
    if VERBOSE:
        print("[%s] exit %d: %s" % (what, p.returncode, err.rstrip("\n")), flush=True)
    kit.no_crash(p, what)
    check(p.returncode == code, what + ": exit %d" % code, "got %d, stderr: %s" % (p.returncode, err.strip()[:500]))
    lines = err.rstrip("\n").split("\n")
    check(len(lines) == 1 and lines[0], what + ": one line on stderr", repr(err[:500]))
    low = err.lower()
    for k in list(names) + list(keywords):
        check(str(k).lower() in low, what + ": message mentions %r" % k, err.strip()[:500])
    return err


# ---- the format, parsed independently --------------------------------------

def parse_shard(path):
    b = open(path, "rb").read()
    if not check(len(b) >= 48, "%s: at least the 48-byte header" % path):
        return None
    magic, version, flags, nt, nd, vocab, reserved = struct.unpack_from("<8sIIQQQQ", b, 0)
    check(magic == b"TPTTTOK1", "magic", repr(magic))
    check(version == 1, "version 1", str(version))
    check(flags in (0, 1), "flags", str(flags))
    check(reserved == 0, "reserved 0")
    tok_sec = (4 * nt + 7) // 8 * 8
    off_at = 48 + tok_sec
    mask_at = off_at + 8 * (nd + 1)
    end = mask_at + ((nt + 7) // 8 * 8 if flags & 1 else 0)
    if not check(end == len(b), "file size = header + sections", "%d != %d" % (end, len(b))):
        return None
    toks = list(struct.unpack_from("<%dI" % nt, b, 48))
    check(b[48 + 4 * nt:off_at] == b"\0" * (off_at - 48 - 4 * nt), "zero padding after tokens")
    offs = list(struct.unpack_from("<%dQ" % (nd + 1), b, off_at))
    check(offs[0] == 0 and offs[-1] == nt and all(offs[i] <= offs[i + 1] for i in range(nd)), "doc_offsets", str(offs))
    mask = None
    if flags & 1:
        mask = list(b[mask_at:mask_at + nt])
        check(b[mask_at + nt:end] == b"\0" * (end - mask_at - nt), "zero padding after label_mask")
    docs = [toks[offs[i]:offs[i + 1]] for i in range(nd)]
    masks = [mask[offs[i]:offs[i + 1]] for i in range(nd)] if mask is not None else None
    return {"flags": flags, "n_tokens": nt, "n_docs": nd, "vocab": vocab, "docs": docs, "masks": masks}


def blank_docs(data):
    """Documents of a byte string separated by blank lines (lines of only
    whitespace); each document keeps its lines' newlines."""
    docs, cur = [], b""
    parts = data.split(b"\n")
    lines = [x + b"\n" for x in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    for line in lines:
        if line.strip() == b"":
            if cur:
                docs.append(cur)
            cur = b""
        else:
            cur += line
    if cur:
        docs.append(cur)
    return docs


def line_docs(data):
    out = []
    for line in data.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line:
            out.append(line)
    return out


def rows_for(docs, seq_len, drop):
    total = sum(len(d) for d in docs if d and not (drop and len(d) > seq_len))
    return (total + seq_len - 1) // seq_len


def ref_rows(docs, masks, T, pad, drop):
    """Rows per docs/data.md as a `tptt dump` batch: the kept documents as one
    stream (pad: each followed by padding to a multiple of T, a document of
    its own), cut every T, the last row padded."""
    st = []  # (token, document, mask)
    for d, (doc, m) in enumerate(zip(docs, masks)):
        if not doc or (drop and len(doc) > T):
            continue
        st += [(t, d, b) for t, b in zip(doc, m)]
        while pad and len(st) % T:
            st.append((0, -1 - d, 0))
    while len(st) % T:
        st.append((0, "end", 0))
    out = {"input_ids": [], "labels": [], "doc_starts": []}
    for r in range(len(st) // T):
        row = st[r * T:(r + 1) * T]
        ds = [0] * T
        for t in range(1, T):
            ds[t] = t if row[t][1] != row[t - 1][1] else ds[t - 1]
        out["input_ids"].append([x[0] for x in row])
        out["labels"].append([row[t + 1][0] if t + 1 < T and row[t + 1][1] == row[t][1] and row[t + 1][2] else -100
                              for t in range(T)])
        out["doc_starts"].append(sorted(set(ds)))
    return out


def leftovers(d):
    return [f for f in os.listdir(d) if ".part." in f or ".tmp." in f]


def main():
    tmp = tempfile.mkdtemp(prefix="tptt-make-shard-")
    P = lambda *n: os.path.join(tmp, *n)  # noqa: E731

    def write(name, data):
        with open(P(name), "wb") as f:
            f.write(data)
        return P(name)

    # ---- --bytes, blank-line documents (default) ----------------------------
    a = (b"Hello world.\nsecond line\n\n\n  \t\nNew doc with trailing space \n"
         b"\x00\xff binary bytes\n\r\nthird\nlast line without newline")
    b = b"\n\nfile two starts after blank lines\n\nand ends with a blank line\n\n"
    fa, fb = write("a.txt", a), write("b.txt", b)
    out = expect_ok(["make-shard", "--bytes", "-o", P("t.tok"), fa, fb], "bytes blank")
    want = blank_docs(a) + blank_docs(b)
    check(len(want) == 5, "test's own splitter: 5 documents", str(want))
    ntok = sum(len(d) for d in want)
    check(out.strip() == "wrote %s: %d documents, %d tokens" % (P("t.tok"), len(want), ntok), "bytes: stdout",
          out.strip())
    s = parse_shard(P("t.tok"))
    if s:
        check(s["flags"] == 0 and s["masks"] is None, "bytes: no label mask")
        check(s["vocab"] == 256, "bytes: vocab_hint 256", str(s["vocab"]))
        check(s["docs"] == [list(d) for d in want], "bytes: tokens = bytes, documents split at blank lines",
              "%r" % [bytes(d) for d in s["docs"]])
    check(leftovers(tmp) == [], "bytes: no temporary files", str(leftovers(tmp)))

    # ---- --doc-sep line / file ------------------------------------------------
    expect_ok(["make-shard", "--bytes", "--doc-sep", "line", "-o", P("l.tok"), fa, fb], "bytes line")
    s = parse_shard(P("l.tok"))
    want = line_docs(a) + line_docs(b)
    if s:
        check(s["docs"] == [list(d) for d in want], "bytes line: one document per non-empty line",
              "%r" % [bytes(d) for d in s["docs"]])
    fe = write("empty.txt", b"")
    allbytes = write("all.bin", bytes(range(256)) + b"\n\n" + bytes(range(255, -1, -1)))
    expect_ok(["make-shard", "--bytes", "--doc-sep", "file", "-o", P("f.tok"), fa, fe, allbytes, fb], "bytes file")
    s = parse_shard(P("f.tok"))
    if s:
        check(s["docs"] == [list(a), list(open(allbytes, "rb").read()), list(b)],
              "bytes file: one document per non-empty file, exact bytes")
        check(s["vocab"] == 256, "bytes file: vocab_hint 256")
    expect_ok(["make-shard", "--bytes", "--vocab", "300", "-o", P("v.tok"), fa], "bytes --vocab 300")
    s = parse_shard(P("v.tok"))
    if s:
        check(s["vocab"] == 300, "bytes --vocab: vocab_hint 300", str(s["vocab"]))
        check(s["docs"] == [list(d) for d in blank_docs(a)], "bytes --vocab: same tokens")
    info = expect_ok(["make-shard", "--info", P("v.tok")], "info after --vocab (C reader accepts the patched header)")
    check("vocab_hint   300 (largest token id 255)" in info, "info: vocab_hint line", info)

    # ---- --jsonl ----------------------------------------------------------------
    jl = write("m.jsonl", b'{"ids": [1, 2, 3], "mask": [1, 0, 1]}\n'
                          b'{"ids": [7]}\n'
                          b'\n'
                          b'{"ids": [], "mask": []}\n'
                          b'  {"mask": [true, false], "ids": [100000, 5]}  \n'
                          b'{"ids":[4,4,4,4,4,4,4,4,4]}')
    out = expect_ok(["make-shard", "--jsonl", "-o", P("m.tok"), jl], "jsonl with masks")
    check(out.strip() == "wrote %s: 5 documents, 15 tokens" % P("m.tok"), "jsonl: stdout", out.strip())
    s = parse_shard(P("m.tok"))
    if s:
        check(s["flags"] == 1, "jsonl: label mask flag")
        check(s["docs"] == [[1, 2, 3], [7], [], [100000, 5], [4] * 9], "jsonl: documents", str(s["docs"]))
        check(s["masks"] == [[1, 0, 1], [1], [], [1, 0], [1] * 9], "jsonl: masks (missing = all 1)", str(s["masks"]))
        check(s["vocab"] == 100001, "jsonl: vocab_hint = max id + 1", str(s["vocab"]))
    info = expect_ok(["make-shard", "--info", "--seq-len", "4", P("m.tok")], "info --seq-len 4")
    docs = [[1, 2, 3], [7], [], [100000, 5], [4] * 9]
    for line in ["format       TPTTTOK1 version 1, flags 0x1 (label mask)",
                 "tokens       15",
                 "documents    5 (1 empty, longest 9 tokens, 1 longer than 4)",
                 "vocab_hint   100001 (largest token id 100000)",
                 "label mask   2 of 15 tokens are not trained on (mask 0)",
                 "rows         %d at seq_len 4 with long_docs=split, %d with long_docs=drop" % (
                     rows_for(docs, 4, False), rows_for(docs, 4, True))]:
        check(line in info, "info shows %r" % line, info)
    pad_rows = [sum((len(d) + 3) // 4 for d in docs if d and not (drop and len(d) > 4)) for drop in (0, 1)]
    line = "padded rows  %d with long_docs=split, %d with long_docs=drop (packing=pad)" % tuple(pad_rows)
    check(line in info, "info shows %r" % line, info)
    # --rows: what the trainer reads, in every packing, against the reference
    masks = [[1, 0, 1], [1], [], [1, 0], [1] * 9]
    for pad in (0, 1):
        for drop in (0, 1):
            want = ref_rows(docs, masks, 4, pad, drop)
            n = len(want["input_ids"])
            args = ["--packing", "pad" if pad else "pack", "--long-docs", "drop" if drop else "split"]
            out = expect_ok(["make-shard", "--rows", "0:%d" % n, "--seq-len", "4"] + args + [P("m.tok")],
                            "--rows pad=%d drop=%d" % (pad, drop))
            check(out and json.loads(out) == want, "--rows pad=%d drop=%d equals the reference" % (pad, drop),
                  "%s\nwant %s" % (out.strip(), json.dumps(want)))
            out = expect_ok(["make-shard", "--rows", str(n - 1), "--seq-len", "4"] + args + [P("m.tok")],
                            "--rows LAST")
            check(out and json.loads(out)["input_ids"] == want["input_ids"][-1:], "--rows LAST: one row")
            expect_error(["make-shard", "--rows", "0:%d" % (n + 1), "--seq-len", "4"] + args + [P("m.tok")],
                         "--rows past the end", [P("m.tok")], ["rows 0..%d asked for" % n, "%d rows" % n])
    for bad in (["--rows", "x"], ["--rows", "1:0"], ["--rows", "0", "--packing", "tight"], ["--packing", "pad"]):
        p = run(["make-shard"] + bad + [P("m.tok")])
        check(p.returncode == 2 and not testkit.crashed(p), "usage error: %s" % bad, testkit.stderr_text(p))
    info = expect_ok(["make-shard", "--info", "--seq-len", "1", P("m.tok")], "info --seq-len 1")
    check("15 at seq_len 1 with long_docs=split, 1 with long_docs=drop" in info, "info: rows at seq_len 1", info)
    info = expect_ok(["make-shard", "--info", "--seq-len", "1", P("t.tok")], "info, every document dropped")
    check("rows         %d at seq_len 1 with long_docs=split, 0 with long_docs=drop" % ntok in info,
          "info: 0 rows with drop", info)
    check("flags 0x0 (no label mask)" in info and "label mask " not in info.replace("(no label mask)", ""),
          "info: no mask line for an unmasked shard", info)

    nomask = write("n.jsonl", b'{"ids": [5, 6]}\n{"ids": [9]}\n')
    expect_ok(["make-shard", "--jsonl", "--vocab", "1000", "-o", P("n.tok"), nomask], "jsonl without masks")
    s = parse_shard(P("n.tok"))
    if s:
        check(s["flags"] == 0 and s["docs"] == [[5, 6], [9]], "jsonl without masks: flags 0, documents")
        check(s["vocab"] == 1000, "jsonl --vocab 1000", str(s["vocab"]))
    check(leftovers(tmp) == [], "no temporary files after successes", str(leftovers(tmp)))

    # ---- bad inputs ----------------------------------------------------------------
    before = open(P("n.tok"), "rb").read()
    missing = P("no-such-file.txt")
    expect_error(["make-shard", "--bytes", "-o", P("x.tok"), fa, missing], "missing input", [missing],
                 ["cannot open"])
    check(not os.path.exists(P("x.tok")), "missing input: no output written")
    bad_lines = [
        (b'{"ids": [1, 2', "not valid JSON"),
        (b'[1, 2, 3]', "expected a JSON object"),
        (b'{"ids": [1, -2]}', "ids[1]"),
        (b'{"ids": [1, 2.5]}', "ids[1]"),
        (b'{"ids": ["a"]}', "ids[0]"),
        (b'{"ids": [2147483648]}', "ids[0]"),
        (b'{"ids": 5}', "not an array"),
        (b'{"mask": [1]}', "missing \"ids\""),
        (b'{"ids": [1, 2], "mask": [1]}', "1 entries"),
        (b'{"ids": [1, 2], "mask": [1, 2]}', "mask[1]"),
        (b'{"ids": [1], "text": "x"}', "unknown key"),
        (b'{"ids": [1], "ids": [2]}', "duplicate"),
        (b'{"ids": [1]} x', "trailing"),
    ]
    for i, (line, kw) in enumerate(bad_lines):
        f = write("bad%d.jsonl" % i, b'{"ids": [1, 2]}\n\n' + line + b'\n{"ids": [3]}\n')
        expect_error(["make-shard", "--jsonl", "-o", P("n.tok"), f], "bad JSONL %r" % line, [f + ":3:"], [kw])
    f = write("vocab.jsonl", b'{"ids": [1, 2]}\n{"ids": [1, 2000]}\n')
    expect_error(["make-shard", "--jsonl", "--vocab", "1000", "-o", P("n.tok"), f], "jsonl id >= --vocab",
                 [f + ":2:"], ["--vocab 1000"])
    expect_error(["make-shard", "--bytes", "--vocab", "100", "-o", P("n.tok"), fa], "byte >= --vocab", [fa + ":1:"],
                 ["--vocab 100"])
    blanks = write("blank.txt", b"\n  \n\t\n")
    expect_error(["make-shard", "--bytes", "-o", P("n.tok"), blanks], "no tokens", [P("n.tok")], ["no tokens"])
    check(open(P("n.tok"), "rb").read() == before, "failed runs leave an existing output untouched")
    expect_error(["make-shard", "--bytes", "-o", P("nodir", "x.tok"), fa], "output directory missing",
                 [P("nodir")], ["cannot create"])
    check(leftovers(tmp) == [], "no temporary files after failures", str(leftovers(tmp)))

    # --info on broken shards
    good = open(P("m.tok"), "rb").read()
    write("trunc.tok", good[:-8])
    expect_error(["make-shard", "--info", P("trunc.tok")], "info truncated", [P("trunc.tok")], ["file holds"])
    expect_error(["make-shard", "--info", fa], "info on text", [fa], ["magic"])
    write("short.tok", good[:20])
    expect_error(["make-shard", "--info", P("short.tok")], "info short", [P("short.tok")], ["shorter"])
    bad = bytearray(good)
    struct.pack_into("<Q", bad, 24, 1 << 62)
    write("ndocs.tok", bytes(bad))
    expect_error(["make-shard", "--info", P("ndocs.tok")], "info n_docs overflow", [P("ndocs.tok")], ["overflow"])
    expect_error(["make-shard", "--info", missing], "info missing", [missing], ["cannot open"])

    # usage errors: exit 2
    for args, what in [([], "no mode"), (["--bytes", fa], "no -o"), (["--bytes", "-o", P("u.tok")], "no input"),
                       (["--bytes", "--jsonl", "-o", P("u.tok"), fa], "two modes"),
                       (["--bytes", "--doc-sep", "para", "-o", P("u.tok"), fa], "bad --doc-sep"),
                       (["--jsonl", "--doc-sep", "line", "-o", P("u.tok"), jl], "--doc-sep with --jsonl"),
                       (["--bytes", "--vocab", "0", "-o", P("u.tok"), fa], "--vocab 0"),
                       (["--info", P("m.tok"), P("t.tok")], "--info two files"),
                       (["--bogus"], "unknown option")]:
        p = run(["make-shard"] + args)
        check(p.returncode == 2 and crash_reason(p) is None, "usage error %s: exit 2" % what,
              "exit %d: %s" % (p.returncode, p.stderr.decode("utf-8", "replace")[:300]))
    p = run(["make-shard", "--help"])
    check(p.returncode == 0 and b"--doc-sep" in p.stdout, "--help")
    p = run(["help"])
    check(b"make-shard" in p.stdout, "tptt help lists make-shard")

    for f in os.listdir(tmp):
        os.unlink(P(f))
    os.rmdir(tmp)
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
