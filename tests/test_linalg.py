"""ScaLAPACK SVD, randomized SVD, PiSSA and LoRA truncation (src/linalg/svd.h)
against numpy's LAPACK, on 1, 2 and 4 MPI ranks under a real mpirun.

Driven through tests/test_svd.c's --tool mode (built next to this test's
working directory by tptt_c_test(test_svd)). Checks:
  - singular values equal numpy's to 1e-10 relative (to s_0), for random,
    decaying-spectrum, non-square (tall and wide) and rank-deficient matrices,
    with block sizes that spread the matrix over every rank (4) and the default (64);
  - singular subspaces: principal angles between our U_k / V_k and numpy's
    (where the spectrum has a gap after k) below 1e-8;
  - randomized subspace iteration (K power iterations): the top-r values of a
    decaying spectrum to 1e-6 relative with K = 4, and the subspace angles;
  - PiSSA: A = sqrt(S_r/s) V_r^T, B = U_r sqrt(S_r/s) (up to signs, as numpy's),
    s*B*A + W_res == W in fp32, exact and randomized;
  - LoRA truncation: the rank-R product equals numpy's rank-R truncation of
    s*B*A, the energy matches numpy, R >= r reproduces s*B*A."""
import os
import subprocess
import sys
import tempfile

import numpy as np

TOOL = os.path.abspath("test_svd")
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
fails = []


def check(cond, msg):
    if not cond:
        fails.append(msg)
        print("FAIL:", msg, flush=True)


def write_mat(path, a):
    a = np.ascontiguousarray(a, dtype=np.float64)
    with open(path, "wb") as f:
        np.array(a.shape, dtype=np.int64).tofile(f)
        a.tofile(f)


def angles(x, y):
    """largest principal angle (radians) between the column spaces of x and y (orthonormal)"""
    # sin of the largest angle = ||(I - x x^T) y||_2 (arccos of the cosines loses half the digits)
    return float(np.arcsin(min(1.0, np.linalg.norm(y - x @ (x.T @ y), 2)))) if x.size else 0.0


