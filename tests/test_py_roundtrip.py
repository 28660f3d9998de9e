"""test_py_roundtrip - safetensors files cross the C/Python boundary unchanged.

C -> Python: `st_tool gen` output decodes (with the independent reader
tests/py/safetensors_np.py) to exactly the pattern documented in st_tool.c.
Python -> C: files written by safetensors_np are listed by `st_tool ls` with the
right names/dtypes/shapes/FNV-1a hashes/metadata, copied by `st_tool copy`
byte-identically, and converted by `st_tool f32` exactly as numpy converts
(subnormals, inf, -0.0, NaN, F16 rounding boundaries).
Models: `tptt init-model` output (BF16 one file, F32 3 shards, F16 2 shards)
loads with load_model_dir and agrees with the C reader tensor by tensor.

Environment: TPTT, TPTT_ST_TOOL (binaries). Prints "N passed, N failed".
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

NAME = "test_py_roundtrip"
TPTT = os.environ.get("TPTT", "tptt")
ST_TOOL = os.environ.get("TPTT_ST_TOOL", "st_tool")

kit = testkit.Checker(NAME)
check = kit.check


def run_ok(args, what):
    """Run; a non-zero exit or a crash is a failure. Returns stdout text or None."""
    p = kit.run(args)
    if not kit.succeeds(p, what + " succeeds", limit=2000):
        return None
    return p.stdout.decode("utf-8")


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def same_bits_f32(a, b):
    """Bitwise float32 equality, any NaN equal to any NaN."""
    a = np.asarray(a, np.float32).ravel()
    b = np.asarray(b, np.float32).ravel()
    if a.shape != b.shape:
        return False
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and
                np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32)))


def first_diff(a, b):
    a = np.asarray(a, np.float32).ravel()
    b = np.asarray(b, np.float32).ravel()
    if a.shape != b.shape:
        return "sizes %d vs %d" % (a.size, b.size)
    for i in range(a.size):
        if not same_bits_f32(a[i:i + 1], b[i:i + 1]):
            return "element %d: %r vs %r" % (i, float(a[i]), float(b[i]))
    return "none"


def parse_ls(text):
    """`st_tool ls` output -> ([(name, dtype, shape, hash)] in printed order, {meta key: value})."""
    tensors, meta = [], {}
    for line in text.split("\n"):
        if not line:
            continue
        f = line.split("\t")
        if f[0] == "meta" and len(f) == 3:
            meta[f[1]] = json.loads(f[2])
        elif len(f) == 4:
            shape = tuple(int(d) for d in f[2].split(",")) if f[2] else ()
            tensors.append((f[0], f[1], shape, int(f[3], 16)))
        else:
            check(False, "st_tool ls line has 4 fields or is a meta line", repr(line))
    return tensors, meta


def header_info(path):
    """(header length, raw header bytes) of a file."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    return n, blob[8:8 + n]


def check_padding(path, what):
    n, hdr = header_info(path)
    check(n % 8 == 0, what + ": header length is a multiple of 8", "N = %d" % n)
    body = hdr.rstrip(b" ")
    check(body.endswith(b"}") and len(hdr) - len(body) < 8,
          what + ": header is JSON padded with fewer than 8 spaces",
          "tail %r" % hdr[-12:])


def st_f32(path, name):
    """Values printed by `st_tool f32` as float32 (None on failure)."""
    out = run_ok([ST_TOOL, "f32", path, name], "st_tool f32 %s %s" % (os.path.basename(path), name))
    if out is None:
        return None
    return np.array([np.float32(float(s)) for s in out.split()], dtype=np.float32)


