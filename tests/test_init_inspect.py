"""tptt init-model + tptt inspect, for every architecture, bf16/f32, one and
several shards. Expected tensor names, shapes and counts are computed here from
FORMATS.md / LIZA.md section 1, independently of the C code; weights are read
with the pure-numpy reader in tests/py/safetensors_np.py."""
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
import safetensors_np as stnp  # noqa: E402
import testkit  # noqa: E402

TPTT = os.environ.get("TPTT", "tptt")
kit = testkit.Checker("test_init_inspect")
check = kit.check


def run(args, expect_rc=0):
    """Run tptt; one check: exit code expect_rc (0, 1 or 2) and no sanitizer report."""
    p = kit.run([TPTT] + args, text=True, timeout=None)
    check(p.returncode == expect_rc and not testkit.crashed(p),
          f"tptt {' '.join(args)}: rc {p.returncode} (want {expect_rc})\n{p.stderr}")
    return p


def expected_tensors(a):
    """name -> shape, from FORMATS.md tensor names and LIZA.md shapes."""
    D, F, V, L = a["hidden"], a["ffn"], a["vocab"], a["layers"]
    d = a.get("head_dim") or D // a["heads"]
    q, kv = a["heads"] * d, a["kv_heads"] * d
    t = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for l in range(L):
        p = f"model.layers.{l}."
        t[p + "input_layernorm.weight"] = (D,)
        t[p + "post_attention_layernorm.weight"] = (D,)
        t[p + "self_attn.q_proj.weight"] = (q, D)
        t[p + "self_attn.k_proj.weight"] = (kv, D)
        t[p + "self_attn.v_proj.weight"] = (kv, D)
        t[p + "self_attn.o_proj.weight"] = (D, q)
        if a["arch"] == "qwen2":
            t[p + "self_attn.q_proj.bias"] = (q,)
            t[p + "self_attn.k_proj.bias"] = (kv,)
            t[p + "self_attn.v_proj.bias"] = (kv,)
        t[p + "mlp.gate_proj.weight"] = (F, D)
        t[p + "mlp.up_proj.weight"] = (F, D)
        t[p + "mlp.down_proj.weight"] = (D, F)
    if not a.get("tie"):
        t["lm_head.weight"] = (V, D)
    return t


def init_args(a, out):
    args = ["init-model", "--arch", a["arch"], "--layers", str(a["layers"]), "--hidden", str(a["hidden"]),
            "--heads", str(a["heads"]), "--kv-heads", str(a["kv_heads"]), "--ffn", str(a["ffn"]),
            "--vocab", str(a["vocab"]), "--dtype", a["dtype"], "--shards", str(a["shards"]),
            "--seed", str(a.get("seed", 0))]
    if a.get("head_dim"):
        args += ["--head-dim", str(a["head_dim"])]
    if a.get("tie"):
        args.append("--tie")
    if a.get("window"):
        args += ["--sliding-window", str(a["window"])]
    return args + [out]


