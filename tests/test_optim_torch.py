"""test_optim_torch - src/train/optim against PyTorch and transformers.

`optim_tool run` (tests/optim_tool.c) trains a few parameter tensors in
several groups over given float32 gradients: LR schedule, global gradient-norm
clipping, AdamW. The same run is replayed with torch.optim.AdamW (foreach off,
the single-tensor path), torch.nn.utils.clip_grad_norm_ over all tensors, and
the schedule formulas of transformers' get_{cosine,linear,constant}_schedule_
with_warmup written out below (transformers itself is not installed), with the
min_lr floor of optim.h. Checks: trajectories within 1e-6 relative over 20
steps (they are expected to agree bit for bit when no clipping is involved),
norms and clip coefficients within 1e-6, schedule values within 1e-12 (expected
exact), identical output with 1 and 4 OpenMP threads, clear errors.

Environment: TPTT_OPTIM_TOOL (binary). Prints "N passed, N failed".
"""
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
import testkit  # noqa: E402
from testkit import crashed  # noqa: E402

NAME = "test_optim_torch"
TOOL = os.environ.get("TPTT_OPTIM_TOOL", "optim_tool")
F32 = np.float32

kit = testkit.Checker(NAME)
check = kit.check


def run_tool(args, stdin=None, threads=2):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return kit.run([TOOL] + list(args), input=stdin, env=env, timeout=300)


# ---- transformers' schedules (optimization.py), plus the min_lr floor ------

def hf_lambda(kind, current_step, num_warmup_steps, num_training_steps):
    if kind == "cosine":
        num_cycles = 0.5
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))
    if kind == "linear":
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        return max(0.0, float(num_training_steps - current_step) /
                   float(max(1, num_training_steps - num_warmup_steps)))
    assert kind == "constant"
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1.0, num_warmup_steps))
    return 1.0


def sched_lr(s, step):
    """LambdaLR's base_lr * lambda(step); after warmup the floor of optim.h."""
    f = hf_lambda(s["kind"], step, s["warmup_steps"], s["total_steps"])
    if step < s["warmup_steps"] or s["min_lr"] == 0:
        return s["peak_lr"] * f
    return s["min_lr"] + (s["peak_lr"] - s["min_lr"]) * f


# ---- schedules ---------------------------------------------------------------

def test_schedules():
    cases = [("cosine", 1e-3, 0.0, 10, 110), ("cosine", 3e-4, 3e-5, 7, 50), ("cosine", 2e-5, 0.0, 0, 13),
             ("cosine", 1e-3, 0.0, 5, 5), ("linear", 1e-3, 0.0, 10, 110), ("linear", 5e-4, 1e-5, 3, 40),
             ("linear", 1e-2, 0.0, 0, 1), ("constant", 1e-3, 0.0, 10, 100), ("constant", 7e-4, 0.0, 0, 9),
             ("constant", 7e-4, 1e-4, 4, 9)]
    exact = total = 0
    worst = 0.0
    for kind, peak, mn, w, T in cases:
        steps = list(range(0, T + 6))
        p = run_tool(["lr", kind, repr(peak), repr(mn), w, T] + steps)
        if not check(p.returncode == 0 and not crashed(p), "lr %s %g %g %d %d" % (kind, peak, mn, w, T),
                     p.stderr.decode()):
            continue
        got = [float(x) for x in p.stdout.decode().split()]
        check(len(got) == len(steps), "lr %s: one value per step" % kind)
        s = dict(kind=kind, peak_lr=peak, min_lr=mn, warmup_steps=w, total_steps=T)
        for st, g in zip(steps, got):
            want = sched_lr(s, st)
            err = abs(g - want) / max(abs(want), 1e-300)
            worst = max(worst, err if want else abs(g))
            total += 1
            exact += g == want
            check(abs(g - want) <= 1e-12 * abs(want) + (1e-300 if want == 0 else 0),
                  "lr %s peak=%g min=%g w=%d T=%d step %d" % (kind, peak, mn, w, T, st),
                  "got %.17g want %.17g" % (g, want))
    print("schedules: %d/%d values bit-identical to the transformers formulas, worst rel diff %.3g"
          % (exact, total, worst))


# ---- AdamW + clipping ----------------------------------------------------------

def make_spec(rng, sizes, groups, wds, steps, sched, max_norm, beta1=0.9, beta2=0.999, eps=1e-8, gscale=None,
              outliers=False):
    params = []
    for n, gi in zip(sizes, groups):
        params.append({"group": gi, "init": [float(x) for x in rng.standard_normal(n).astype(F32)]})
    grads = []
    for s in range(steps):
        scale = gscale(s) if gscale else 1.0
        step = []
        for k, n in enumerate(sizes):
            g = (rng.standard_normal(n) * scale).astype(F32)
            g[rng.random(n) < 0.05] = 0  # some exact zeros: update is 0, only decay acts
            if outliers and k == 0 and n > 3:
                g[1] = F32(1e-9)  # far below eps
                g[2] = F32(-3e4)
            step.append([float(x) for x in g])
        grads.append(step)
    return {"beta1": beta1, "beta2": beta2, "eps": eps, "max_norm": max_norm, "schedule": sched,
            "weight_decay": wds, "params": params, "grads": grads}


