"""Crash safety: kill a training run with SIGKILL at random moments (steps,
checkpoint writes, start-up), resume with --resume auto until it finishes,
and require every time that a valid checkpoint is found and that the final
adapter equals an uninterrupted run's byte for byte. >= 20 trials.
Then, deterministically, the run lock: strace kills the run at the first
openat/write/fsync/link/unlink that touches run.dir/LOCK (the random trials
found a kill between creating LOCK and writing it, which left an empty lock
that refused every resume), and a file system without hard links (link()
failing with EPERM)."""
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
import testkit  # noqa: E402
import train_util as tu  # noqa: E402

TRIALS = int(os.environ.get("TPTT_CRASH_TRIALS", "20"))


def main():
    kit = testkit.Checker("test_crash_resume")
    tmp = tempfile.mkdtemp(prefix="tptt-crash-")
    rnd = random.Random(1234)
    try:
        model, data = os.path.join(tmp, "model"), os.path.join(tmp, "data.tok")
        tu.make_model(model)
        tu.make_data(data)
        over = dict(batch__global=4, batch__micro=2, schedule__total_steps=12, checkpoint__every=1,
                    checkpoint__keep=2)
        ref_cfg = os.path.join(tmp, "ref.yaml")
        tu.write_config(ref_cfg, model, data, os.path.join(tmp, "ref"), **over)
        t0 = time.time()
        p = tu.train(ref_cfg, ranks=0)  # plain process: easy to SIGKILL at any point
        dur = time.time() - t0
        if p.returncode != 0:
            return kit.abort("reference run failed: " + p.stderr[-2000:])
        ref = tu.adapter_bytes(os.path.join(tmp, "ref"))
        kills = resumes = 0
        for trial in range(TRIALS):
            run = os.path.join(tmp, f"t{trial}")
            cfg = os.path.join(tmp, f"t{trial}.yaml")
            tu.write_config(cfg, model, data, run, **over)
            ok = True
            for attempt in range(40):
                e = dict(os.environ)
                e.update(tu.MPI_ENV)
                proc = subprocess.Popen([tu.TPTT, "train", cfg, "--resume", "auto"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, env=e)
                # kill somewhere in the run (the first attempts), then let it finish
                if attempt < 3:
                    time.sleep(rnd.uniform(0.0, dur * 1.1))
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)
                        kills += 1
                _, err = proc.communicate(timeout=300)
                if proc.returncode == 0:
                    break
                if proc.returncode not in (-9, 137):
                    print(f"trial {trial}: unexpected exit {proc.returncode}: {err[-800:]}")
                    ok = False
                    break
                resumes += 1
                # whatever was killed, what --resume auto would load must verify
                ck = os.path.join(run, "checkpoints")
                if os.path.exists(ck):
                    names = [n for n in os.listdir(ck) if n.startswith("step-")]
                    for n in names:
                        if not os.path.exists(os.path.join(ck, n, "MANIFEST")):
                            print(f"trial {trial}: a step- directory without MANIFEST is visible: {n}")
                            ok = False
            else:
                ok = False
                print(f"trial {trial}: did not finish")
            kit.check(ok and tu.adapter_bytes(run) == ref and tu.losses(run) == tu.losses(os.path.join(tmp, "ref")),
                      f"trial {trial}: final adapter or losses differ from the uninterrupted run")
            shutil.rmtree(run, ignore_errors=True)
        print(f"{TRIALS} trials, {kills} SIGKILLs, {resumes} resumes; reference run {dur:.2f} s")
        lock_kill_windows(kit, tmp, model, data, over, ref)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kit.report()


def lock_kill_windows(kit, tmp, model, data, over, ref):
    strace = shutil.which("strace")
    if not strace:
        print("SKIP: lock kill windows: strace is not installed (tools/install-deps installs it)")
        return
    for sc in ("openat", "write", "fsync", "link", "unlink"):
        run = os.path.join(tmp, "lock-" + sc)
        cfg = run + ".yaml"
        tu.write_config(cfg, model, data, run, **over)
        os.makedirs(run)
        e = dict(os.environ)
        e.update(tu.MPI_ENV)
        # LeakSanitizer cannot ptrace a process strace already traces
        e["ASAN_OPTIONS"] = e.get("ASAN_OPTIONS", "") + ":detect_leaks=0"
        lock = os.path.join(run, "LOCK")
        p = subprocess.run([strace, "-f", "-qq", "-o", os.devnull, "-P", lock, "-e", "trace=" + sc, "-e",
                            "inject=%s:signal=SIGKILL:when=1" % sc, tu.TPTT, "train", cfg, "--resume", "auto"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=e, timeout=300)
        killed = p.returncode in (-9, 137)
        q = tu.train(cfg, ranks=0, extra=["--resume", "auto"])
        left = [n for n in os.listdir(run) if "LOCK" in n]
        kit.check(q.returncode == 0 and tu.adapter_bytes(run) == ref and not left,
                  "killed at the first %s on run.dir/LOCK (%s): the next run finishes with the reference adapter "
                  "and leaves no lock file" % (sc, "killed" if killed else "exit %d" % p.returncode),
                  "exit %d, left %s: %s" % (q.returncode, left, q.stderr[-800:]))
    # a file system without hard links (link() fails with EPERM): the exclusive-create fallback
    run = os.path.join(tmp, "lock-nolink")
    cfg = run + ".yaml"
    tu.write_config(cfg, model, data, run, **over)
    e = dict(os.environ)
    e.update(tu.MPI_ENV)
    e["ASAN_OPTIONS"] = e.get("ASAN_OPTIONS", "") + ":detect_leaks=0"
    p = subprocess.run([strace, "-f", "-qq", "-o", os.devnull, "-e", "trace=link", "-e", "inject=link:error=EPERM",
                        tu.TPTT, "train", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=e,
                       timeout=300)
    left = [n for n in os.listdir(run) if "LOCK" in n] if os.path.isdir(run) else ["no run.dir"]
    kit.check(p.returncode == 0 and tu.adapter_bytes(run) == ref and not left,
              "link() refused (EPERM): the run takes LOCK by exclusive create and finishes with the reference adapter",
              "exit %d, left %s: %s" % (p.returncode, left, p.stderr[-800:]))


if __name__ == "__main__":
    sys.exit(main())