def ls_matches_python(path, what):
    """`st_tool ls` of path == names/dtypes/shapes/hashes/metadata from safetensors_np."""
    out = run_ok([ST_TOOL, "ls", path], "st_tool ls " + what)
    if out is None:
        return
    tensors, meta = parse_ls(out)
    raw = stnp.load_raw(path)
    _, _, pymeta = stnp.read_header(path)
    expect = sorted(((n, dt, tuple(s), fnv1a64(b)) for n, (dt, s, b) in raw.items()),
                    key=lambda t: t[0].encode("utf-8"))
    check([t[0] for t in tensors] == [t[0] for t in expect],
          what + ": st_tool ls lists the same names in byte order",
          "C %s vs Python %s" % ([t[0] for t in tensors], [t[0] for t in expect]))
    got = {t[0]: t for t in tensors}
    for t in expect:
        g = got.get(t[0])
        if g is None:
            continue
        check(g[1] == t[1], "%s: '%s' dtype" % (what, t[0]), "C %s, Python %s" % (g[1], t[1]))
        check(g[2] == t[2], "%s: '%s' shape" % (what, t[0]), "C %s, Python %s" % (g[2], t[2]))
        check(g[3] == t[3], "%s: '%s' FNV-1a of bytes" % (what, t[0]),
              "C %016x, Python %016x" % (g[3], t[3]))
    check(meta == pymeta, what + ": metadata", "C %r, Python %r" % (meta, pymeta))


# ---------------------------------------------------------------- checks

def test_library_self(tmp):
    """A few fixed facts about the Python library itself (it is the oracle)."""
    # BF16 round to nearest even at exact halfway points and just above.
    f = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7F7FFFFF, 0x80000000,
                  0x00000001, 0xFF800000], np.uint32).view(np.float32)
    want = np.array([0x3F80, 0x3F82, 0x3F81, 0x3F80, 0x7F80, 0x8000, 0x0000, 0xFF80], np.uint16)
    got = stnp.f32_to_bf16_bits(f)
    check(np.array_equal(got, want), "library: f32_to_bf16_bits rounds to nearest even",
          "%s vs %s" % ([hex(x) for x in got], [hex(x) for x in want]))
    check(np.isnan(stnp.bf16_bits_to_f32(stnp.f32_to_bf16_bits(np.float32("nan")))),
          "library: BF16 NaN stays NaN")
    check(stnp.bf16_bits_to_f32(np.uint16(0x3FC0)) == np.float32(1.5), "library: BF16 0x3FC0 = 1.5")
    # save/load of every supported dtype, header layout.
    p = os.path.join(tmp, "self.safetensors")
    stnp.save(p, {"z": ("F32", np.zeros((2, 0))), "s": ("BF16", np.float32(2.5)),
                  "h": ("F16", np.array([1.0, -2.0])), "i": ("I64", np.array([1, -1]))},
              {"k": "v"})
    t, m = stnp.load(p)
    check(list(t) == ["z", "s", "h", "i"] and m == {"k": "v"}, "library: names in order, metadata",
          "%r %r" % (list(t), m))
    check(t["s"].shape == () and t["s"].dtype == np.float32 and float(t["s"]) == 2.5,
          "library: 0-d BF16 loads as 0-d float32", repr(t["s"]))
    check(t["h"].dtype == np.float16 and t["z"].shape == (2, 0) and t["i"].tolist() == [1, -1],
          "library: F16 dtype, zero-size shape, I64 values")
    check_padding(p, "library save")
    # the loader rejects a tampered file
    with open(p, "ab") as fh:
        fh.write(b"\0")
    try:
        stnp.load(p)
        check(False, "library: trailing byte rejected")
    except ValueError as e:
        check("size" in str(e), "library: trailing byte rejected with a size message", str(e))


