"""tptt train under a real mpirun: data-parallel equivalence (2 ranks x b vs
1 rank x 2b; 1, 2, 3 ranks on one global batch), bit-identical resume on the
same world size, resume on another world size, refusal of resume-breaking
config changes, SIGUSR1 -> checkpoint + exit 3, NaN/Inf skipping and abort,
a killed rank ending the job (no hang), config errors, metrics and plot."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
import testkit  # noqa: E402
import train_util as tu  # noqa: E402

kit = testkit.Checker("test_train_mpi")
check = kit.check


def ok(p, what, code=0):
    check(p.returncode == code, f"{what}: exit {p.returncode}, want {code}\nstdout: {p.stdout[-1500:]}\nstderr: {p.stderr[-2500:]}")
    return p.returncode == code


def rel_diff(a, b):
    """RMS-relative difference over all adapter tensors, ||a-b|| / ||a||.
    (AdamW normalises each element's update, so fp32 summation-order noise in
    a near-zero gradient can move single elements by ~lr: the per-element max
    is reported, but the whole-adapter RMS is what the tolerance applies to.)"""
    x = np.concatenate([a[k].astype(np.float64).ravel() for k in sorted(a)])
    y = np.concatenate([b[k].astype(np.float64).ravel() for k in sorted(a)])
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30))


def main():
    tmp = tempfile.mkdtemp(prefix="tptt-train-")
    try:
        model, data = os.path.join(tmp, "model"), os.path.join(tmp, "data.tok")
        tu.make_model(model)
        tu.make_data(data)

        def cfg(name, **over):
            path = os.path.join(tmp, name + ".yaml")
            tu.write_config(path, model, data, os.path.join(tmp, name), **over)
            return path, os.path.join(tmp, name)

        # --- data parallel equivalence: 2 ranks x micro 2 == 1 rank x micro 4 (global 4)
        c1, r1 = cfg("one", batch__global=4, batch__micro=4)
        c2, r2 = cfg("two", batch__global=4, batch__micro=2)
        ok(tu.train(c1, ranks=1), "1 rank x 4")
        ok(tu.train(c2, ranks=2), "2 ranks x 2")
        l1, l2 = tu.losses(r1), tu.losses(r2)
        check(sorted(l1) == list(range(1, 9)) and sorted(l2) == sorted(l1), f"steps logged: {sorted(l1)} {sorted(l2)}")
        dl = max(abs(l1[s] - l2[s]) / abs(l1[s]) for s in l1 if s in l2) if l2 else 1
        check(dl < 1e-5, f"losses 1x4 vs 2x2 differ by {dl:.2e} relative")
        da = rel_diff(tu.adapter_tensors(r1), tu.adapter_tensors(r2))
        check(da < 1e-4, f"adapters 1x4 vs 2x2 differ by {da:.2e} (max-abs / max)")
        print(f"1x4 vs 2x2: losses {dl:.2e}, adapters {da:.2e}")
        check(l1[8] < l1[1], f"loss went down: {l1[1]:.4f} -> {l1[8]:.4f}")

        # --- 1, 2, 3 ranks on the same global batch of 6
        runs = {}
        for n in (1, 2, 3):
            c, r = cfg(f"ranks{n}", batch__global=6, batch__micro=6 // n if n > 1 else 2)
            if ok(tu.train(c, ranks=n), f"{n} ranks, global 6"):
                runs[n] = (tu.losses(r), tu.adapter_tensors(r))
        if len(runs) == 3:
            for n in (2, 3):
                dl = max(abs(runs[1][0][s] - runs[n][0][s]) / abs(runs[1][0][s]) for s in runs[1][0])
                da = rel_diff(runs[1][1], runs[n][1])
                print(f"1 vs {n} ranks (global 6): losses {dl:.2e}, adapters {da:.2e}")
                check(dl < 1e-5 and da < 1e-4, f"1 vs {n} ranks: losses {dl:.2e}, adapters {da:.2e}")

        # --- deterministic: the same run twice gives bit-identical losses and adapters
        c3, r3 = cfg("again", batch__global=4, batch__micro=2)
        ok(tu.train(c3, ranks=2), "2 ranks again")
        check(tu.losses(r3) == l2, "same config/seed/world size: bit-identical losses")
        check(tu.adapter_bytes(r3) == tu.adapter_bytes(r2), "same config/seed/world size: identical adapter bytes")

        # --- interrupted at step 3 (signal hook), resumed: bit-identical to uninterrupted
        c4, r4 = cfg("resume", batch__global=4, batch__micro=2)
        p = tu.train(c4, ranks=2, env={"TPTT_TEST_STOP_AT_STEP": "3"})
        ok(p, "stop at step 3", code=3)
        check("exiting with code 3" in p.stderr, f"exit-3 message: {p.stderr[-500:]}")
        check(os.path.basename(tu.latest(r4)) == "step-00000003", f"checkpoint at the stop: {tu.latest(r4)}")
        p = tu.train(c4, ranks=2, extra=["--resume", "auto"])
        ok(p, "resume auto")
        check("resuming from" in p.stderr, "resume message")
        check(tu.losses(r4) == l2, f"resumed losses bit-identical: {tu.losses(r4)} vs {l2}")
        check(tu.adapter_bytes(r4) == tu.adapter_bytes(r2), "resumed adapter bytes identical")

        # --- resumed on another world size (2 -> 1 rank, same global batch): fp32 tolerance
        c5, r5 = cfg("world", batch__global=4, batch__micro=2)
        ok(tu.train(c5, ranks=2, env={"TPTT_TEST_STOP_AT_STEP": "4"}), "stop at 4 (2 ranks)", code=3)
        p = tu.train(c5, ranks=1, extra=["--set", "batch.micro=4"])
        ok(p, "resume on 1 rank")
        check("different world size" in p.stderr, "different world size noted")
        da = rel_diff(tu.adapter_tensors(r2), tu.adapter_tensors(r5))
        print(f"2 -> 1 rank resume vs uninterrupted 2 ranks: adapters {da:.2e}")
        check(da < 1e-4, f"2->1 rank resume adapters differ by {da:.2e}")

        # --- resume refused for meaningful changes, allowed for harmless ones
        c6, r6 = cfg("refuse", batch__global=4, batch__micro=2)
        ok(tu.train(c6, ranks=1, env={"TPTT_TEST_STOP_AT_STEP": "2"}), "stop at 2", code=3)
        p = tu.train(c6, ranks=1, extra=["--set", "lora.r=8"])
        check(p.returncode == 1 and "cannot resume" in p.stderr and "lora" in p.stderr,
              f"lora.r change refused: {p.returncode} {p.stderr[-400:]}")
        p = tu.train(c6, ranks=1, extra=["--set", "liza.preset=delta_rule"])
        check(p.returncode == 1 and "cannot resume" in p.stderr, f"LiZA variant change refused: {p.stderr[-300:]}")
        p = tu.train(c6, ranks=1, extra=["--set", "logging.every=3", "--set", "checkpoint.every=4"])
        ok(p, "harmless change (logging/checkpoint frequency) allowed")

        # --- a real SIGUSR1 to mpirun: checkpoint and exit 3, then finish
        c7, r7 = cfg("signal", batch__global=4, batch__micro=2, schedule__total_steps=400, checkpoint__every=0,
                     logging__every=1)
        e = dict(os.environ)
        e.update(tu.MPI_ENV)
        proc = subprocess.Popen(["mpirun", "--oversubscribe", "--bind-to", "none", "-np", "2", tu.TPTT, "train", c7],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
        t0 = time.time()
        while time.time() - t0 < 120:
            mp = os.path.join(r7, "metrics.jsonl")
            if os.path.exists(mp) and sum(1 for _ in open(mp)) >= 3:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=120)
        check(proc.returncode == 3, f"SIGUSR1: exit {proc.returncode}, stderr {err[-600:]}")
        steps = sorted(tu.losses(r7))
        check(steps and os.path.basename(tu.latest(r7)) == f"step-{steps[-1]:08d}",
              f"SIGUSR1 checkpoint matches the last step: {steps[-1:]} {os.listdir(os.path.join(r7, 'checkpoints'))}")

        # --- NaN/Inf: an absurd learning rate blows the weights up; steps are
        # skipped and counted, then the run aborts with a clear message
        c8, r8 = cfg("nan", optimizer__lr=1e30, optimizer__max_grad_norm=0, faults__max_bad_steps=2,
                     schedule__warmup_steps=0)
        p = tu.train(c8, ranks=2)
        check(p.returncode == 1 and "non-finite" in p.stderr and "faults.max_bad_steps" in p.stderr,
              f"NaN abort: {p.returncode} {p.stderr[-500:]}")
        recs = [json.loads(x) for x in open(os.path.join(r8, "metrics.jsonl"))]
        check(sum(r["skipped"] for r in recs) >= 2, f"skipped steps recorded: {recs}")

        # --- a rank that dies: the job ends non-zero, no hang
        c9, r9 = cfg("kill", batch__global=4, batch__micro=2, schedule__total_steps=400, checkpoint__every=0)
        proc = subprocess.Popen(["mpirun", "--oversubscribe", "--bind-to", "none", "-np", "2", tu.TPTT, "train", c9],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
        t0 = time.time()
        while time.time() - t0 < 120:
            mp = os.path.join(r9, "metrics.jsonl")
            if os.path.exists(mp) and sum(1 for _ in open(mp)) >= 2:
                break
            time.sleep(0.2)
        kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        ranks = [k for k in kids if "train" in open(f"/proc/{k}/cmdline").read()] if kids else []
        check(len(ranks) == 2, f"found the 2 rank processes under mpirun: {kids}")
        if ranks:
            os.kill(int(ranks[-1]), signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=60)
            check(proc.returncode != 0, f"killed rank: mpirun exit {proc.returncode}")
        except subprocess.TimeoutExpired:
            proc.kill()
            check(False, "killed rank: the job hung")

        # --- configuration errors are caught before training, naming the key
        c10, _ = cfg("badbatch", batch__global=5, batch__micro=1)
        p = tu.train(c10, ranks=2)
        check(p.returncode == 2 and "batch.global" in p.stderr, f"indivisible global batch: {p.returncode} {p.stderr[-300:]}")
        p = tu.train(os.path.join(tmp, "missing.yaml"), ranks=1)
        check(p.returncode == 2 and "missing.yaml" in p.stderr, f"missing config: {p.stderr[-200:]}")

        # --- metrics and plot
        recs = [json.loads(x) for x in open(os.path.join(r1, "metrics.jsonl"))]
        need = {"step", "loss", "lr", "mu", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "world_size"}
        check(len(recs) == 8 and all(need <= set(r) for r in recs), f"metrics records: {recs[:1]}")
        png = os.path.join(tmp, "loss.png")
        p = subprocess.run([tu.TPTT, "plot", os.path.join(r1, "metrics.jsonl"), "-o", png], capture_output=True, text=True)
        check(p.returncode == 0 and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n", f"plot: {p.stderr}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
