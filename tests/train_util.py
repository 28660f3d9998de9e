"""Helpers for the trainer's integration tests: a tiny model and data set,
YAML configs, and running `tptt train` under a real mpirun."""
import json
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
import safetensors_np as stnp  # noqa: E402

TPTT = os.environ.get("TPTT", "tptt")
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1",
           "OMPI_MCA_btl": "self,vader,tcp", "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def make_model(path, arch="llama", vocab=64, extra=()):
    subprocess.run([TPTT, "init-model", "--arch", arch, "--layers", "2", "--hidden", "32", "--heads", "4",
                    "--kv-heads", "2", "--ffn", "64", "--vocab", str(vocab), "--dtype", "f32", "--init-std", "0.2",
                    "--seed", "3", "--force", path] + list(extra), check=True, capture_output=True)


def make_data(path, vocab=64, docs=60, seed=0):
    rnd = random.Random(seed)
    jl = path + ".jsonl"
    with open(jl, "w") as f:
        for _ in range(docs):
            n = rnd.randint(4, 50)
            # a learnable pattern: arithmetic progressions with noise
            a, b = rnd.randrange(vocab), rnd.randrange(1, 5)
            ids = [(a + b * i) % vocab if rnd.random() > 0.1 else rnd.randrange(vocab) for i in range(n)]
            f.write(json.dumps({"ids": ids}) + "\n")
    subprocess.run([TPTT, "make-shard", "--jsonl", "-o", path, jl], check=True, capture_output=True)


def write_config(path, model, data, run_dir, **over):
    cfg = {
        "model": {"path": model},
        "run": {"dir": run_dir},
        "seed": 5,
        "trainable": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "liza": {"enabled": True, "preset": "gated_delta_rule", "chunk_size": 8},
        "mag": {"mode": "learnable", "mu0": 0.5},
        "compute": {"matmul": "f32"},
        "data": {"format": "tokens", "path": data, "seq_len": 32},
        "batch": {"global": 4, "micro": 1},
        "optimizer": {"lr": 1e-2, "max_grad_norm": 1.0, "weight_decay": 0.01},
        "schedule": {"kind": "cosine", "warmup_steps": 2, "total_steps": 8},
        "checkpoint": {"every": 2, "keep": 2},
        "logging": {"every": 1},
    }
    for k, v in over.items():
        sec, key = k.split("__")
        cfg.setdefault(sec, {})[key] = v
    with open(path, "w") as f:
        f.write(to_yaml(cfg))
    return cfg


def to_yaml(d, ind=0):
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.append(" " * ind + f"{k}:")
            out.append(to_yaml(v, ind + 2))
        else:
            out.append(" " * ind + f"{k}: {scalar(v)}")
    return "\n".join(out) + ("\n" if ind == 0 else "")


def scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(scalar(x) for x in v) + "]"
    return str(v)


def train(config, ranks=1, extra=(), env=None, timeout=300):
    e = dict(os.environ)
    e.update(MPI_ENV)
    if env:
        e.update(env)
    cmd = [TPTT, "train", config] + list(extra)
    if ranks > 0:
        cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(ranks)] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout)


def losses(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["loss"]
    return out


def latest(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "LATEST")) as f:
        return os.path.join(run_dir, "checkpoints", f.read().strip())


def adapter_bytes(run_dir):
    ck = latest(run_dir)
    return (open(os.path.join(ck, "adapter_model.safetensors"), "rb").read(),
            open(os.path.join(ck, "liza_model.safetensors"), "rb").read())


def adapter_tensors(run_dir):
    ck = latest(run_dir)
    a, _ = stnp.load(os.path.join(ck, "adapter_model.safetensors"))
    b, _ = stnp.load(os.path.join(ck, "liza_model.safetensors"))
    a.update(b)
    return a