def test_c_to_py(tmp):
    path = os.path.join(tmp, "gen.safetensors")
    if run_ok([ST_TOOL, "gen", path], "st_tool gen") is None:
        return
    try:
        tensors, meta = stnp.load(path)
        raw = stnp.load_raw(path)
    except ValueError as e:
        check(False, "st_tool gen output loads in Python", str(e))
        return
    spec = [("a.f32", "F32", (3, 5), np.float32), ("b.bf16", "BF16", (2, 3, 4), np.float32),
            ("c.f16", "F16", (7,), np.float16), ("d.empty", "F32", (0, 4), np.float32),
            ("e.scalar", "BF16", (), np.float32)]
    check(list(tensors) == [s[0] for s in spec], "gen: tensor names in header order", repr(list(tensors)))
    # data offsets follow the order given to the writer
    starts = [json.loads(header_info(path)[1])[s[0]]["data_offsets"][0] for s in spec if s[0] in raw]
    check(starts == sorted(starts), "gen: data offsets tile in the order given", repr(starts))
    for t, (name, dtype, shape, npdt) in enumerate(spec):
        if name not in tensors:
            check(False, "gen: tensor %s present" % name)
            continue
        a = tensors[name]
        n = int(np.prod(shape, dtype=np.int64))
        want = np.array([((i * 7 + t * 3) % 29 - 14) / 8 for i in range(n)], np.float64).reshape(shape)
        check(raw[name][0] == dtype, "gen: %s dtype" % name, "%s, want %s" % (raw[name][0], dtype))
        check(a.shape == shape, "gen: %s shape" % name, "%s, want %s" % (a.shape, shape))
        check(a.dtype == npdt, "gen: %s decodes to %s" % (name, np.dtype(npdt)), str(a.dtype))
        if a.shape == shape:
            check(np.array_equal(a.astype(np.float64), want), "gen: %s values follow the pattern" % name,
                  "got %s want %s" % (a.ravel()[:8], want.ravel()[:8]))
            check(raw[name][2] == stnp.encode(dtype, want), "gen: %s bytes equal Python's encoding" % name)
    check(meta == {"format": "pt", "note": "h\u00e9llo \"q\"\n\ttab"}, "gen: metadata", repr(meta))
    check_padding(path, "gen")
    ls_matches_python(path, "gen")


SPECIAL_F32 = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38,
                        1.17549435e-38, 1e-45, -1e-45, 5.877472e-39, 65504.0, 65520.0, 1e10,
                        np.pi, -np.e, 1e-8, 6e-8, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -25], np.float32)


def f16_boundaries():
    """float32 values at and around F16 rounding boundaries (numpy rounds them
    to nearest even on save; the C reader must then decode the stored F16)."""
    v = []
    for base_bits in (0x3C00, 0x3C01, 0x4000, 0x7BFE, 0x0001, 0x0200, 0x03FF, 0x0400, 0x5640):
        lo = np.array([base_bits], np.uint16).view(np.float16).astype(np.float32)[0]
        hi = np.array([base_bits + 1], np.uint16).view(np.float16).astype(np.float32)[0]
        mid = np.float32((np.float64(lo) + np.float64(hi)) / 2)
        v += [mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf)), lo, hi]
    v += [65519.0, 65520.0, 65504.0, -65520.0, 2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -24, 2.0 ** -26]
    v = np.array(v, np.float32)
    return np.concatenate([v, -v])


def test_f16_rounding_facts():
    """numpy's float32->float16 must round to nearest even: the test data relies on it."""
    cases = [(1 + 2.0 ** -11, 1.0), (1 + 3 * 2.0 ** -11, 1 + 2.0 ** -9), (65520.0, np.inf),
             (65519.0, 65504.0), (2.0 ** -25, 0.0), (3 * 2.0 ** -25, 2.0 ** -23),
             (1 + 2.0 ** -11 + 2.0 ** -20, 1 + 2.0 ** -10)]
    for x, want in cases:
        got = float(stnp.decode("F16", (), stnp.encode("F16", np.float32(x))))
        check(got == want, "library: F16 encoding of %r is %r" % (x, want), "got %r" % got)


