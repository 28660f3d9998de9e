"""test_bad_input - malformed safetensors files and model directories are
rejected cleanly.

Every case builds a corrupt input from a valid one, runs `st_tool ls FILE`
(raw safetensors files) or `tptt inspect DIR` (model directories) and checks:
exit code 1, exactly ONE non-empty line on stderr, the line names the
offending file (full path or basename) and contains keywords for the problem
(and the tensor name where there is one), and no crash (signal, sanitizer
report, unexpected exit code). Positive controls: the unmodified file and
model directories succeed.

Environment: TPTT, TPTT_ST_TOOL. Set BAD_INPUT_VERBOSE=1 to print every
message. Prints "test_bad_input: N passed, N failed".
"""
import json
import os
import shutil
import struct
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
import safetensors_np as stnp  # noqa: E402
import testkit  # noqa: E402

NAME = "test_bad_input"
TPTT = os.environ.get("TPTT", "tptt")
ST_TOOL = os.environ.get("TPTT_ST_TOOL", "st_tool")
VERBOSE = bool(os.environ.get("BAD_INPUT_VERBOSE"))

kit = testkit.Checker(NAME)
check = kit.check
run = kit.run


def expect_ok(args, what):
    kit.succeeds(run(args), what + ": succeeds")


def expect_error(args, what, path, keywords):
    """args must exit 1 with exactly one stderr line naming `path` (full path or
    basename) and containing every keyword (case-insensitive; a keyword may be
    a tuple of alternatives)."""
    p = run(args)
    err = p.stderr.decode("utf-8", "replace")
    lines = err.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if VERBOSE:
        print("[%s] exit %d: %s" % (what, p.returncode, err.rstrip("\n")), flush=True)
    if not kit.no_crash(p, what):
        return
    check(p.returncode == 1, what + ": exit code 1", "got %d, stderr %r" % (p.returncode, err.strip()[:300]))
    if not check(len(lines) == 1 and lines[0].strip() != "", what + ": exactly one non-empty stderr line",
                 "got %d lines: %r" % (len(lines), err[:500])):
        return
    line = lines[0]
    low = line.lower()
    check(str(path) in line or os.path.basename(str(path)) in line, what + ": message names the file",
          "%r not in %r" % (os.path.basename(str(path)), line))
    for k in keywords:
        alts = k if isinstance(k, tuple) else (k,)
        check(any(a.lower() in low for a in alts), what + ": message mentions %s" % " or ".join(map(repr, alts)),
              repr(line))


# ---------------------------------------------------------------- raw files

