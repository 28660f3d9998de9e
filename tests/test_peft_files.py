"""test_peft_files - the files of a checkpoint, read with independent code.

`test_checkpoint` (tests/test_checkpoint.c) with TPTT_PEFT_DIR set writes a
tiny base model to $TPTT_PEFT_DIR/base and one checkpoint (step 1; LoRA r=3 on
q_proj, v_proj, o_proj, down_proj; LiZA with learnable per-layer MaG) under
$TPTT_PEFT_DIR/run. Checked here against FORMATS.md ("Run directory") with
tests/py/safetensors_np.py and a pure-Python XXH64 (checked on known vectors):

- the directory layout, LATEST, no temporary files left;
- MANIFEST: one "<size> <16 hex> <name>" line per file, sorted, every file
  listed, sizes and XXH64 checksums recomputed; a flipped byte changes the sum;
- adapter_model.safetensors: only PEFT keys
  base_model.model.model.layers.{l}.{self_attn|mlp}.{module}.lora_{A|B}.weight,
  A [r, in], B [out, r] for every layer and target module, F32,
  metadata {"format": "pt"};
- adapter_config.json: the PEFT LoraConfig fields FORMATS.md requires;
- liza_model.safetensors: the per-layer mag_logit [1];
- optimizer.safetensors: "<param>.exp_avg" / "<param>.exp_avg_sq" for every
  parameter, same shapes;
- config.json and trainer_state.json are JSON.

Then checkpoints of real `tptt train` runs (TPTT: the binary):
- trainable: lora with model.hub_id: adapter_config.json's
  base_model_name_or_path is the Hub id; without it, the absolute base path;
- config.json: base_model_name and base_model_path absolute, base_model_hub_id,
  ONE mu: mag_weight is the mu the model uses at the checkpoint's step (a
  gradual schedule's value there), mag_mu0 the schedule's start, no mag_mu;
- trainable: projections / all: no adapter_model.safetensors and no
  adapter_config.json (nothing PEFT could load as a LoRA), MANIFEST without
  them, and such a checkpoint resumes.

Environment: TPTT_TEST_CHECKPOINT (the test_checkpoint binary; default
./test_checkpoint), TPTT_SOURCE_DIR. Prints "N passed, N failed".
"""
import json
import os
import re
import shutil
import struct
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "py"))
import safetensors_np as st  # noqa: E402
import testkit  # noqa: E402

NAME = "test_peft_files"
TOOL = os.environ.get("TPTT_TEST_CHECKPOINT", "./test_checkpoint")

kit = testkit.Checker(NAME)
check = kit.check


# ---- XXH64 (xxHash spec, seed 0 by default), written out -----------------------

M64 = (1 << 64) - 1
P1, P2, P3, P4, P5 = (11400714785074694791, 14029467366897019727, 1609587929392839161,
                      9650029242287828579, 2870177450012600261)


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M64


def _round(acc, lane):
    return _rotl((acc + lane * P2) & M64, 31) * P1 & M64


def _merge(h, v):
    return ((h ^ _round(0, v)) * P1 + P4) & M64


def xxh64(data, seed=0):
    n = len(data)
    i = 0
    if n >= 32:
        v1, v2, v3, v4 = (seed + P1 + P2) & M64, (seed + P2) & M64, seed & M64, (seed - P1) & M64
        while i <= n - 32:
            a, b, c, d = struct.unpack_from("<4Q", data, i)
            v1, v2, v3, v4 = _round(v1, a), _round(v2, b), _round(v3, c), _round(v4, d)
            i += 32
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & M64
        for v in (v1, v2, v3, v4):
            h = _merge(h, v)
    else:
        h = (seed + P5) & M64
    h = (h + n) & M64
    while i + 8 <= n:
        (k,) = struct.unpack_from("<Q", data, i)
        h = (_rotl(h ^ _round(0, k), 27) * P1 + P4) & M64
        i += 8
    if i + 4 <= n:
        (k,) = struct.unpack_from("<I", data, i)
        h = (_rotl(h ^ (k * P1 & M64), 23) * P2 + P3) & M64
        i += 4
    while i < n:
        h = _rotl(h ^ (data[i] * P5 & M64), 11) * P1 & M64
        i += 1
    h ^= h >> 33
    h = h * P2 & M64
    h ^= h >> 29
    h = h * P3 & M64
    h ^= h >> 32
    return h


def test_xxh64_vectors():
    # published values (xxHash test suite / reference implementation)
    vectors = [(b"", 0xEF46DB3751D8E999), (b"a", 0xD24EC4F1A98C6E5B), (b"abc", 0x44BC2CF5AD770999),
               (b"Nobody inspects the spammish repetition", 0xFBCEA83C8A378BF1),
               (bytes(range(256)) * 3, 0x8E03C838C596036F)]
    for data, want in vectors:
        check(xxh64(data) == want, "xxh64 of %d bytes" % len(data), "%016x" % xxh64(data))