def py_files(tmp):
    """Files written by safetensors_np: {path: (tensors dict given to save, metadata)}."""
    rng = np.random.default_rng(20240611)
    bf16_special = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x7F7F, 0xFF7F, 0x7F80,
                             0xFF80, 0x7FC0, 0x3F80, 0x3F81, 0xC2F7, 0x1234], np.uint16)
    f16_special = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x7C00,
                            0xFC00, 0x7E00, 0x3C00, 0x3555, 0x5640], np.uint16).view(np.float16)
    files = {}
    mixed = {
        "w.f32": ("F32", rng.standard_normal((3, 4, 5)).astype(np.float32) * 10),
        "\u03c8.\u00fcn\u00ef.\u540d\u524d": ("F16", rng.standard_normal(17).astype(np.float16)),
        "b.bf16": ("BF16", rng.standard_normal((2, 3)).astype(np.float32)),
        "scalar.f32": ("F32", np.float32(-7.25)),
        "scalar.bf16": ("BF16", np.array(3.140625, np.float32)),
        "scalar.f16": ("F16", np.float16(-0.0)),
        "zero.f16": ("F16", np.zeros((0,), np.float16)),
        "zero2.bf16": ("BF16", np.zeros((4, 0, 3), np.float32)),
        "Big.Matrix": ("F32", rng.uniform(-1e6, 1e6, (64, 33)).astype(np.float32)),
        "specials.f32": ("F32", SPECIAL_F32),
        "specials.bf16": ("BF16", bf16_special),
        "specials.f16": ("F16", f16_special),
        "bound.f16": ("F16", f16_boundaries()),
        "bound.bf16": ("BF16", f16_boundaries()),
        "rand.bf16": ("BF16", rng.standard_normal((5, 7)).astype(np.float32) * 1e-3),
        "4d": ("F32", rng.standard_normal((2, 1, 3, 2)).astype(np.float32)),
        "a": ("F16", (rng.standard_normal((6, 6)) * 1000).astype(np.float16)),
    }
    meta = {"format": "pt", "\u043a\u043b\u044e\u0447": "\u0437\u043d\u0430\u0447\u0435\u043d\u0438\u0435 \u2713",
            "quote": "a\"b\\c\n\t/\u0001\u001f end", "empty": "", "emoji": "\U0001F600 4-byte"}
    files["mixed.safetensors"] = (mixed, meta)
    files["nometa.safetensors"] = ({"only": ("BF16", np.linspace(-2, 2, 9, dtype=np.float32))}, None)
    files["scalars.safetensors"] = ({"x": ("F32", np.float32(1.0)), "y": ("F16", np.float16(2.0))},
                                    {"format": "pt"})
    files["zerosize_only.safetensors"] = ({"e1": ("F32", np.zeros((0,), np.float32)),
                                           "e2": ("F16", np.zeros((3, 0), np.float16))}, {})
    out = {}
    for fname, (tensors, m) in files.items():
        p = os.path.join(tmp, fname)
        stnp.save(p, tensors, m)
        out[p] = (tensors, m)
    return out


