"""test_liza_autograd - gradients of the chunked fp32 LiZA kernel against
autograd through the token-by-token recurrence (LIZA.md section 7).

`liza_tool IN OUT` (tests/liza_tool.c) runs tp_liza_fwd + tp_liza_bwd in fp32
on q̂, k̂, v̂, β, log α, doc_start and an upstream dy and writes y and the
gradients dq, dk, dv, dbeta, dlog_alpha. The reference is
oracle.liza_recurrence (tests/py/oracle.py, float64 torch, written from the
spec), differentiated by autograd with the loss Σ y ⊙ dy on leaf tensors that
have the kernel's shapes: q̂ [B, T, H, d], k̂, v̂, β [B, T, Hkv, d],
log α [B, T, Hkv]. The oracle works per query head, so the kv tensors are
expanded to the H query heads (query head h reads kv head h // (H/Hkv)) inside
the graph, and autograd sums each GQA group's gradients back onto the kv leaf.
Both sides see the same fp32-rounded inputs.

Cases: order 1, 2, 3 × trick dt, rot, rdt × linear true/false × decay on/off
× (T, C) in {13, 37} × {4, 8}; B = 2 rows (row 0 one document, row 1 three,
split by chunks, one of them shorter than a chunk, for T = 37 one ending on a
chunk boundary), H = 4, Hkv = 2, d = 8, β a d-vector per token and kv head.
Inputs are model-like: q̂, k̂ unit rows of silu(randn), v̂ = randn/sqrt(d),
β = sigmoid(randn), log α = log U(0.6, 1).

Checks: y max-relative (max|a-b| / max|b|) <= 1e-5; every gradient
RMS-relative (||a-b|| / ||b||) <= 1e-4; plus clear one-line errors for bad
tool input.

Environment: TPTT_LIZA_TOOL (binary), TPTT_SOURCE_DIR (for tests/py).
Prints one line per case and "test_liza_autograd: N passed, N failed".
"""
import itertools
import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("TPTT_SOURCE_DIR", os.path.dirname(HERE))
sys.path.insert(0, os.path.join(SRC, "tests", "py"))
import oracle  # noqa: E402
import safetensors_np as stnp  # noqa: E402
import testkit  # noqa: E402
from testkit import crashed  # noqa: E402

NAME = "test_liza_autograd"
TOOL = os.environ.get("TPTT_LIZA_TOOL", "liza_tool")
Y_TOL = 1e-5
GRAD_TOL = 1e-4
B, H, HKV, D = 2, 4, 2, 8
GRADS = ("q", "k", "v", "beta", "log_alpha")

kit = testkit.Checker(NAME)
check = kit.check
worst = {}  # class -> (error, case label)


def run_tool(args):
    return kit.run([TOOL] + list(args), timeout=300)


def doc_starts(T):
    """doc_start [B, T] (kernel format: the start of each token's document
    within its row). Row 0: one document; row 1: three."""
    cuts = {13: (6, 8), 37: (16, 19)}[T]  # lengths 6, 2, 5 / 16, 3, 18
    ds = np.zeros((B, T), dtype=np.int64)
    for t in range(T):
        ds[1, t] = max([0] + [c for c in cuts if c <= t])
    return ds


def make_inputs(T, decay, gen):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {
        "q": oracle.liza_feature(randn(B, T, H, D)),
        "k": oracle.liza_feature(randn(B, T, HKV, D)),
        "v": randn(B, T, HKV, D) / D ** 0.5,
        "beta": torch.sigmoid(randn(B, T, HKV, D)),
        "dy": randn(B, T, H, D),
    }
    if decay:
        x["log_alpha"] = torch.log(0.6 + 0.4 * torch.rand(B, T, HKV, generator=gen, dtype=torch.float64))
    # round to fp32 once: both sides see exactly these values
    return {n: t.to(torch.float32).numpy() for n, t in x.items()}


def write_input(path, x, ds, T, order, trick, linear, chunk):
    N = B * T
    tensors = {n: ("F32", x[n].reshape(N, -1)) for n in ("q", "k", "v", "beta")}
    if "log_alpha" in x:
        tensors["log_alpha"] = ("F32", x["log_alpha"].reshape(N, HKV))
    tensors["doc_start"] = ("F32", ds.reshape(N).astype(np.float32))
    tensors["dy"] = ("F32", x["dy"].reshape(N, H * D))
    meta = {"B": str(B), "T": str(T), "H": str(H), "Hkv": str(HKV), "d": str(D), "order": str(order),
            "trick": trick, "linear": "1" if linear else "0", "chunk": str(chunk)}
    stnp.save(path, tensors, meta)


