"""SLURM integration: a real single-host SLURM (tools/slurm-local: munged,
slurmctld, slurmd) runs jobs/train.sbatch.

- job A: a tiny 2-rank training run; once metrics show a few steps it gets the
  warning signal (scancel --batch --signal=USR1, what --signal=B:USR1@secs
  delivers before the time limit). It must checkpoint, exit 3, requeue itself
  (restart count 1 in scontrol, the job completion log, metrics.jsonl and
  trainer_state.json), resume from that checkpoint and finish COMPLETED.
- job B: the same config and ranks, never interrupted (the reference): the
  final adapter and every loss of A must be byte-identical to B's.
- job C: a config error (exit 2): FAILED, never requeued.
- job D: the signal arrives while its ranks are still starting (no handler
  yet): the batch shell holds it until they can take it; then as for A.
- jobs/train-multinode.sbatch (srun --mpi=pmix) on the one node: finishes with
  the same adapter as B.

Skipped (exit 77, visible in ctest) only when the SLURM binaries are not
installed (tools/install-deps installs slurm-wlm and munge)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_util as tu  # noqa: E402

SRC = os.environ.get("TPTT_SOURCE_DIR", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLURM_LOCAL = os.path.join(SRC, "tools", "slurm-local")
SBATCH_1 = os.path.join(SRC, "jobs", "train.sbatch")
SBATCH_N = os.path.join(SRC, "jobs", "train-multinode.sbatch")
STEPS = 300         # long enough to be interrupted after a few steps, even on a fast machine
SIGNAL_AFTER = 5    # metrics records seen before the warning signal
DEADLINE = 600      # seconds for all jobs together

passed = failed = 0


def check(cond, what):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print("FAIL:", what, flush=True)
    return cond


def have_slurm():
    sbin = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/sbin"
    need = ["sbatch", "scontrol", "squeue", "scancel", "slurmctld", "slurmd", "munged"]
    return [n for n in need if shutil.which(n, path=sbin) is None]


class Slurm:
    """The local cluster: client commands with SLURM_CONF and a clean environment."""

    def __init__(self, d):
        self.dir = d
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SACCT_"))}
        env.update(tu.MPI_ENV)
        env["SLURM_CONF"] = os.path.join(d, "etc", "slurm.conf")
        env["TPTT"] = os.path.abspath(shutil.which(tu.TPTT) or tu.TPTT)
        self.env = env
        self.reaper = None

    def run(self, *cmd, check=False, timeout=60):
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=timeout,
                              check=check)

    def start(self):
        # a reaper that stops the cluster and removes the temporary directory
        # when this process ends in any way (its stdin is our pipe; EOF = we
        # are gone, even after SIGKILL), so no daemon outlives the test
        self.reaper = subprocess.Popen(["sh", "-c", 'read x; "$0" stop "$1" >/dev/null 2>&1; rm -rf "$2"',
                                        SLURM_LOCAL, self.dir, os.path.dirname(self.dir)],
                                       stdin=subprocess.PIPE, start_new_session=True, env=self.env)
        p = self.run(SLURM_LOCAL, "start", self.dir, timeout=120)
        print(p.stderr.strip(), flush=True)
        return p.returncode == 0

    def stop(self):
        p = self.run(SLURM_LOCAL, "stop", self.dir, timeout=120)
        if p.returncode:
            print("slurm-local stop:", p.stderr.strip(), flush=True)
        if self.reaper:
            try:
                self.reaper.stdin.close()
                self.reaper.wait(timeout=120)
            except Exception:
                pass

    def sbatch(self, *args, env=None):
        e = dict(self.env, **(env or {}))
        p = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=e, timeout=60)
        if p.returncode:
            print("sbatch failed:", p.stderr, flush=True)
            return None
        return p.stdout.strip().split(";")[0]

    def job(self, jid):
        """scontrol show job as a dict (empty once the job is gone)."""
        p = self.run("scontrol", "-o", "show", "job", jid)
        out = {}
        for m in re.finditer(r"(\w[\w/:]*)=(\S*)", p.stdout):
            out.setdefault(m.group(1), m.group(2))
        return out

    def jobcomp(self, jid):
        """Records of the job completion log (one per run of the job, requeues too)."""
        path = os.path.join(self.dir, "jobcomp.txt")
        recs = []
        if os.path.exists(path):
            for line in open(path):
                r = dict(re.findall(r"(\w+)=(\S*)", line))
                if r.get("JobId") == jid:
                    recs.append(r)
        return recs


FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def wait_final(s, jid, deadline):
    st = {}
    while time.time() < deadline:
        st = s.job(jid)
        if st.get("JobState") in FINAL:
            return st
        time.sleep(0.5)
    return st


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def records(run_dir):
    out = []
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        for line in open(path):
            try:
                out.append(json.loads(line))
            except ValueError:  # a line being written
                pass
    return out


def losses(run_dir):
    try:
        return tu.losses(run_dir)
    except (OSError, ValueError):
        return None


def on_term(*_):
    raise KeyboardInterrupt()


def main():
    missing = have_slurm()
    if missing:
        print(f"SKIP: SLURM is not installed (missing: {' '.join(missing)}; tools/install-deps installs "
              "slurm-wlm and munge)")
        print("test_slurm: 0 passed, 0 failed (skipped)")
        return 77
    tmp = tempfile.mkdtemp(prefix="tptt-slurm-")
    os.chmod(tmp, 0o755)
    s = Slurm(os.path.join(tmp, "slurm"))
    prev_term = signal.signal(signal.SIGTERM, on_term)
    keep = False
    try:
        t0 = time.time()
        model, data = os.path.join(tmp, "model"), os.path.join(tmp, "data.tok")
        tu.make_model(model)
        tu.make_data(data)
        over = dict(schedule__total_steps=STEPS, schedule__warmup_steps=5, checkpoint__every=10,
                    checkpoint__keep=1000, logging__every=1)
        cfg = os.path.join(tmp, "run.yaml")
        tu.write_config(cfg, model, data, os.path.join(tmp, "unused"), **over)
        bad = os.path.join(tmp, "bad.yaml")
        tu.write_config(bad, model, data, os.path.join(tmp, "bad"), **over)
        with open(bad, "a") as f:
            f.write("lerning_rate: 0.1\n")  # unknown key: tptt train exits 2
        if not check(s.start(), "tools/slurm-local start"):
            keep = True
            return 1
        print(f"cluster up in {time.time() - t0:.1f} s (incl. model/data)", flush=True)
        log = lambda n: os.path.join(tmp, f"{n}-%j.out")  # noqa: E731
        # --time above the scripts' --signal=B:USR1@600, or the warning comes at once
        common = ["--ntasks=2", "--time=30", "--chdir=" + tmp]
        run_a, run_b, run_m, run_d = (os.path.join(tmp, n) for n in ("run-a", "run-b", "run-m", "run-d"))
        jc = s.sbatch(*common, "--job-name=bad", "--output=" + log("bad"), SBATCH_1, bad)
        ja = s.sbatch(*common, "--job-name=interrupted", "--output=" + log("a"), SBATCH_1, cfg, run_a)
        jb = s.sbatch(*common, "--job-name=reference", "--output=" + log("b"), SBATCH_1, cfg, run_b)
        if not check(ja and jb and jc, "sbatch accepted the jobs"):
            keep = True
            return 1
        deadline = time.time() + DEADLINE
        la, lc = os.path.join(tmp, f"a-{ja}.out"), os.path.join(tmp, f"bad-{jc}.out")

        # --- the warning signal, once job A has made a few steps
        signalled_at = None
        while time.time() < deadline:
            n = len(records(run_a))
            st = s.job(ja).get("JobState")
            if n >= SIGNAL_AFTER and st == "RUNNING":
                p = s.run("scancel", "--batch", "--signal=USR1", ja)
                check(p.returncode == 0, f"scancel --batch --signal=USR1: {p.stderr}")
                signalled_at = n
                break
            if st in FINAL:
                break
            time.sleep(0.1)
        if not check(signalled_at is not None, f"job A was running with >= {SIGNAL_AFTER} steps to signal "
                                               f"(state {s.job(ja).get('JobState')})"):
            keep = True
            return 1
        print(f"job {ja}: SIGUSR1 after {signalled_at} metrics records ({time.time() - t0:.1f} s)", flush=True)

        # the broken job, meanwhile: FAILED, exit 2, no requeue
        stc = wait_final(s, jc, deadline)
        check(stc.get("JobState") == "FAILED", f"job C (config error) ends FAILED, got {stc.get('JobState')}")
        check(stc.get("ExitCode") == "2:0", f"job C exit code 2:0, got {stc.get('ExitCode')}")

        sta = wait_final(s, ja, deadline)
        stb = wait_final(s, jb, deadline)
        print(f"jobs done at {time.time() - t0:.1f} s", flush=True)
        out_a = read(la)
        # --- A: checkpointed on the signal, requeued once, resumed, finished
        m = re.search(r"checkpointed at step (\d+), exiting with code 3", out_a)
        check(m is not None, "job A's log shows the checkpoint on the signal and exit 3")
        stop = int(m.group(1)) if m else -1
        check(0 < stop < STEPS, f"job A stopped mid-run (step {stop} of {STEPS})")
        check(f"requeueing job {ja}" in out_a, "job A's batch script requeued the job")
        check(re.search(rf"resuming from \S*/checkpoints/step-{stop:08d} \(step {stop}\)", out_a) is not None,
              f"the requeued run resumed from step-{stop:08d}")
        check("slurm: job %s, restart 1" % ja in out_a, "the requeued run sees SLURM_RESTART_COUNT=1")
        check("training finished (exit 0)" in out_a, "job A's log ends with training finished")
        check(sta.get("JobState") == "COMPLETED", f"job A COMPLETED, got {sta.get('JobState')}")
        check(sta.get("Restarts") == "1", f"job A: Restarts=1 in scontrol, got {sta.get('Restarts')}")
        check(sta.get("ExitCode") == "0:0", f"job A exit code 0:0, got {sta.get('ExitCode')}")
        recs = s.jobcomp(ja)
        states = [r.get("JobState") for r in recs]
        check(len(recs) == 2 and states[-1] == "COMPLETED" and states[0] != "COMPLETED",
              f"job completion log of A: one requeued run, then COMPLETED; got {states}")
        # metrics and checkpoints carry the SLURM job id and restart count
        ra = records(run_a)
        steps = [r["step"] for r in ra]
        check(steps == list(range(1, STEPS + 1)), "job A's metrics.jsonl has every step once")
        check(all(r.get("slurm_job_id") == ja for r in ra), "metrics: slurm_job_id on every record")
        check(all(r.get("slurm_restart_count") == ("0" if r["step"] <= stop else "1") for r in ra),
              "metrics: slurm_restart_count 0 up to the signal, 1 after")
        check(all(r.get("slurm_nodelist") for r in ra), "metrics: slurm_nodelist on every record")

        def slurm_of(run, step):
            p = os.path.join(run, "checkpoints", f"step-{step:08d}", "trainer_state.json")
            try:
                return json.load(open(p)).get("slurm", {})
            except (OSError, ValueError):
                return {}
        check(slurm_of(run_a, stop) == {**slurm_of(run_a, stop), "job_id": ja, "restart_count": "0"},
              f"trainer_state.json of step-{stop:08d}: job {ja}, restart 0; got {slurm_of(run_a, stop)}")
        check(slurm_of(run_a, STEPS) == {**slurm_of(run_a, STEPS), "job_id": ja, "restart_count": "1"},
              f"final trainer_state.json: job {ja}, restart 1; got {slurm_of(run_a, STEPS)}")
        # --- B, the uninterrupted reference: same adapter and losses, byte for byte
        check(stb.get("JobState") == "COMPLETED" and stb.get("Restarts") == "0",
              f"job B (reference) COMPLETED without restarts, got {stb.get('JobState')} / {stb.get('Restarts')}")
        try:
            same = tu.adapter_bytes(run_a) == tu.adapter_bytes(run_b)
        except OSError as e:
            same = False
            print("adapter:", e)
        check(same, "final adapter of the interrupted job is byte-identical to the uninterrupted one's")
        check(losses(run_a) is not None and losses(run_a) == losses(run_b),
              "losses of the interrupted job equal the reference's")

        # --- C again, after A's requeue delay has long passed: still not requeued
        stc = s.job(jc)
        out_c = read(lc)
        check(stc.get("JobState") == "FAILED" and stc.get("Restarts") == "0",
              f"job C stays FAILED with Restarts=0, got {stc.get('JobState')} / {stc.get('Restarts')}")
        check("unknown key 'lerning_rate'" in out_c and "not requeueing" in out_c,
              "job C's log names the config error and says it is not requeued")
        check([r.get("JobState") for r in s.jobcomp(jc)] == ["FAILED"], "job completion log of C: one FAILED run")

        # --- the multi-node script with srun --mpi=pmix, on the one node; and,
        # meanwhile, job D: the warning signal while its ranks are still
        # starting (a wrapper sleeps 4 s before exec'ing tptt): the batch shell
        # must hold it until the ranks catch SIGUSR1, then requeue as for A
        jm = s.sbatch(*common, "--nodes=1", "--job-name=multinode", "--output=" + log("m"), SBATCH_N, cfg, run_m)
        slow = os.path.join(tmp, "slow-tptt")
        with open(slow, "w") as f:
            f.write(f'#!/bin/sh\nsleep 4\nexec "{s.env["TPTT"]}" "$@"\n')
        os.chmod(slow, 0o755)
        jd = s.sbatch(*common, "--job-name=early", "--output=" + log("d"), SBATCH_1, cfg, run_d, env={"TPTT": slow})
        held = False
        while jd and time.time() < deadline:
            # the batch shell logs the mpirun line once its traps are set and mpirun starts
            if re.search(r"\] mpirun -np", read(os.path.join(tmp, f"d-{jd}.out"))):
                held = s.run("scancel", "--batch", "--signal=USR1", jd).returncode == 0
                break
            if s.job(jd).get("JobState") in FINAL:
                break
            time.sleep(0.05)
        check(held, "job D signalled while starting")
        std = wait_final(s, jd, deadline) if jd else {}
        out_d = read(os.path.join(tmp, f"d-{jd}.out"))
        check("holding the signal" in out_d, "job D: the batch shell held the signal while the ranks started")
        check(std.get("JobState") == "COMPLETED" and std.get("Restarts") == "1" and
              re.search(r"checkpointed at step \d+, exiting with code 3", out_d) is not None,
              f"job D checkpointed, requeued once and COMPLETED, got {std.get('JobState')} / {std.get('Restarts')}")
        try:
            same = tu.adapter_bytes(run_d) == tu.adapter_bytes(run_b)
        except OSError:
            same = False
        check(same, "job D's final adapter equals the uninterrupted one's")
        stm = wait_final(s, jm, deadline) if jm else {}
        out_m = read(os.path.join(tmp, f"m-{jm}.out"))
        check(stm.get("JobState") == "COMPLETED" and "srun --mpi=pmix" in out_m and
              "training finished" in out_m,
              f"train-multinode.sbatch (srun --mpi=pmix) COMPLETED, got {stm.get('JobState')}")
        try:
            same = tu.adapter_bytes(run_m) == tu.adapter_bytes(run_b)
        except OSError:
            same = False
        check(same, "srun-launched ranks give the same final adapter as mpirun-launched ones")

        # excerpts for the record
        sacct = s.run("sacct", "-c", "-j", f"{ja},{jb},{jc}",
                      "--format=JobID,JobName%12,State,ExitCode,Start,End,NodeList")
        print("--- sacct -c (job completion log):\n" + (sacct.stdout or sacct.stderr).rstrip())
        print(f"--- job {ja} log (batch script and tptt lines):")
        for line in out_a.splitlines():
            if not line.startswith(("step ", "checkpoint:", "platform:")) and line.strip():
                print("   ", line)
        print(f"--- job {jd} (signalled while starting), batch script lines:")
        for line in out_d.splitlines():
            if line.startswith("[tptt-job") or "signal received" in line:
                print("   ", line)
        print(f"--- total {time.time() - t0:.1f} s", flush=True)
        if failed:
            keep = True
    except KeyboardInterrupt:
        check(False, "interrupted")
    finally:
        signal.signal(signal.SIGTERM, prev_term)
        if failed or keep:
            for n in sorted(os.listdir(tmp)):
                if n.endswith(".out"):
                    print(f"--- {n}:\n" + read(os.path.join(tmp, n))[-3000:])
            for n in ("slurmctld.log", "slurmd.log"):
                print(f"--- {n} (tail):\n" + read(os.path.join(s.dir, "log", n))[-3000:])
        s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"test_slurm: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