def test_py_to_c(tmp):
    test_f16_rounding_facts()
    files = py_files(tmp)
    for path, (tensors, meta) in files.items():
        what = os.path.basename(path)
        check_padding(path, what)
        ls_matches_python(path, what)
        # C copy: byte-identical tensors, same metadata, offset order kept
        cp = os.path.join(tmp, "c\u00f6py-" + what)
        if run_ok([ST_TOOL, "copy", path, cp], "st_tool copy " + what) is not None:
            try:
                a, b = stnp.load_raw(path), stnp.load_raw(cp)
                _, _, ma = stnp.read_header(path)
                _, _, mb = stnp.read_header(cp)
            except ValueError as e:
                check(False, what + ": C copy loads in Python", str(e))
            else:
                check(sorted(a) == sorted(b), what + ": copy has the same names",
                      "%s vs %s" % (sorted(a), sorted(b)))
                for n in a:
                    if n in b:
                        check(a[n] == b[n], "%s: copy of '%s' identical (dtype, shape, bytes)" % (what, n),
                              "%s %s vs %s %s" % (a[n][0], a[n][1], b[n][0], b[n][1]))
                check(ma == mb, what + ": copy metadata", "%r vs %r" % (ma, mb))
                hb = json.loads(header_info(cp)[1])
                ha = json.loads(header_info(path)[1])
                order_a = [n for n in ha if n != "__metadata__"]
                order_b = sorted((n for n in hb if n != "__metadata__"),
                                 key=lambda n: tuple(hb[n]["data_offsets"]))
                check(order_a == order_b, what + ": copy keeps data-offset order",
                      "%s vs %s" % (order_a, order_b))
                check_padding(cp, what + " copy")
        # C conversion to f32 equals numpy's exactly
        loaded, _ = stnp.load(path)
        for name, (dtype, _) in tensors.items():
            vals = st_f32(path, name)
            if vals is None:
                continue
            want = loaded[name].astype(np.float32)
            check(same_bits_f32(vals, want), "%s: st_tool f32 '%s' (%s) equals numpy bit for bit" % (what, name, dtype),
                  first_diff(vals, want))
        # the Python side decodes the values that were saved
        for name, (dtype, arr) in tensors.items():
            a = np.asarray(arr)
            if dtype == "BF16":
                want = stnp.bf16_bits_to_f32(a) if a.dtype == np.uint16 else \
                    stnp.bf16_bits_to_f32(stnp.f32_to_bf16_bits(a))
            else:
                with np.errstate(over="ignore"):
                    want = a.astype(np.float16 if dtype == "F16" else np.float32)
            check(loaded[name].shape == a.shape and same_bits_f32(loaded[name], want),
                  "%s: Python reads back '%s'" % (what, name))
    # a few spot values: the C reader must not flush subnormals or lose -0.0
    mixed = [p for p in files if p.endswith("mixed.safetensors")][0]
    v = st_f32(mixed, "specials.bf16")
    if v is not None and v.size == 15:
        check(v[1] == 0 and np.signbit(v[1]), "bf16 0x8000 -> -0.0 in C", repr(v[1]))
        check(v[2].view(np.uint32) == 0x00010000, "bf16 0x0001 -> subnormal 2^-133 in C", repr(v[2]))
        check(np.isposinf(v[8]) and np.isneginf(v[9]) and np.isnan(v[10]), "bf16 inf/-inf/nan in C",
              repr(v[8:11]))
    v = st_f32(mixed, "specials.f16")
    if v is not None and v.size == 14:
        check(v[2] == np.float32(2.0 ** -24), "f16 0x0001 -> 2^-24 in C", repr(v[2]))
        check(v[4] == np.float32(1023 * 2.0 ** -24), "f16 0x03FF -> largest subnormal in C", repr(v[4]))
        check(v[6] == 65504 and v[7] == -65504, "f16 0x7BFF -> 65504 in C", repr(v[6:8]))
        check(np.isposinf(v[8]) and np.isneginf(v[9]) and np.isnan(v[10]), "f16 inf/-inf/nan in C",
              repr(v[8:11]))
        check(v[1] == 0 and np.signbit(v[1]), "f16 0x8000 -> -0.0 in C", repr(v[1]))


def expected_names(cfg):
    L = cfg["num_hidden_layers"]
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.get("tie_word_embeddings"):
        names.add("lm_head.weight")
    qwen = cfg["architectures"][0] == "Qwen2ForCausalLM"
    for l in range(L):
        p = "model.layers.%d." % l
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {p + "self_attn.%s_proj.weight" % x for x in "qkvo"}
        names |= {p + "mlp.%s_proj.weight" % x for x in ("gate", "up", "down")}
        if qwen:
            names |= {p + "self_attn.%s_proj.bias" % x for x in "qkv"}
    return names