def reference(x, ds, T, order, trick, linear, chunk):
    """y [B, T, H, d] and the gradients {name: array of the leaf's shape} by
    autograd through oracle.liza_recurrence in float64."""
    g = H // HKV
    leaf = {n: torch.tensor(x[n], dtype=torch.float64, requires_grad=True) for n in GRADS if n in x}

    def heads(t):  # [B, T, Hq, ...] -> [B*Hq, T, ...]
        return t.transpose(1, 2).reshape(B * t.shape[2], T, *t.shape[3:])

    def expand(t):  # kv head j serves query heads j*g .. j*g+g-1
        return t.repeat_interleave(g, dim=2)

    q = heads(leaf["q"])
    k, v, beta = (heads(expand(leaf[n])) for n in ("k", "v", "beta"))
    la = heads(expand(leaf["log_alpha"])) if "log_alpha" in leaf else None
    pos = torch.arange(T)[None, :] - torch.tensor(ds)  # position within the document, [B, T]
    pos = pos.repeat_interleave(H, dim=0)  # row of head n is n // H
    y = oracle.liza_recurrence(q, k, v, beta, la, pos, order=order, trick=trick, linear=linear, chunk=chunk)
    y = y.reshape(B, H, T, D).transpose(1, 2)  # [B, T, H, d]
    (y * torch.tensor(x["dy"], dtype=torch.float64)).sum().backward()
    return y.detach().numpy(), {n: t.grad.numpy() for n, t in leaf.items()}


def run_case(tmp, T, chunk, order, trick, linear, decay, gen):
    label = "T=%d C=%d n_h=%d %s %s %s" % (T, chunk, order, trick, "linear" if linear else "phi",
                                             "decay" if decay else "no-decay")
    x = make_inputs(T, decay, gen)
    ds = doc_starts(T)
    inp, out = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
    write_input(inp, x, ds, T, order, trick, linear, chunk)
    p = run_tool([inp, out])
    if not check(p.returncode == 0 and not crashed(p), label + ": liza_tool ran",
                 "rc %d: %s" % (p.returncode, p.stderr.decode("utf-8", "replace").strip())):
        return
    got, _ = stnp.load(out)
    y_ref, g_ref = reference(x, ds, T, order, trick, linear, chunk)
    N = B * T
    errs = {}
    a = got.get("y")
    errs["y"] = oracle.max_rel(a, y_ref.reshape(N, H * D)) if a is not None and a.shape == (N, H * D) \
        else float("inf")
    for n in GRADS:
        key = "d" + n
        if n not in g_ref:
            check(key not in got, label + ": no %s without decay" % key)
            continue
        b = g_ref[n].reshape(N, -1)
        a = got.get(key)
        errs[n] = oracle.rms_rel(a, b) if a is not None and a.shape == b.shape and np.all(np.isfinite(a)) \
            else float("inf")
    ok = check(errs["y"] <= Y_TOL, label + ": y max-relative %.3e > %.0e" % (errs["y"], Y_TOL))
    for n in GRADS:
        if n in errs:
            ok &= check(errs[n] <= GRAD_TOL, label + ": d%s RMS-relative %.3e > %.0e" % (n, errs[n], GRAD_TOL))
    for n, e in errs.items():
        if e >= worst.get(n, (-1.0, ""))[0]:
            worst[n] = (e, label)
    print("%s %-36s y %.2e  " % ("ok  " if ok else "FAIL", label, errs["y"])
          + "  ".join("d%s %.2e" % (n, errs[n]) for n in GRADS if n in errs), flush=True)


def bad_inputs(tmp):
    """The tool fails with one line and exit 1 on bad input."""
    T, gen = 13, torch.Generator().manual_seed(7)
    x = make_inputs(T, True, gen)
    ds = doc_starts(T)
    inp, out = os.path.join(tmp, "bad.safetensors"), os.path.join(tmp, "bad_out.safetensors")
    bad_ds = ds.copy()
    bad_ds[1, 3] = 2  # neither its position nor its predecessor's document start
    results = []
    write_input(inp, x, ds, T, 1, "nope", True, 4)
    results.append(("unknown trick", "trick", run_tool([inp, out])))
    write_input(inp, x, bad_ds, T, 1, "dt", True, 4)
    results.append(("bad doc_start", "doc_start", run_tool([inp, out])))
    y = dict(x)
    y["k"] = np.zeros((B, T, HKV, D + 1), dtype=np.float32)
    write_input(inp, y, ds, T, 1, "dt", True, 4)
    results.append(("k of the wrong shape", "'k'", run_tool([inp, out])))
    results.append(("missing input file", "missing", run_tool([os.path.join(tmp, "missing.safetensors"), out])))
    for what, needle, p in results:
        err = p.stderr.decode("utf-8", "replace")
        check(p.returncode == 1 and not crashed(p) and err.count("\n") == 1 and err.startswith("liza_tool: ")
              and needle in err, "error for %s" % what, "rc %d, stderr %r" % (p.returncode, err))
        check(not os.path.exists(out), "no output for %s" % what)


def main():
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1234)
    with tempfile.TemporaryDirectory(prefix=NAME + ".") as tmp:
        for (T, chunk), order, trick, linear, decay in itertools.product(
                [(13, 4), (13, 8), (37, 4), (37, 8)], (1, 2, 3), ("dt", "rot", "rdt"), (True, False),
                (True, False)):
            run_case(tmp, T, chunk, order, trick, linear, decay, gen)
        bad_inputs(tmp)
    print("worst: " + "  ".join("%s %.2e (%s)" % (("y" if n == "y" else "d" + n), e, lbl)
                                for n, (e, lbl) in worst.items()))
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