def parse_run(text, nparams):
    steps = []
    for line in text.splitlines():
        f = line.split()
        if f[0] == "step":
            steps.append({"lr": float(f[3]), "norm": float(f[5]), "coef": float(F32(f[7])), "params": []})
        else:
            assert f[0] == "param" and int(f[1]) == len(steps[-1]["params"])
            steps[-1]["params"].append(np.array([F32(x) for x in f[2:]], dtype=F32))
    assert all(len(s["params"]) == nparams for s in steps)
    return steps


def torch_replay(spec, exact_norm=False):
    """The same run with PyTorch; per step (lr, total_norm, coef, [params]).
    exact_norm: clip with the float64 norm instead of clip_grad_norm_'s float32
    one (to see the rest of the run without torch's accumulation error)."""
    ps = [torch.nn.Parameter(torch.tensor(p["init"], dtype=torch.float32)) for p in spec["params"]]
    groups = [{"params": [ps[i] for i, p in enumerate(spec["params"]) if p["group"] == g], "weight_decay": wd}
              for g, wd in enumerate(spec["weight_decay"])]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=spec["schedule"]["peak_lr"], betas=(spec["beta1"], spec["beta2"]),
                            eps=spec["eps"], foreach=False)
    out = []
    for s, gs in enumerate(spec["grads"]):
        lr = sched_lr(spec["schedule"], s)
        for g in opt.param_groups:
            g["lr"] = lr  # what LambdaLR sets (base_lr * lambda) when min_lr is 0
        for p, g in zip(ps, gs):
            p.grad = torch.tensor(g, dtype=torch.float32)
        norm, coef = float("nan"), 1.0
        if spec["max_norm"] > 0 and not exact_norm:
            tn = torch.nn.utils.clip_grad_norm_(ps, spec["max_norm"])
            norm = float(tn)
            coef = float(torch.clamp(spec["max_norm"] / (tn + 1e-6), max=1.0))
        elif spec["max_norm"] > 0:
            norm = math.sqrt(sum(float(np.sum(np.square(np.array(g, np.float64)))) for g in gs))
            coef = float(F32(min(1.0, spec["max_norm"] / (norm + 1e-6))))
            for p in ps:
                p.grad.mul_(coef)
        opt.step()
        out.append((lr, norm, coef, [p.detach().numpy().copy() for p in ps]))
    return out


def compare(what, spec, tool_steps, ref, tol=1e-6, norm_tol=1e-6):
    """Assert agreement; returns (max rel diff of params, count of differing floats)."""
    check(len(tool_steps) == len(ref), what + ": step count")
    worst, worst_norm, ndiff, nall = 0.0, 0.0, 0, 0
    for s, (t, (lr, norm, coef, params)) in enumerate(zip(tool_steps, ref)):
        check(abs(t["lr"] - lr) <= 1e-12 * abs(lr), "%s step %d lr" % (what, s), "%.17g vs %.17g" % (t["lr"], lr))
        if spec["max_norm"] > 0:
            worst_norm = max(worst_norm, abs(t["norm"] - norm) / norm, abs(t["coef"] - coef) / coef)
            check(abs(t["norm"] - norm) <= norm_tol * norm, "%s step %d norm" % (what, s),
                  "%.9g vs %.9g" % (t["norm"], norm))
            check(abs(t["coef"] - coef) <= norm_tol * coef, "%s step %d clip coef" % (what, s),
                  "%.9g vs %.9g" % (t["coef"], coef))
        else:
            check(t["coef"] == 1.0, "%s step %d: no clipping" % (what, s))
        for i, (a, b) in enumerate(zip(t["params"], params)):
            # relative to the value, with the tensor's RMS as the floor for
            # values that cross zero
            b64 = b.astype(np.float64)
            err = np.abs(a - b64) / np.maximum(np.abs(b64), math.sqrt(float(np.mean(b64 * b64))))
            worst = max(worst, float(err.max()))
            ndiff += int((a != b).sum())
            nall += a.size
            check(float(err.max()) <= tol, "%s step %d param %d" % (what, s, i),
                  "max rel diff %.3g at %d: %.9g vs %.9g" % (err.max(), err.argmax(), a[err.argmax()],
                                                             b[err.argmax()]))
    print("%s: params max rel diff %.3g, %d of %d floats differ; norm/coef max rel diff %.3g"
          % (what, worst, ndiff, nall, worst_norm))
    return worst, ndiff


def run_spec(what, spec, threads=2):
    p = run_tool(["run", "-"], stdin=json.dumps(spec).encode(), threads=threads)
    if not check(p.returncode == 0 and not crashed(p), what + ": optim_tool run",
                 p.stderr.decode("utf-8", "replace")[:2000]):
        return None, None
    return p.stdout, parse_run(p.stdout.decode(), len(spec["params"]))