def expected_shape(cfg, name):
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H = cfg["num_attention_heads"]
    K = cfg.get("num_key_value_heads", H)
    d = cfg.get("head_dim", D // H)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (V, D)
    for suffix, shape in ((".q_proj.weight", (H * d, D)), (".k_proj.weight", (K * d, D)),
                          (".v_proj.weight", (K * d, D)), (".o_proj.weight", (D, H * d)),
                          (".q_proj.bias", (H * d,)), (".k_proj.bias", (K * d,)), (".v_proj.bias", (K * d,)),
                          (".gate_proj.weight", (F, D)), (".up_proj.weight", (F, D)),
                          (".down_proj.weight", (D, F)), ("norm.weight", (D,))):
        if name.endswith(suffix):
            return shape
    return None


def test_models(tmp):
    cases = [
        ("bf16_1", ["--arch", "llama", "--layers", "2", "--hidden", "32", "--heads", "4", "--kv-heads", "2",
                    "--ffn", "48", "--vocab", "64", "--dtype", "bf16", "--seed", "5"], "BF16", 1),
        ("f32_3", ["--arch", "qwen2", "--layers", "2", "--hidden", "32", "--heads", "4", "--kv-heads", "2",
                   "--ffn", "64", "--vocab", "100", "--dtype", "f32", "--shards", "3", "--tie"], "F32", 3),
        ("f16_2", ["--arch", "mistral", "--layers", "1", "--hidden", "16", "--heads", "2", "--kv-heads", "1",
                   "--ffn", "32", "--vocab", "50", "--head-dim", "16", "--sliding-window", "8",
                   "--dtype", "f16", "--shards", "2"], "F16", 2),
    ]
    for label, args, dtype, shards in cases:
        d = os.path.join(tmp, "model_" + label)
        if run_ok([TPTT, "init-model"] + args + [d], "tptt init-model " + label) is None:
            continue
        try:
            cfg, tensors = stnp.load_model_dir(d)
        except (ValueError, OSError) as e:
            check(False, label + ": load_model_dir", str(e))
            continue
        names = expected_names(cfg)
        check(set(tensors) == names, label + ": tensor names as FORMATS.md lists",
              "extra %s missing %s" % (sorted(set(tensors) - names), sorted(names - set(tensors))))
        for n, a in tensors.items():
            check(a.shape == expected_shape(cfg, n), "%s: shape of %s" % (label, n),
                  "%s vs %s" % (a.shape, expected_shape(cfg, n)))
            check(bool(np.all(np.isfinite(a))), "%s: %s finite" % (label, n))
        if shards == 1:
            files = [os.path.join(d, "model.safetensors")]
            check(not os.path.exists(os.path.join(d, "model.safetensors.index.json")), label + ": no index")
        else:
            with open(os.path.join(d, "model.safetensors.index.json")) as f:
                index = json.load(f)
            want_files = ["model-%05d-of-%05d.safetensors" % (i + 1, shards) for i in range(shards)]
            check(sorted(set(index["weight_map"].values())) == want_files, label + ": shard file names",
                  repr(sorted(set(index["weight_map"].values()))))
            files = [os.path.join(d, f) for f in want_files]
            total = sum(len(b) for f in files if os.path.exists(f) for _, _, b in stnp.load_raw(f).values())
            check(index.get("metadata", {}).get("total_size") == total, label + ": index total_size = tensor bytes",
                  "%r vs %d" % (index.get("metadata", {}).get("total_size"), total))
        for f in files:
            if not os.path.exists(f):
                check(False, label + ": file exists", f)
                continue
            raw = stnp.load_raw(f)
            check(all(v[0] == dtype for v in raw.values()), "%s: %s all %s" % (label, os.path.basename(f), dtype),
                  repr(sorted({v[0] for v in raw.values()})))
            check_padding(f, label + " " + os.path.basename(f))
            ls_matches_python(f, label + " " + os.path.basename(f))
            # st_tool f32 agrees with the Python decoding for two tensors per file
            for n in sorted(raw)[:2]:
                v = st_f32(f, n)
                if v is not None:
                    want = tensors[n].astype(np.float32)
                    check(same_bits_f32(v, want), "%s: st_tool f32 %s equals Python" % (label, n),
                          first_diff(v, want))
        p = kit.run([TPTT, "inspect", "--json", d])
        check(p.returncode == 0 and not testkit.crashed(p), label + ": tptt inspect succeeds",
              p.stderr.decode("utf-8", "replace").strip())


def main():
    for b in (TPTT, ST_TOOL):
        if not os.path.exists(b):
            return kit.abort("%s: binary not found: %s (set TPTT / TPTT_ST_TOOL)" % (NAME, b))
    tmp = tempfile.mkdtemp(prefix="tptt_roundtrip_")
    try:
        for t in (test_library_self, test_c_to_py, test_py_to_c, test_models):
            kit.call(t, tmp)  # a harness bug or an unexpected reader error is a failure, not a crash
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