def spectrum(rng, m, n, sv):
    k = min(m, n)
    q1, _ = np.linalg.qr(rng.standard_normal((m, k)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (q1 * sv) @ q2.T


class Batch:
    """tool commands run together in one mpirun per rank count; each has a checker"""

    def __init__(self, tmp):
        self.tmp, self.jobs, self.nin = tmp, [], 0

    def matrix(self, a):
        path = os.path.join(self.tmp, f"in{self.nin}.bin")
        self.nin += 1
        write_mat(path, a)
        return path

    def add(self, args, checker):
        self.jobs.append((args, checker))

    def run(self, ranks_list=(1, 2, 4)):
        for ranks in ranks_list:
            lines, outs = [], []
            for j, (args, _) in enumerate(self.jobs):
                out = os.path.join(self.tmp, f"out{ranks}_{j}.bin")
                if os.path.exists(out):
                    os.unlink(out)
                outs.append(out)
                lines.append(" ".join(str(a) for a in [args[0], args[1], out] + list(args[2:])))
            bf = os.path.join(self.tmp, f"batch{ranks}.txt")
            with open(bf, "w") as f:
                f.write("\n".join(lines) + "\n")
            cmd = [TOOL, "--batch", bf]
            if ranks > 1:
                cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(ranks)] + cmd
            p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
            check(p.returncode == 0, f"np{ranks}: batch exit {p.returncode}: {p.stderr[-800:]}")
            for (args, checker), out in zip(self.jobs, outs):
                if not os.path.exists(out):
                    check(False, f"np{ranks}: {args[0]} wrote no result")
                    continue
                checker(ranks, np.fromfile(out, dtype=np.float64))
        self.jobs = []


def main():
    if not os.path.exists(TOOL):
        print("test_svd tool not built at", TOOL)
        return 1
    rng = np.random.default_rng(15)
    cases = []
    for (m, n) in [(60, 60), (97, 31), (31, 97), (200, 80)]:
        k = min(m, n)
        cases.append((f"random {m}x{n}", rng.standard_normal((m, n))))
        cases.append((f"decaying {m}x{n}", spectrum(rng, m, n, np.exp(-0.15 * np.arange(k)))))
        sv = np.where(np.arange(k) < k // 3, 1.0 + np.arange(k), 0.0)
        cases.append((f"rank-deficient {m}x{n} (rank {k // 3})", spectrum(rng, m, n, sv)))
    with tempfile.TemporaryDirectory() as tmp:
        bt = Batch(tmp)
        for name, a in cases:
            inp = bt.matrix(a)
            for block in (4, 64):
                def chk(ranks, r, a=a, name=name, block=block):
                    m, n = a.shape
                    k = min(m, n)
                    U, S, Vt = np.linalg.svd(a, full_matrices=False)
                    tag = f"{name} np{ranks} block {block}"
                    s, u, vt = r[:k], r[k:k + m * k].reshape(m, k), r[k + m * k:].reshape(k, n)
                    rel = np.max(np.abs(s - S)) / S[0]
                    check(rel < 1e-10, f"{tag}: singular values differ by {rel:.3g} relative")
                    rec = np.linalg.norm(a - (u * s) @ vt) / np.linalg.norm(a)
                    check(rec < 1e-12, f"{tag}: reconstruction {rec:.3g}")
                    # subspaces at gaps of the spectrum among the leading components
                    nz = int(np.sum(S > 1e-10 * S[0]))
                    for kk in sorted({1, 3, nz // 2, nz}):
                        if kk < 1 or kk > nz or (kk < k and S[kk - 1] - S[kk] < 1e-3 * S[0]):
                            continue
                        au, av = angles(u[:, :kk], U[:, :kk]), angles(vt[:kk].T, Vt[:kk].T)
                        check(au < 1e-9 and av < 1e-9, f"{tag}: top-{kk} subspace angles U {au:.3g} V {av:.3g}")
                bt.add(["svd", inp, 0, -1, 0, 0, block], chk)
        bt.run()
        print(f"ok: exact SVD of {len(cases)} matrices on 1, 2, 4 ranks, blocks 4 and 64", flush=True)

        # randomized subspace iteration: the error falls as (s_q+1 / s_k)^(2K+1)
        a = spectrum(rng, 150, 90, np.exp(-0.5 * np.arange(90)))
        inp = bt.matrix(a)
        U, S, Vt = np.linalg.svd(a, full_matrices=False)
        for niter, tol in ((0, 1e-2), (1, 1e-5), (4, 1e-10)):
            def chk(ranks, r, niter=niter, tol=tol):
                s, u = r[:8], r[8:8 + 150 * 8].reshape(150, 8)
                rel = np.max(np.abs(s - S[:8]) / S[:8])
                check(rel < tol, f"randomized np{ranks} K{niter}: top-8 values differ by {rel:.3g} (tol {tol})")
                au = angles(u, U[:, :8])
                check(au < np.sqrt(tol) * 10, f"randomized np{ranks} K{niter}: subspace angle {au:.3g}")
            bt.add(["svd", inp, 8, niter, 4, 1234, 8], chk)
        got = {}
        bt.add(["svd", inp, 8, 1, 0, 99, 8], lambda ranks, r: got.__setitem__(ranks, r[:8]))
        bt.run()
        vals = list(got.values())
        check(len(vals) == 3 and max(np.max(np.abs(x - vals[0])) for x in vals) < 1e-12 * vals[0][0],
              f"randomized K1: values differ across rank counts: {got}")
        print("ok: randomized subspace iteration", flush=True)

        # PiSSA: exact, and randomized on a decaying spectrum
        for (m, n) in [(64, 48), (40, 72)]:
            w = (spectrum(rng, m, n, np.exp(-0.3 * np.arange(min(m, n)))) * 0.05).astype(np.float32)
            wd = w.astype(np.float64)
            inp = bt.matrix(wd)
            U, S, Vt = np.linalg.svd(wd, full_matrices=False)
            r, scale = 6, 16 / 6
            for niter in (-1, 4):
                def chk(ranks, x, m=m, n=n, niter=niter, wd=wd, U=U, S=S, Vt=Vt):
                    s = x[:r]
                    A = x[r:r + r * n].reshape(r, n)
                    B = x[r + r * n:r + r * n + m * r].reshape(m, r)
                    res_ = x[r + r * n + m * r:].reshape(m, n)
                    tag = f"pissa {m}x{n} np{ranks} K{niter}"
                    tol = 1e-10 if niter < 0 else 1e-6
                    check(np.max(np.abs(s - S[:r]) / S[:r]) < tol, f"{tag}: singular values {s} vs {S[:r]}")
                    # A = sqrt(S_r/s) V_r^T, B = U_r sqrt(S_r/s), signs as ours
                    sg = np.sign(np.sum(B * U[:, :r], axis=0))
                    Aref = (np.sqrt(S[:r] / scale) * sg)[:, None] * Vt[:r]
                    Bref = U[:, :r] * (np.sqrt(S[:r] / scale) * sg)
                    ea = np.max(np.abs(A - Aref)) / np.max(np.abs(Aref))
                    eb = np.max(np.abs(B - Bref)) / np.max(np.abs(Bref))
                    tolf = 1e-6 if niter < 0 else 1e-4
                    check(ea < tolf and eb < tolf, f"{tag}: A, B differ from numpy's PiSSA by {ea:.3g}, {eb:.3g}")
                    # the identity PEFT relies on: s*B*A + W_res == W (fp32)
                    rec = scale * (B @ A) + res_
                    err = np.max(np.abs(rec - wd))
                    check(err <= 2 * np.finfo(np.float32).eps * np.max(np.abs(wd)),
                          f"{tag}: |s*B*A + W_res - W| = {err:.3g}")
                bt.add(["pissa", inp, r, scale, niter, 8, 5, 4], chk)
        bt.run()
        print("ok: pissa", flush=True)
        inp = bt.matrix(np.ones((40, 72)))
        p = subprocess.run(["mpirun", "--oversubscribe", "--bind-to", "none", "-np", "2", TOOL, "--tool", "pissa", inp,
                            os.path.join(tmp, "x.bin"), "41", "1.0", "-1", "0", "0", "4"],
                           env=ENV, capture_output=True, text=True, timeout=300)
        check(p.returncode != 0 and "min(out, in) = 40" in p.stderr, f"pissa r too large: {p.returncode} {p.stderr}")

        # LoRA truncation (the third shape has r > min(in, out): Delta W is formed)
        for (r, inn, outn) in [(8, 50, 70), (6, 90, 30), (12, 10, 14)]:
            A = rng.standard_normal((r, inn)).astype(np.float32)
            B = rng.standard_normal((outn, r)).astype(np.float32)
            inp = bt.matrix(np.concatenate([A.ravel(), B.ravel()]).astype(np.float64)[:, None])
            scale = 2.0
            dw = scale * (B.astype(np.float64) @ A.astype(np.float64))
            U, S, Vt = np.linalg.svd(dw, full_matrices=False)
            kk = min(r, inn, outn)
            for R, s2 in ((3, 1.5), (kk, scale), (min(inn, outn), 1.0)):
                def chk(ranks, x, r=r, inn=inn, outn=outn, R=R, s2=s2, kk=kk, dw=dw, U=U, S=S, Vt=Vt):
                    tag = f"lora r{r} {outn}x{inn} np{ranks} R{R}"
                    energy, sv = x[0], x[1:1 + kk]
                    A2 = x[1 + kk:1 + kk + R * inn].reshape(R, inn)
                    B2 = x[1 + kk + R * inn:].reshape(outn, R)
                    keep = min(R, kk)
                    ref = (U[:, :keep] * S[:keep]) @ Vt[:keep]
                    e = np.max(np.abs(s2 * B2 @ A2 - ref)) / np.max(np.abs(ref))
                    check(e < 1e-6, f"{tag}: product differs from numpy's rank-{R} truncation by {e:.3g}")
                    check(np.max(np.abs(sv - S[:kk])) < 1e-10 * S[0], f"{tag}: singular values {sv} vs {S[:kk]}")
                    eref = np.sum(S[:keep] ** 2) / np.sum(S ** 2)
                    check(abs(energy - eref) < 1e-12, f"{tag}: energy {energy} vs numpy {eref}")
                    if R >= kk:
                        e = np.max(np.abs(s2 * B2 @ A2 - dw)) / np.max(np.abs(dw))
                        check(e < 1e-6, f"{tag}: full rank does not reproduce s*B*A ({e:.3g})")
                bt.add(["lora", inp, r, inn, outn, scale, R, s2, 4], chk)
        bt.run()
        print("ok: lora truncation", flush=True)
    print("test_linalg:", "FAILED" if fails else "all passed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