def raw_file(path, header, data=b"", n=None, pad=True):
    """Write a safetensors image by hand: header is a dict (dumped compactly),
    str or bytes; n overrides the length field."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    if isinstance(header, str):
        header = header.encode("utf-8")
    if pad:
        header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header) if n is None else n))
        f.write(header)
        f.write(data)


def t(dtype, shape, b, e):
    return {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}


# alpha F32 [2,3] = 24 bytes, beta.weight BF16 [4] = 8 bytes, gamma F16 [3] = 6 bytes
GOOD = {"__metadata__": {"format": "pt"}, "alpha": t("F32", [2, 3], 0, 24),
        "beta.weight": t("BF16", [4], 24, 32), "gamma": t("F16", [3], 32, 38)}


def with_entries(**changes):
    h = json.loads(json.dumps(GOOD))
    for k, v in changes.items():
        k = k.replace("__", ".") if k != "__metadata__" else k
        if v is None:
            h.pop(k, None)
        else:
            h[k] = v
    return h


def file_cases(tmp):
    good = os.path.join(tmp, "good.safetensors")
    stnp.save(good, {"alpha": ("F32", np.arange(6, dtype=np.float32).reshape(2, 3)),
                     "beta.weight": ("BF16", np.array([1, 2, 3, 4], np.float32)),
                     "gamma": ("F16", np.array([0.5, -1, 2], np.float16))}, {"format": "pt"})
    expect_ok([ST_TOOL, "ls", good], "control: valid file")
    good_hand = os.path.join(tmp, "good_hand.safetensors")
    raw_file(good_hand, GOOD, bytes(38))
    expect_ok([ST_TOOL, "ls", good_hand], "control: hand-built valid file")
    with open(good, "rb") as f:
        blob = f.read()

    cases = []  # (label, file name, writer(path), keywords)

    def blob_case(label, fname, data, kw):
        def w(p):
            with open(p, "wb") as f:
                f.write(data)
        cases.append((label, fname, w, kw))

    def hdr_case(label, fname, header, data=b"", kw=(), n=None, pad=True):
        cases.append((label, fname, lambda p: raw_file(p, header, data, n, pad), kw))

    size_kw = ("size", "truncat", "short", "end of file", "past", "eof")
    blob_case("truncated mid-data", "trunc_data.safetensors", blob[:-5], [size_kw])
    blob_case("truncated to 5 bytes", "trunc5.safetensors", blob[:5], [size_kw])
    blob_case("empty file", "empty.safetensors", b"", [size_kw + ("empty",)])
    (n,) = struct.unpack("<Q", blob[:8])
    blob_case("truncated inside header", "trunc_hdr.safetensors", blob[:8 + n // 2], ["header", size_kw])
    blob_case("header length past EOF", "hdr_past_eof.safetensors",
              struct.pack("<Q", len(blob)) + blob[8:], ["header", size_kw])
    blob_case("header length > 100 MB", "hdr_huge.safetensors",
              struct.pack("<Q", 100_000_001) + blob[8:], ["header", ("100", "limit", "too large", "exceed")])
    blob_case("header length 2^64-1", "hdr_max.safetensors",
              b"\xff" * 8 + blob[8:], ["header", ("100", "limit", "too large", "exceed")])
    blob_case("trailing bytes after last tensor", "trailing.safetensors", blob + b"\0" * 3,
              [("size", "trailing", "extra")])
    hdr_case("overlapping offsets", "overlap.safetensors",
             with_entries(beta__weight=t("BF16", [4], 20, 28), gamma=t("F16", [3], 28, 34)), bytes(34),
             [("overlap",), ("beta.weight", "alpha")])
    hdr_case("gapped offsets", "gap.safetensors",
             with_entries(beta__weight=t("BF16", [4], 28, 36), gamma=t("F16", [3], 36, 42)), bytes(42),
             [("gap",), ("beta.weight", "alpha")])
    hdr_case("offsets not starting at 0", "not_zero.safetensors",
             with_entries(alpha=t("F32", [2, 3], 4, 28), beta__weight=t("BF16", [4], 28, 36),
                          gamma=t("F16", [3], 36, 42)), bytes(42), [("gap", "start", " 0"), "alpha"])
    hdr_case("end before begin", "backwards.safetensors",
             with_entries(gamma=t("F16", [3], 38, 32)), bytes(38), ["gamma", ("offset", "size")])
    hdr_case("size/shape mismatch", "size_mismatch.safetensors",
             with_entries(alpha=t("F32", [2, 4], 0, 24)), bytes(38), ["alpha", ("size", "bytes", "shape")])
    hdr_case("unknown dtype F17", "f17.safetensors",
             with_entries(beta__weight=t("F17", [4], 24, 32)), bytes(38), ["beta.weight", "F17", "dtype"])
    hdr_case("unsupported dtype I64", "i64.safetensors",
             {"alpha": t("F32", [2, 3], 0, 24), "idx": t("I64", [2], 24, 40)}, bytes(40),
             ["idx", "I64", ("not supported", "unsupported")])
    dup = ('{"alpha":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},'
           '"alpha":{"dtype":"F32","shape":[2,3],"data_offsets":[24,48]}}')
    hdr_case("duplicate tensor names", "dup.safetensors", dup, bytes(48), ["alpha", "duplicate"])
    dup0 = ('{"z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
            '"z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}')
    hdr_case("duplicate zero-size tensor names", "dup0.safetensors", dup0, b"", ["'z'", "duplicate"])
    good_text = json.dumps(GOOD, separators=(",", ":")).encode()
    for label, bad in (("0xff byte", b"\xff"), ("truncated sequence", b"\xc3"), ("overlong '/'", b"\xc0\xaf"),
                       ("UTF-16 surrogate", b"\xed\xa0\x80"), ("code point > U+10FFFF", b"\xf4\x90\x80\x80")):
        hdr_case("invalid UTF-8 in header (%s)" % label, "utf8_%d.safetensors" % len(cases),
                 good_text.replace(b'"alpha"', b'"al' + bad + b'pha"'), bytes(38), [("utf-8", "utf8")])
    hdr_case("invalid UTF-8 in metadata value", "utf8_meta.safetensors",
             good_text.replace(b'"pt"', b'"p\xfet"'), bytes(38), [("utf-8", "utf8")])
    hdr_case("broken JSON header", "broken_json.safetensors",
             good_text[:len(good_text) // 2], bytes(38), ["json"])
    hdr_case("header JSON is an array", "array.safetensors", "[1,2,3]", b"", [("object", "json")])
    hdr_case("header JSON is a string", "string.safetensors", '"hello"', b"", [("object", "json")])
    hdr_case("header all spaces", "spaces.safetensors", " " * 16, b"", ["json"])
    hdr_case("raw NUL inside a tensor name (invalid JSON)", "nul_name.safetensors",
             b'{"al\x00pha":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4),
             [("json", "nul", "control")])
    hdr_case("raw newline inside a tensor name (invalid JSON)", "nl_name.safetensors",
             b'{"al\npha":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4),
             [("json", "control", "newline")])
    hdr_case("escaped \\u0000 inside a tensor name (name cannot be represented)", "u0000_name.safetensors",
             b'{"al\\u0000pha":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4),
             [("nul", "u0000", "control", "name")])
    hdr_case("duplicate field inside a tensor entry", "dup_field.safetensors",
             b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"dtype":"F16"}}', bytes(4),
             ["duplicate", "dtype"])
    hdr_case("trailing garbage after the header JSON", "hdr_garbage.safetensors",
             b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} xx', bytes(4), [("trailing", "json")])
    hdr_case("duplicate __metadata__", "dup_meta.safetensors",
             b'{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
             b'"__metadata__":{"k":"w"}}', bytes(4), ["duplicate", "__metadata__"])
    hdr_case("duplicate metadata key", "dup_meta_key.safetensors",
             b'{"__metadata__":{"k":"v","k":"w"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
             bytes(4), ["duplicate", "'k'"])
    hdr_case("zero-size tensor placed past the data", "zero_past.safetensors",
             {"z": t("F32", [0], 8, 8), "a": t("F32", [1], 0, 4)}, bytes(4), ["'z'", ("gap", "offset")])
    hdr_case("data_offsets is a string", "offs_str.safetensors",
             with_entries(alpha={"dtype": "F32", "shape": [2, 3], "data_offsets": "0,24"}), bytes(38),
             ["alpha", "data_offsets"])
    hdr_case("data_offsets has a string element", "offs_str2.safetensors",
             with_entries(alpha={"dtype": "F32", "shape": [2, 3], "data_offsets": [0, "24"]}), bytes(38),
             ["alpha", "data_offsets"])
    hdr_case("data_offsets has three elements", "offs_3.safetensors",
             with_entries(alpha={"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24, 48]}), bytes(38),
             ["alpha", "data_offsets"])
    hdr_case("data_offsets fractional", "offs_frac.safetensors",
             with_entries(gamma={"dtype": "F16", "shape": [3], "data_offsets": [32, 38.5]}), bytes(38),
             ["gamma", ("data_offsets", "integer")])
    hdr_case("data_offsets negative", "offs_neg.safetensors",
             with_entries(alpha=t("F32", [2, 3], -24, 0)), bytes(38), ["alpha", ("data_offsets", "negative")])
    hdr_case("data_offsets beyond 2^64", "offs_huge.safetensors",
             good_text.replace(b"[32,38]", b"[32,1e300]"), bytes(38), ["gamma", ("data_offsets", "offset")])
    hdr_case("negative shape", "neg_shape.safetensors",
             with_entries(alpha=t("F32", [-2, -3], 0, 24)), bytes(38), ["alpha", ("negative", "shape")])
    hdr_case("shape not a list", "shape_str.safetensors",
             with_entries(alpha={"dtype": "F32", "shape": "2x3", "data_offsets": [0, 24]}), bytes(38),
             ["alpha", "shape"])
    hdr_case("fractional dimension", "shape_frac.safetensors",
             with_entries(alpha={"dtype": "F32", "shape": [2.5, 2.4], "data_offsets": [0, 24]}), bytes(38),
             ["alpha", "shape"])
    hdr_case("shape overflow (2^32 x 2^32, wraps to 0)", "overflow1.safetensors",
             {"big": t("F32", [2 ** 32, 2 ** 32], 0, 0)}, b"", ["big", ("overflow", "too large", "shape")])
    hdr_case("shape overflow (2^62 x 4 F32)", "overflow2.safetensors",
             {"big": t("F32", [2 ** 62, 1], 0, 0), "a": t("F32", [1], 0, 4)}, bytes(4),
             ["big", ("overflow", "too large", "shape", "size")])
    hdr_case("shape overflow (wraps to the right byte count)", "overflow3.safetensors",
             {"big": t("BF16", [2 ** 63 + 2], 0, 4)}, bytes(4), ["big", ("overflow", "too large", "shape", "size")])
    hdr_case("shape product wraps to the right byte count (small dims)", "overflow5.safetensors",
             {"wrap": t("F32", [5, 5581, 8681, 49477, 384773], 0, 4)}, bytes(4),
             ["wrap", ("overflow", "too large", "shape", "size")])
    hdr_case("byte size overflows (2^31 x 2^31 F32)", "overflow6.safetensors",
             {"wide": t("F32", [2 ** 31, 2 ** 31], 0, 0)}, b"", ["wide", ("overflow", "too large", "size")])
    hdr_case("dimension beyond int64", "overflow4.safetensors",
             '{"big":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,0]}}', b"",
             ["big", ("overflow", "too large", "shape", "range", "integer")])
    hdr_case("too many dimensions", "ndim.safetensors",
             {"many": t("F32", [1] * 40, 0, 4)}, bytes(4), ["many", ("dim", "shape")])
    hdr_case("metadata non-string value", "meta_num.safetensors",
             with_entries(__metadata__={"format": "pt", "n": 3}), bytes(38), ["metadata", ("string",)])
    hdr_case("metadata not an object", "meta_arr.safetensors",
             with_entries(__metadata__=["format", "pt"]), bytes(38), ["metadata", ("object",)])
    hdr_case("tensor entry not an object", "entry_num.safetensors",
             with_entries(gamma=5), bytes(38), ["gamma", ("object",)])
    hdr_case("missing dtype", "no_dtype.safetensors",
             with_entries(gamma={"shape": [3], "data_offsets": [32, 38]}), bytes(38), ["gamma", "dtype"])
    hdr_case("dtype not a string", "dtype_num.safetensors",
             with_entries(gamma={"dtype": 16, "shape": [3], "data_offsets": [32, 38]}), bytes(38),
             ["gamma", "dtype"])
    hdr_case("missing data_offsets", "no_offs.safetensors",
             with_entries(gamma={"dtype": "F16", "shape": [3]}), bytes(38), ["gamma", "data_offsets"])
    hdr_case("valid file whose header length is not a multiple of 8", "unpadded_ok.safetensors",
             '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4), None, pad=False)

    for label, fname, writer, kw in cases:
        p = os.path.join(tmp, fname)
        writer(p)
        if kw is None:  # a valid file (unusual but allowed)
            expect_ok([ST_TOOL, "ls", p], label)
            continue
        expect_error([ST_TOOL, "ls", p], label, p, kw)
        # The Python oracle (tests/py/safetensors_np.py) must reject it too,
        # except where only the C side has a limit: "\u0000" in a name is
        # valid JSON, I64 is a valid safetensors dtype.
        if fname not in ("u0000_name.safetensors", "i64.safetensors"):
            try:
                stnp.load(p)
                check(False, label + ": safetensors_np.load rejects it", "it loaded")
            except ValueError as e:
                check(os.path.basename(p) in str(e), label + ": safetensors_np message names the file", str(e))


# ---------------------------------------------------------------- model dirs

TINY = ["--layers", "1", "--hidden", "16", "--heads", "2", "--kv-heads", "1", "--ffn", "32", "--vocab", "50"]


def make_model(base, name, extra=()):
    d = os.path.join(base, name)
    p = run([TPTT, "init-model", "--arch", "llama"] + TINY + list(extra) + [d])
    if p.returncode != 0:
        raise RuntimeError("tptt init-model failed: %s" % p.stderr.decode("utf-8", "replace"))
    return d


def edit_json(path, fn):
    with open(path) as f:
        obj = json.load(f)
    fn(obj)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def rewrite_tensors(path, fn):
    """Load a safetensors file raw, let fn edit {name: [dtype, shape, bytes]}, write it back."""
    raw = {k: list(v) for k, v in stnp.load_raw(path).items()}
    _, _, meta = stnp.read_header(path)
    fn(raw)
    entries = [(k, v[0], v[1], len(v[2])) for k, v in raw.items()]
    hdr = stnp.header_bytes(entries, meta)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)) + hdr + b"".join(v[2] for v in raw.values()))


def model_cases(tmp):
    src1 = make_model(tmp, "src1")
    src3 = make_model(tmp, "src3", ["--shards", "3", "--dtype", "f32"])
    expect_ok([TPTT, "inspect", src1], "control: valid model dir")
    expect_ok([TPTT, "inspect", src3], "control: valid 3-shard model dir")
    expect_ok([TPTT, "inspect", "--json", src1], "control: valid model dir (--json)")

    n = [0]

    def case(label, src, mutate, offending, keywords):
        n[0] += 1
        d = os.path.join(tmp, "case%02d" % n[0])
        shutil.copytree(src, d)
        off = mutate(d)
        path = os.path.join(d, offending) if offending else (off or d)
        expect_error([TPTT, "inspect", d], label, path, keywords)

    cfg = lambda d: os.path.join(d, "config.json")  # noqa: E731
    st = lambda d: os.path.join(d, "model.safetensors")  # noqa: E731
    idx = lambda d: os.path.join(d, "model.safetensors.index.json")  # noqa: E731

    def write(path, text):
        with open(path, "w") as f:
            f.write(text)

    def setcfg(**kv):
        def m(d):
            def f(c):
                for k, v in kv.items():
                    if v is None:
                        c.pop(k, None)
                    else:
                        c[k] = v
            edit_json(cfg(d), f)
        return m

    case("broken config.json", src1, lambda d: write(cfg(d), open(cfg(d)).read()[:-40]), "config.json", ["json"])
    case("config.json is an array", src1, lambda d: write(cfg(d), "[]"), "config.json", ["object"])
    case("config missing hidden_size", src1, setcfg(hidden_size=None), "config.json", ["hidden_size"])
    case("hidden_size is a string", src1, setcfg(hidden_size="16"), "config.json", ["hidden_size"])
    case("hidden_size negative", src1, setcfg(hidden_size=-16), "config.json", ["hidden_size"])
    case("unsupported architecture", src1, setcfg(architectures=["GPT2LMHeadModel"]), "config.json",
         ["GPT2LMHeadModel"])
    case("architectures missing", src1, setcfg(architectures=None), "config.json", ["architectures"])
    case("hidden_act gelu", src1, setcfg(hidden_act="gelu"), "config.json", ["hidden_act", "gelu"])
    case("rope_scaling type yarn", src1, setcfg(rope_scaling={"type": "yarn", "factor": 4.0}), "config.json",
         ["rope_scaling", "yarn"])
    case("rope_scaling rope_type yarn", src1,
         setcfg(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}),
         "config.json", ["yarn"])
    case("heads not divisible by kv heads", src1, setcfg(num_attention_heads=3, num_key_value_heads=2),
         "config.json", [("num_key_value_heads", "kv"), ("divis", "multiple")])
    case("num_key_value_heads zero", src1, setcfg(num_key_value_heads=0), "config.json", ["num_key_value_heads"])
    case("qwen2 use_sliding_window true", src1,
         setcfg(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True,
                sliding_window=8), "config.json", ["sliding", ("unsupported", "not supported")])
    case("missing config.json", src1, lambda d: os.remove(cfg(d)), "config.json", [("missing", "no such", "not found",
                                                                                     "cannot", "open")])
    case("no weights file", src1, lambda d: os.remove(st(d)), None, [("model.safetensors", "weights", "no ")])
    case("tensor with wrong shape (k_proj transposed)", src1,
         lambda d: rewrite_tensors(st(d), lambda r: r["model.layers.0.self_attn.k_proj.weight"].__setitem__(1, (16, 8))),
         "model.safetensors", ["model.layers.0.self_attn.k_proj.weight", ("shape", "[8, 16]", "[8,16]")])
    case("tensor with wrong shape vs config (ffn)", src1, setcfg(intermediate_size=48), None,
         [("gate_proj", "up_proj", "down_proj"), "shape"])
    case("missing tensor", src1,
         lambda d: rewrite_tensors(st(d), lambda r: r.pop("model.layers.0.mlp.down_proj.weight")),
         None, ["model.layers.0.mlp.down_proj.weight", ("missing", "not found", "no tensor")])
    case("tensor with I64 dtype in a model", src1,
         lambda d: rewrite_tensors(st(d), lambda r: r.__setitem__("model.norm.weight",
                                                                  ["I64", (16,), bytes(128)])),
         "model.safetensors", ["model.norm.weight", "I64"])
    case("corrupt model.safetensors (truncated)", src1,
         lambda d: os.truncate(st(d), os.path.getsize(st(d)) - 7), "model.safetensors", [("size", "trunc")])

    shard2 = "model-00002-of-00003.safetensors"
    case("shard named in index is missing", src3, lambda d: os.remove(os.path.join(d, shard2)), shard2,
         ["missing"])

    def move_tensor(d):
        def f(i):
            wm = i["weight_map"]
            name = sorted(k for k, v in wm.items() if v == "model-00001-of-00003.safetensors")[0]
            wm[name] = shard2
        edit_json(idx(d), f)
    case("index names a shard that lacks the tensor", src3, move_tensor, "model.safetensors.index.json",
         ["model.embed_tokens.weight", shard2])
    shard3 = "model-00003-of-00003.safetensors"
    case("index omits every tensor of a shard", src3,
         lambda d: edit_json(idx(d), lambda i: [i["weight_map"].pop(k) for k, v in list(i["weight_map"].items())
                                                 if v == shard3]), None, ["missing"])
    case("broken index JSON", src3, lambda d: write(idx(d), open(idx(d)).read()[:50]),
         "model.safetensors.index.json", ["json"])
    case("index without weight_map", src3, lambda d: write(idx(d), '{"metadata":{}}'),
         "model.safetensors.index.json", ["weight_map"])
    case("index shard path escapes the directory", src3,
         lambda d: edit_json(idx(d), lambda i: i["weight_map"].__setitem__("model.norm.weight", "../x.safetensors")),
         "model.safetensors.index.json", ["model.norm.weight", "../x.safetensors"])
    case("corrupt shard (gap in offsets)", src3,
         lambda d: rewrite_gap(os.path.join(d, shard2)), shard2, ["gap"])


def rewrite_gap(path):
    """Shift every tensor after the first by 4 bytes: a gap in the data buffer."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    h = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    first = min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    for k, v in h.items():
        if k != "__metadata__" and k != first:
            v["data_offsets"] = [v["data_offsets"][0] + 4, v["data_offsets"][1] + 4]
    e = h[first]["data_offsets"][1]
    raw_file(path, h, data[:e] + bytes(4) + data[e:])


def main():
    for b in (TPTT, ST_TOOL):
        if not os.path.exists(b):
            return kit.abort("%s: binary not found: %s (set TPTT / TPTT_ST_TOOL)" % (NAME, b))
    tmp = tempfile.mkdtemp(prefix="tptt_bad_input_")
    try:
        for fn in (file_cases, model_cases):
            kit.call(fn, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