def test_adamw():
    rng = np.random.default_rng(20240611)

    # three groups (decay, none, strong decay), lengths around torch's vector
    # width and the 4096-element block, gradients from 1e-9 (below eps) to 3e4;
    # no clipping: expected bit-exact
    spec = make_spec(rng, [7, 33, 4099, 1, 16], [0, 1, 2, 1, 0], [0.01, 0.0, 0.1], 20,
                     dict(kind="cosine", peak_lr=1e-2, min_lr=0.0, warmup_steps=3, total_steps=20), 0.0,
                     gscale=lambda s: 10.0 ** ((s % 5) - 2), outliers=True)
    _, steps = run_spec("adamw cosine 3 groups", spec)
    if steps:
        _, ndiff = compare("adamw cosine 3 groups", spec, steps, torch_replay(spec))
        check(ndiff == 0, "adamw without clipping is bit-identical to torch", "%d floats differ" % ndiff)

    # global clipping over all tensors (clipped on some steps, not others),
    # linear schedule with a floor, non-default betas/eps; one tensor big
    # enough for the OpenMP paths
    spec = make_spec(rng, [40000, 64, 3, 5000], [0, 1, 1, 0], [0.05, 0.0], 20,
                     dict(kind="linear", peak_lr=3e-3, min_lr=1e-4, warmup_steps=5, total_steps=20), 50.0,
                     beta1=0.8, beta2=0.95, eps=1e-6, gscale=lambda s: [0.1, 0.3, 1.0][s % 3])
    out1, steps = run_spec("adamw linear clip", spec, threads=1)
    if steps:
        check(any(s["coef"] < 1 for s in steps) and any(s["coef"] == 1 for s in steps),
              "clip scenario clips some steps only")
        compare("adamw linear clip", spec, steps, torch_replay(spec))
        exact_norm_replay("adamw linear clip", spec, steps)
        out4, _ = run_spec("adamw linear clip, 4 threads", spec, threads=4)
        check(out4 == out1, "optim_tool output identical with 1 and 4 OpenMP threads")

    # constant schedule without warmup, tight clipping every step, huge and tiny
    # gradients
    spec = make_spec(rng, [300, 17], [0, 0], [0.2], 20,
                     dict(kind="constant", peak_lr=5e-4, min_lr=0.0, warmup_steps=0, total_steps=20), 0.5,
                     gscale=lambda s: 1e3 if s % 2 else 1e-6)
    _, steps = run_spec("adamw constant clip", spec)
    if steps:
        compare("adamw constant clip", spec, steps, torch_replay(spec))
        exact_norm_replay("adamw constant clip", spec, steps)

    # one gradient of 3e4 among 40000 of order 1: clip_grad_norm_'s float32
    # norm loses the small terms (~3e-6 relative); ours (double) matches the
    # float64 norm. Against torch the norm tolerance is 10x looser here.
    spec = make_spec(rng, [40000, 64], [0, 1], [0.05, 0.0], 20,
                     dict(kind="cosine", peak_lr=3e-3, min_lr=0.0, warmup_steps=2, total_steps=20), 50.0,
                     beta1=0.8, beta2=0.95, eps=1e-6, outliers=True)
    _, steps = run_spec("adamw clip outlier", spec)
    if steps:
        compare("adamw clip outlier", spec, steps, torch_replay(spec), norm_tol=1e-5)
        exact_norm_replay("adamw clip outlier", spec, steps)


def exact_norm_replay(what, spec, steps):
    """torch's run clipped with the float64 norm: only clip_grad_norm_'s float32
    norm separates it from ours, so it must agree bit for bit."""
    _, ndiff = compare(what + " vs torch with float64 norm", spec, steps, torch_replay(spec, exact_norm=True),
                       norm_tol=1e-12)
    check(ndiff == 0, what + ": bit-identical to torch given the same clip coefficient", "%d differ" % ndiff)


def test_errors():
    base = dict(kind="cosine", peak_lr=1e-3, min_lr=0.0, warmup_steps=2, total_steps=4)
    spec = {"schedule": dict(base, warmup_steps=9), "weight_decay": [0.0], "params": [], "grads": []}
    p = run_tool(["run", "-"], stdin=json.dumps(spec).encode())
    err = p.stderr.decode()
    check(p.returncode == 1 and not crashed(p) and "warmup_steps (9) > total_steps (4)" in err,
          "warmup > total is an error naming both", err)
    for bad, field in ((dict(base, min_lr=1.0), "min_lr"), (dict(base, peak_lr=-1.0), "peak_lr"),
                       (dict(base, kind="cosin"), "kind")):
        p = run_tool(["run", "-"], stdin=json.dumps(dict(spec, schedule=bad)).encode())
        err = p.stderr.decode()
        check(p.returncode == 1 and not crashed(p) and field in err, "bad %s is an error" % field, err)
    p = run_tool(["run", "-"], stdin=json.dumps(dict(spec, schedule=base, beta2=1.0)).encode())
    check(p.returncode == 1 and "beta2" in p.stderr.decode(), "beta2 = 1 is an error", p.stderr.decode())


def main():
    torch.set_num_threads(1)
    test_schedules()
    test_adamw()
    test_errors()
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