# ---- the checkpoint -------------------------------------------------------------

REQUIRED = ["adapter_config.json", "adapter_model.safetensors", "config.json", "liza_model.safetensors",
            "optimizer.safetensors", "trainer_state.json"]
MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def module_shape(cfg, module):
    """[out, in] of a projection, from the base model's config.json."""
    d = cfg["hidden_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q = cfg["num_attention_heads"] * hd
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    f = cfg["intermediate_size"]
    return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
            "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}[module]


def read_manifest(path):
    lines = open(path, "rb").read().decode("utf-8").split("\n")
    check(lines[-1] == "", "MANIFEST ends with a newline")
    out = []
    for ln in lines[:-1]:
        m = re.fullmatch(r"(\d+) ([0-9a-f]{16}) ([^/\s]+)", ln)
        if check(m is not None, "MANIFEST line format", repr(ln)):
            out.append((int(m.group(1)), int(m.group(2), 16), m.group(3)))
    return out


def test_checkpoint(root):
    p = kit.run([TOOL], env=dict(os.environ, TPTT_PEFT_DIR=root), timeout=300)
    if not check(p.returncode == 0, "test_checkpoint in TPTT_PEFT_DIR mode", p.stderr.decode(errors="replace")):
        return
    base = os.path.join(root, "base")
    ck = os.path.join(root, "run", "checkpoints")
    check(open(os.path.join(ck, "LATEST")).read() == "step-00000001\n", "LATEST")
    check(sorted(os.listdir(ck)) == ["LATEST", "step-00000001"], "checkpoints/ holds LATEST and the step",
          os.listdir(ck))
    d = os.path.join(ck, "step-00000001")
    check(sorted(os.listdir(d)) == sorted(REQUIRED + ["MANIFEST"]), "files of the checkpoint", os.listdir(d))

    # MANIFEST
    man = read_manifest(os.path.join(d, "MANIFEST"))
    names = [n for _, _, n in man]
    check(names == sorted(names), "MANIFEST sorted by name", names)
    check(names == REQUIRED, "MANIFEST lists every file", names)
    for size, h, name in man:
        data = open(os.path.join(d, name), "rb").read()
        check(len(data) == size, "size of %s" % name, "%d vs %d" % (len(data), size))
        check(xxh64(data) == h, "xxh64 of %s" % name, "%016x vs %016x" % (xxh64(data), h))
    # a flipped byte changes the checksum
    data = bytearray(open(os.path.join(d, "adapter_model.safetensors"), "rb").read())
    data[-1] ^= 1
    check(xxh64(bytes(data)) != dict((n, h) for _, h, n in man)["adapter_model.safetensors"],
          "a flipped byte changes the checksum")

    # adapter_config.json
    ac = json.load(open(os.path.join(d, "adapter_config.json")))
    want = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "r": 3, "lora_alpha": 6, "lora_dropout": 0.05}
    for k, v in want.items():
        check(k in ac and ac[k] == v and type(ac[k]) is type(v), "adapter_config.json %s" % k, ac.get(k))
    targets = ac.get("target_modules")
    check(isinstance(targets, list) and set(targets) == {"q_proj", "v_proj", "o_proj", "down_proj"},
          "adapter_config.json target_modules", targets)
    check(ac.get("base_model_name_or_path") == base, "adapter_config.json base_model_name_or_path",
          ac.get("base_model_name_or_path"))
    cfg = json.load(open(os.path.join(base, "config.json")))
    layers = cfg["num_hidden_layers"]
    r = ac.get("r")

    # adapter_model.safetensors
    _, _, meta = st.read_header(os.path.join(d, "adapter_model.safetensors"))
    check(meta == {"format": "pt"}, "adapter metadata", meta)
    raw = st.load_raw(os.path.join(d, "adapter_model.safetensors"))
    key_re = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
    seen = set()
    for k, (dt, shape, _) in raw.items():
        m = key_re.fullmatch(k)
        if not check(m is not None, "PEFT key", k):
            continue
        layer, part, mod, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        check(mod in MODULES and MODULES[mod] == part and mod in targets and layer < layers, "PEFT module", k)
        check(dt == "F32", "%s dtype" % k, dt)
        if mod in MODULES:
            out_f, in_f = module_shape(cfg, mod)
            check(shape == ((r, in_f) if ab == "A" else (out_f, r)), "%s shape" % k, shape)
        seen.add((layer, mod, ab))
    check(seen == {(l, mod, ab) for l in range(layers) for mod in targets for ab in "AB"},
          "every layer and target has lora_A and lora_B", sorted(seen))
    tensors, _ = st.load(os.path.join(d, "adapter_model.safetensors"))
    check(all(t.dtype.name == "float32" and bool((t == t).all()) for t in tensors.values()), "adapter values finite")

    # liza_model.safetensors
    _, _, meta = st.read_header(os.path.join(d, "liza_model.safetensors"))
    check(meta == {"format": "pt"}, "liza_model metadata", meta)
    lz = st.load_raw(os.path.join(d, "liza_model.safetensors"))
    check(sorted(lz) == sorted("base_model.model.model.layers.%d.self_attn.mag_logit" % l for l in range(layers)),
          "liza_model keys", sorted(lz))
    check(all(v[0] == "F32" and v[1] == (1,) for v in lz.values()), "mag_logit F32 [1]")

    # optimizer.safetensors
    opt = st.load_raw(os.path.join(d, "optimizer.safetensors"))
    params = dict(raw)
    params.update(lz)
    want_keys = {k + s for k in params for s in (".exp_avg", ".exp_avg_sq")}
    check(set(opt) == want_keys, "optimizer keys", sorted(set(opt) ^ want_keys)[:4])
    for k, (dt, shape, _) in opt.items():
        pk = k.rsplit(".", 1)[0]
        check(dt == "F32" and pk in params and params[pk][1] == shape, "optimizer %s" % k, (dt, shape))

    for f in ("config.json", "trainer_state.json"):
        try:
            json.load(open(os.path.join(d, f)))
            ok = True
        except ValueError as e:
            ok = str(e)
        check(ok is True, "%s is JSON" % f, ok)
    check(json.load(open(os.path.join(d, "trainer_state.json"))).get("step") == 1, "trainer_state step")