def check_model(a, out):
    name = f"{a['arch']}/{a['dtype']}/shards={a['shards']}"
    cfg = json.load(open(os.path.join(out, "config.json")))
    arch_class = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    check(cfg["architectures"] == [arch_class[a["arch"]]], f"{name}: architectures {cfg['architectures']}")
    for k, v in [("hidden_size", "hidden"), ("intermediate_size", "ffn"), ("num_hidden_layers", "layers"),
                 ("num_attention_heads", "heads"), ("num_key_value_heads", "kv_heads"), ("vocab_size", "vocab")]:
        check(cfg[k] == a[v], f"{name}: config {k}={cfg[k]} want {a[v]}")
    check(cfg["tie_word_embeddings"] == bool(a.get("tie")), f"{name}: tie_word_embeddings")
    if a["arch"] == "mistral":
        check(cfg["sliding_window"] == a.get("window"), f"{name}: sliding_window {cfg.get('sliding_window')}")
    want = expected_tensors(a)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    if a["shards"] == 1:
        check(files == ["model.safetensors"], f"{name}: files {files}")
        check(not os.path.exists(os.path.join(out, "model.safetensors.index.json")), f"{name}: stray index")
    else:
        n = a["shards"]
        check(files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)], f"{name}: files {files}")
        idx = json.load(open(os.path.join(out, "model.safetensors.index.json")))
        check(set(idx["weight_map"]) == set(want), f"{name}: index weight_map names")
        check(set(idx["weight_map"].values()) == set(files), f"{name}: every shard used by the index")
        # the index really says where each tensor is
        for f in files:
            raw = stnp.load_raw(os.path.join(out, f))
            for t in raw:
                check(idx["weight_map"][t] == f, f"{name}: {t} in {f} but index says {idx['weight_map'][t]}")
    cfg2, tensors = stnp.load_model_dir(out)
    check(set(tensors) == set(want), f"{name}: tensor names differ: {set(tensors) ^ set(want)}")
    nbytes = 0
    esize = 2 if a["dtype"] == "bf16" else 4
    for t, shape in want.items():
        if t not in tensors:
            continue
        arr = tensors[t]
        check(tuple(arr.shape) == shape, f"{name}: {t} shape {arr.shape} want {shape}")
        nbytes += int(np.prod(shape)) * esize
        check(np.all(np.isfinite(arr)), f"{name}: {t} has non-finite values")
    if a["shards"] > 1:
        check(idx["metadata"]["total_size"] == nbytes, f"{name}: total_size {idx['metadata']['total_size']} != {nbytes}")
    # init statistics: matrices ~ N(0, 0.02), norms ~ 1 + N(0, 0.1)
    big = tensors["model.embed_tokens.weight"].astype(np.float64)
    check(abs(big.std() - 0.02) < 0.002 and abs(big.mean()) < 0.002, f"{name}: embed std {big.std()}")
    norm = tensors["model.norm.weight"].astype(np.float64)
    check(abs(norm.mean() - 1.0) < 0.1 and 0.03 < norm.std() < 0.2, f"{name}: norm mean {norm.mean()} std {norm.std()}")
    # inspect agrees with the independent count
    params = sum(int(np.prod(s)) for s in want.values())
    p = run(["inspect", "--json", out])
    info = json.loads(p.stdout) if p.returncode == 0 else {}
    check(info.get("parameters") == params, f"{name}: inspect parameters {info.get('parameters')} want {params}")
    check(info.get("tensors") == len(want), f"{name}: inspect tensors")
    check(info.get("files") == len(files), f"{name}: inspect files")
    check(info.get("sharded") == (a["shards"] > 1), f"{name}: inspect sharded")
    disk = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    check(info.get("file_bytes") == disk, f"{name}: inspect file_bytes {info.get('file_bytes')} want {disk}")
    check(info.get("weight_bytes") == nbytes, f"{name}: inspect weight_bytes")
    mem = info.get("memory", {})
    check(mem.get("frozen_mapped_bytes") == nbytes, f"{name}: frozen bytes")
    d = a.get("head_dim") or a["hidden"] // a["heads"]
    D, r = a["hidden"], 8
    lora = a["layers"] * (r * (D + a["heads"] * d) * 2 + r * (D + a["kv_heads"] * d) * 2 + 1)
    check(mem.get("trainable_params") == lora, f"{name}: trainable params {mem.get('trainable_params')} want {lora}")
    check(mem.get("private_bytes_recompute", 0) <= mem.get("private_bytes", 0), f"{name}: recompute saves memory")
    human = run(["inspect", out]).stdout
    for needle in [arch_class[a["arch"]], f"{params}", "frozen weights", "private total", "OpenBLAS", "oneDNN"]:
        check(needle in human, f"{name}: inspect output lacks {needle!r}")
    return tensors


M64 = (1 << 64) - 1


def ref_normals(seed, stream, count, std):
    """The first `count` values of one init-model RNG stream, reimplemented
    here from rng.h/init_model.h: splitmix64-seeded xoshiro256**, Box-Muller
    (cos branch), value = float32(std * z)."""
    x = (seed ^ (stream * 0xD1342543DE82EF95)) & M64
    s = []
    for _ in range(4):
        x = (x + 0x9E3779B97F4A7C15) & M64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        s.append(z ^ (z >> 31))
    rotl = lambda v, k: ((v << k) | (v >> (64 - k))) & M64

    def nxt():
        r = (rotl((s[1] * 5) & M64, 7) * 9) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        return r

    out = []
    for _ in range(count):
        u1, u2 = (nxt() >> 11) * 2.0 ** -53, (nxt() >> 11) * 2.0 ** -53
        u1 = max(u1, 2.0 ** -60)
        out.append(std * math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2))
    return np.array(out, dtype=np.float32)