def test_train_runs(root):
    sys.path.insert(0, HERE)
    import train_util as tu
    model, data = os.path.join(root, "tmodel"), os.path.join(root, "tdata.tok")
    tu.make_model(model)
    tu.make_data(data)
    absbase = os.path.realpath(model)

    def run(name, ranks=1, trainable="lora", **over):
        conf, rd = os.path.join(root, name + ".yaml"), os.path.join(root, name)
        # a relative model.path: the checkpoint must still record the absolute one
        tu.write_config(conf, os.path.relpath(model), data, rd, checkpoint__every=2, schedule__total_steps=4, **over)
        with open(conf) as f:
            text = f.read().replace("trainable: lora\n", "trainable: %s\n" % trainable)
        with open(conf, "w") as f:
            f.write(text)
        p = tu.train(conf, ranks=ranks)
        check(p.returncode == 0, "tptt train %s" % name, p.stderr[-1500:])
        return conf, rd

    mag = dict(mag__mode="gradual", mag__mu0=0.2, mag__mu1=0.6, mag__steps=8)
    _, rd = run("hub", model__hub_id="org/tiny-base", **mag)
    ck = tu.latest(rd)
    ac = json.load(open(os.path.join(ck, "adapter_config.json")))
    check(ac.get("base_model_name_or_path") == "org/tiny-base", "base_model_name_or_path = model.hub_id",
          ac.get("base_model_name_or_path"))
    cf = json.load(open(os.path.join(ck, "config.json")))
    check(cf.get("base_model_path") == absbase and cf.get("base_model_name") == absbase,
          "config.json base model as an absolute path", (cf.get("base_model_path"), cf.get("base_model_name")))
    check(cf.get("base_model_hub_id") == "org/tiny-base", "config.json base_model_hub_id", cf.get("base_model_hub_id"))
    # gradual: mu(step) = mu0 + (mu1 - mu0) * step / steps, at step 4 of 8
    check(abs(cf.get("mag_weight", -1) - 0.4) < 1e-12 and cf.get("mag_mu0") == 0.2 and cf.get("mag_step") == 4,
          "mag_weight is the mu at the checkpoint's step, mag_mu0 the start",
          (cf.get("mag_weight"), cf.get("mag_mu0"), cf.get("mag_step")))
    check("mag_mu" not in cf, "no mag_mu duplicating mag_weight", sorted(cf))
    _, rd = run("nohub")
    ac = json.load(open(os.path.join(tu.latest(rd), "adapter_config.json")))
    check(ac.get("base_model_name_or_path") == absbase, "base_model_name_or_path defaults to the absolute base path",
          ac.get("base_model_name_or_path"))
    for tr in ("projections", "all"):
        conf, rd = run(tr, trainable=tr)
        ck = tu.latest(rd)
        files = sorted(os.listdir(ck))
        check("adapter_model.safetensors" not in files and "adapter_config.json" not in files,
              "trainable: %s: no PEFT adapter files" % tr, files)
        names = [n for _, _, n in read_manifest(os.path.join(ck, "MANIFEST"))]
        check(names == ["config.json", "liza_model.safetensors", "optimizer.safetensors", "trainer_state.json"],
              "trainable: %s: MANIFEST" % tr, names)
        p = tu.train(conf, ranks=1, extra=["--set", "schedule.total_steps=6"])
        check(p.returncode == 0 and "resuming from" in p.stderr, "trainable: %s: resumes" % tr, p.stderr[-800:])


def main():
    test_xxh64_vectors()
    root = tempfile.mkdtemp(prefix="tptt-peft-")
    try:
        test_checkpoint(root)
        test_train_runs(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