def check_thread_determinism(tmp):
    """Blocks of 2^20 elements are filled in parallel, each from its own
    stream: the bytes must not depend on OMP_NUM_THREADS, and every block must
    draw from the stream init_model.h documents (not, say, block 0's again)."""
    a = {"arch": "llama", "layers": 1, "hidden": 512, "heads": 4, "kv_heads": 2, "ffn": 2560, "vocab": 5000,
         "dtype": "bf16", "shards": 2, "seed": 7}
    blobs = {}
    for t in [1, 2, 3]:
        out = os.path.join(tmp, f"threads{t}")
        env = dict(os.environ, OMP_NUM_THREADS=str(t))
        p = kit.run([TPTT] + init_args(a, out), env=env, text=True, timeout=None)
        check(p.returncode == 0 and not testkit.crashed(p), f"init-model with {t} threads: rc {p.returncode}\n{p.stderr}")
        blobs[t] = {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))}
    check(len(blobs[1]) == 4, f"threads: files {sorted(blobs[1])}")
    for t in [2, 3]:
        diff = [f for f in blobs[1] if blobs[1][f] != blobs[t].get(f)]
        check(not diff, f"OMP_NUM_THREADS=1 and ={t} write different bytes in {diff}")
    _, tensors = stnp.load_model_dir(os.path.join(tmp, "threads2"))
    emb = tensors["model.embed_tokens.weight"].astype(np.float32).ravel()  # 2.56M elements: 3 blocks
    check(emb.size == 2560000, f"embed size {emb.size}")
    blk = 1 << 20
    for b in range(3):
        want = stnp.bf16_bits_to_f32(stnp.f32_to_bf16_bits(ref_normals(7, 1 | (b << 40), 64, 0.02)))
        got = emb[b * blk:b * blk + 64]
        check(np.array_equal(got, want), f"embed block {b} is not stream (1 | {b} << 40): {got[:4]} vs {want[:4]}")


def peak_rss_anon(cmd, env):
    """Run cmd, polling /proc/PID/status every 20 ms; (returncode, peak
    RssAnon bytes, stderr). RssAnon is the private memory: the model's
    weights are a shared file mapping (RssFile)."""
    import subprocess
    import time
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        peak = 0
        while p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.02)
        err.seek(0)
        return p.returncode, peak, err.read().decode(errors="replace")


def check_memory_estimate(tmp):
    """inspect's private-memory prediction against the peak RssAnon of a real
    one-step LoRA + LiZA run, with and without recompute: within 10%. The
    model is sized so that activations, not the process's libraries, make
    most of the memory (~0.3-0.5 GiB)."""
    exe = shutil.which(TPTT) or TPTT
    with open(exe, "rb") as f:
        if b"__asan_init" in f.read():
            print("memory estimate: skipped in the sanitizer build (shadow memory and quarantine are not the trainer's)")
            return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import train_util as tu
    model = os.path.join(tmp, "mem-model")
    run(["init-model", "--arch", "mistral", "--layers", "2", "--hidden", "512", "--heads", "8", "--kv-heads", "2",
         "--ffn", "1536", "--vocab", "32768", "--dtype", "bf16", "--seed", "1", model])
    rnd = np.random.default_rng(0)
    with open(os.path.join(tmp, "mem.jsonl"), "w") as f:
        for _ in range(2):
            f.write(json.dumps({"ids": [int(x) for x in rnd.integers(3, 32768, 3000)]}) + "\n")
    data = os.path.join(tmp, "mem.tok")
    run(["make-shard", "--jsonl", "-o", data, os.path.join(tmp, "mem.jsonl")])
    seq = 2048
    p = run(["inspect", "--json", "--seq-len", str(seq), "--lora-rank", "8", model])
    mem = json.loads(p.stdout)["memory"] if p.returncode == 0 else {}
    for recompute in [False, True]:
        rd = os.path.join(tmp, f"mem-run-{int(recompute)}")
        conf = os.path.join(tmp, f"mem-{int(recompute)}.yaml")
        tu.write_config(conf, model, data, rd, lora__r=8, lora__dropout=0.0, liza__preset="delta_product",
                        liza__chunk_size=64, compute__matmul="auto", compute__recompute=recompute,
                        data__seq_len=seq, batch__global=1, schedule__warmup_steps=0, schedule__total_steps=1,
                        checkpoint__every=0)
        env = dict(os.environ, OMP_NUM_THREADS="2")
        rc, peak, err = peak_rss_anon([TPTT, "train", conf], env)
        check(rc == 0, f"memory run (recompute={recompute}): rc {rc}\n{err[-2000:]}")
        want = mem.get("private_bytes_recompute" if recompute else "private_bytes", 0)
        check(want > 0 and abs(peak / want - 1) <= 0.10,
              f"recompute={recompute}: peak RssAnon {peak / 2**20:.1f} MiB vs inspect {want / 2**20:.1f} MiB "
              f"(ratio {peak / max(want, 1):.3f}, want within 10%)")
        print(f"memory estimate, recompute={recompute}: measured {peak / 2**20:.1f} MiB, "
              f"inspect {want / 2**20:.1f} MiB, ratio {peak / max(want, 1):.3f}")


def main():
    tmp = tempfile.mkdtemp(prefix="tptt-init-")
    try:
        base = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "ffn": 48, "vocab": 301}
        cases = []
        for arch in ["llama", "mistral", "qwen2"]:
            for dtype in ["bf16", "f32"]:
                for shards in [1, 3]:
                    a = dict(base, arch=arch, dtype=dtype, shards=shards)
                    if arch == "mistral":
                        a["window"] = 8
                    if arch == "qwen2":
                        a["tie"] = True
                    if arch == "llama" and shards == 3:
                        a["head_dim"] = 12  # head_dim != D/H
                    cases.append(a)
        models = {}
        for i, a in enumerate(cases):
            out = os.path.join(tmp, f"m{i}")
            run(init_args(a, out))
            models[i] = check_model(a, out)
        # values do not depend on the sharding, and are seeded
        for i, a in enumerate(cases):
            for j, b in enumerate(cases):
                if j > i and a["arch"] == b["arch"] and a["dtype"] == b["dtype"] and a.get("head_dim") == b.get("head_dim"):
                    same = all(np.array_equal(models[i][t], models[j][t]) for t in models[i])
                    check(same, f"{a['arch']}/{a['dtype']}: values differ between 1 and 3 shards")
        a = dict(cases[0], seed=1)
        run(init_args(a, os.path.join(tmp, "seed1")))
        _, other = stnp.load_model_dir(os.path.join(tmp, "seed1"))
        check(not np.array_equal(other["model.embed_tokens.weight"], models[0]["model.embed_tokens.weight"]),
              "different seeds give different weights")
        a = dict(cases[0], seed=0)
        run(init_args(a, os.path.join(tmp, "seed0")))
        same_bytes = all(open(os.path.join(tmp, d, "model.safetensors"), "rb").read() ==
                         open(os.path.join(tmp, "m0", "model.safetensors"), "rb").read() for d in ["seed0"])
        check(same_bytes, "same seed gives byte-identical files")
        check_thread_determinism(tmp)
        check_memory_estimate(tmp)
        # refuses to overwrite without --force; --force switches layout cleanly
        p = run(init_args(cases[0], os.path.join(tmp, "m0")), expect_rc=1)
        check("--force" in p.stderr and p.stderr.count("\n") == 1, f"overwrite refusal message: {p.stderr!r}")
        run(init_args(dict(cases[0], shards=2), os.path.join(tmp, "m0"))[:-1] + ["--force", os.path.join(tmp, "m0")])
        check(not os.path.exists(os.path.join(tmp, "m0", "model.safetensors")), "--force removed the old single file")
        check_model(dict(cases[0], shards=2), os.path.join(tmp, "m0"))
        # argument errors: one line, non-zero
        for args, needle in [
            (["init-model", "--layers", "1", "--hidden", "8", "--heads", "2", "--ffn", "8", "--vocab", "9", "x"], "--arch"),
            (init_args(dict(cases[0], dtype="f64"), os.path.join(tmp, "e1")), "--dtype"),
            (init_args(dict(cases[0], shards=999), os.path.join(tmp, "e2")), "--shards"),
            (init_args(dict(cases[0], kv_heads=3), os.path.join(tmp, "e3")), "num_key_value_heads"),
            (init_args(dict(cases[0], arch="gpt2"), os.path.join(tmp, "e4")), "--arch"),
            (init_args(dict(cases[0], window=4), os.path.join(tmp, "e5")), "sliding-window"),
            (["inspect", os.path.join(tmp, "nonexistent")], "config.json"),
        ]:
            p = run(args, expect_rc=1)
            lines = [l for l in p.stderr.splitlines() if l.strip()]
            check(len(lines) == 1 and needle in lines[0], f"{args}: stderr {p.stderr!r} should be one line with {needle!r}")
        run(["init-model", "--bogus"], expect_rc=2)
        run(["frobnicate"], expect_rc=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
