"""test_hardening - bad inputs and faults of a run (issue 14), one section per
class:

1. plot: file names that would be gnuplot code are data, never code.
2. divergence: non-finite parameters are never committed or checkpointed; the
   loader refuses NaN/Inf weights and negative second moments; steps with no
   labelled tokens are counted apart from non-finite ones.
3. checkpoints: every checkpoint corrupt -> refuse (naming each) unless
   --resume none, which then deletes nothing it did not write; run.dir lock.
4. trainer_state.json: every field validated (type, range, directory name,
   run config, data set).
5. FIFOs where files are expected; sizes/ids from files bound allocations.
6. metrics.jsonl: failed writes reported; plot skips a truncated last line.
7. an unwritable run.dir is found before the first step.

Each bad input must end with exit status 1 (or the documented one), no crash,
and a last stderr line that names the file and the field. Prints the count of
bad inputs tried and handled, then "test_hardening: N passed, N failed".
Environment: TPTT (the binary). Set HARDENING_VERBOSE=1 to print messages.
"""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "py"))
import safetensors_np as stnp  # noqa: E402
import testkit  # noqa: E402
import train_util as tu  # noqa: E402
from test_peft_files import xxh64  # noqa: E402

NAME = "test_hardening"
TPTT = os.environ.get("TPTT", "tptt")
VERBOSE = bool(os.environ.get("HARDENING_VERBOSE"))
kit = testkit.Checker(NAME)
check = kit.check
counts = {"tried": 0, "handled": 0}


def err_text(p):
    return testkit.stderr_text(p)


def last_line(p):
    lines = [ln for ln in err_text(p).split("\n") if ln.strip()]
    return lines[-1] if lines else ""


def bad_input(p, what, keywords, code=1):
    """One bad input: exit `code`, no crash, last stderr line has every keyword
    (tuple = alternatives, case-insensitive)."""
    counts["tried"] += 1
    if VERBOSE:
        print("[%s] exit %d: %s" % (what, p.returncode, last_line(p)), flush=True)
    ok = kit.no_crash(p, what)
    ok &= check(p.returncode == code, what + ": exit %d" % code,
                "got %d: %s" % (p.returncode, err_text(p).strip()[-1500:]))
    line = last_line(p).lower()
    for k in keywords:
        alts = k if isinstance(k, tuple) else (k,)
        ok &= check(any(a.lower() in line for a in alts), what + ": message mentions " + " or ".join(map(repr, alts)),
                    repr(last_line(p)))
    if ok:
        counts["handled"] += 1
    return ok


def handled(cond, what, detail=""):
    counts["tried"] += 1
    if check(cond, what, detail):
        counts["handled"] += 1
        return True
    return False


def train(cfg, *extra, env=None, timeout=120):
    e = dict(os.environ)
    e.update(tu.MPI_ENV)
    e.pop("TPTT_TEST_STOP_AT_STEP", None)
    if env:
        e.update(env)
    try:
        return subprocess.run([TPTT, "train", cfg] + list(extra), capture_output=True, text=True, env=e,
                              timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang is a failed case, not the end of the test
        return subprocess.CompletedProcess([TPTT, "train", cfg], -9, "", "tptt train timed out after %d s" % timeout)


def ckpts(run):
    d = os.path.join(run, "checkpoints")
    return sorted(n for n in os.listdir(d) if n.startswith("step-")) if os.path.isdir(d) else []


def rewrite_manifest(ck):
    lines = []
    for n in sorted(os.listdir(ck)):
        if n == "MANIFEST":
            continue
        b = open(os.path.join(ck, n), "rb").read()
        lines.append("%d %016x %s\n" % (len(b), xxh64(b), n))
    with open(os.path.join(ck, "MANIFEST"), "w") as f:
        f.write("".join(lines))


def tree_bytes(d):
    out = {}
    for root, _, files in os.walk(d):
        for n in files:
            p = os.path.join(root, n)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


# ------------------------------------------------------------------ class 1, 6: plot

def metrics_lines(n=5, skipped=()):
    out = []
    for s in range(1, n + 1):
        sk = s in skipped
        out.append(json.dumps({"step": s, "loss": None if sk else 5.0 - 0.1 * s, "lr": 1e-3, "skipped": sk}) + "\n")
    return out


def test_plot(tmp):
    if not shutil.which("gnuplot"):
        print("gnuplot not installed: plot cases skipped")
        return
    names = ["x';system('touch PWNED1');'", 'q"; system("touch PWNED2"); "', "nl\nsystem('touch PWNED3')\n",
             "$(touch PWNED4)", "`touch PWNED5`", "back\\slash'", "semi;colon'&pipe|"]
    cwd = os.getcwd()
    os.chdir(tmp)  # an injected command would create PWNED* here
    try:
        plot_names(tmp, names)
    finally:
        os.chdir(cwd)
    plot_truncated(tmp)
    plot_several(tmp, names)


def fake_gnuplot(tmp):
    """A `gnuplot` first on PATH that keeps the script it is given and
    writes a PNG signature: what tptt plot sends gnuplot, to check it."""
    d = os.path.join(tmp, "fakebin")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "gnuplot"), "w") as f:
        f.write("#!/bin/sh\ncat > \"$FAKE_GNUPLOT_SCRIPT\"\nprintf '\\211PNG\\r\\n\\032\\n'\n")
    os.chmod(os.path.join(d, "gnuplot"), 0o755)
    script = os.path.join(tmp, "script.gp")
    return dict(os.environ, PATH=d + os.pathsep + os.environ.get("PATH", ""), FAKE_GNUPLOT_SCRIPT=script), script


def plot_several(tmp, names):
    """Several metrics files in one plot: --label and the default labels (the
    run directory's name) are data, never code; one colour and one datablock
    per run; one lr curve when the schedules agree; usage errors."""
    base = os.path.join(tmp, "plot-multi")
    runs = []
    for i, nm in enumerate(["runA", "runB"] + names[:3]):
        d = os.path.join(base, str(i), nm)
        os.makedirs(d)
        with open(os.path.join(d, "metrics.jsonl"), "w") as f:
            f.writelines(metrics_lines(5 + i))
        runs.append(os.path.join(d, "metrics.jsonl"))
    out = os.path.join(base, "multi.png")
    cwd = os.getcwd()
    os.chdir(tmp)  # an injected command would create PWNED* here
    try:
        # real gnuplot: evil labels and evil run directory names
        labels = ["--label", names[3], "--label", names[4]]
        p = kit.run([TPTT, "plot"] + runs + ["-o", out] + labels, timeout=60)
        pwned = [n for n in os.listdir(tmp) if n.startswith("PWNED")]
        handled(p.returncode == 0 and not pwned and open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n",
                "plot: 5 runs with evil labels and directory names drawn, nothing run",
                "exit %d, pwned %s, stderr %s" % (p.returncode, pwned, err_text(p)[-400:]))
        handled(b"(??touch PWNED4?: 5 points; ?touch PWNED5?: 6 points; x??system??touch PWNED1????: 7 points; "
                in p.stdout, "plot: --label names the first runs, the run directory the others", p.stdout.decode()[-400:])
    finally:
        os.chdir(cwd)
    # the script gnuplot receives
    env, script = fake_gnuplot(tmp)
    p = kit.run([TPTT, "plot", runs[0], runs[1], "-o", out, "--label", "PiSSA"], env=env)
    text = open(script).read() if os.path.exists(script) else ""
    plots = [ln for ln in text.splitlines() if ln.startswith("plot ")]
    handled(p.returncode == 0 and "set title 'tptt: PiSSA vs runB'" in text and "$r0 << EOD" in text
            and "$r1 << EOD" in text and len(plots) == 1 and "title 'PiSSA loss'" in plots[0]
            and "title 'runB loss'" in plots[0] and "lc 1" in plots[0] and "lc 2" in plots[0]
            and plots[0].count("using 1:3") == 1 and "title 'lr'" in plots[0],
            "plot: two runs, one schedule: a datablock and a colour each, one lr curve", text[-800:])
    with open(runs[1], "w") as f:  # another schedule: one lr curve per run
        f.writelines(ln.replace('"lr": 0.001', '"lr": 0.002') for ln in metrics_lines(6))
    p = kit.run([TPTT, "plot", runs[0], runs[1], "-o", out], env=env)
    text = open(script).read() if os.path.exists(script) else ""
    handled(p.returncode == 0 and "title 'runA lr'" in text and "title 'runB lr'" in text,
            "plot: two schedules: an lr curve each", text[-600:])
    evil = names[0]
    p = kit.run([TPTT, "plot", runs[0], "-o", out, "--label", evil], env=env)
    text = open(script).read() if os.path.exists(script) else ""
    handled(p.returncode == 0 and evil not in text and "x?;system(?touch PWNED1?);?" not in text
            and all(ln.startswith(("set ", "$r0 << EOD", "EOD", "plot ")) or ln[:1].isdigit() for ln in text.splitlines()),
            "plot: one run: the label is not used as code (one run keeps the file name as title)", text[-600:])
    # usage errors: exit 2, the reason then the usage line
    for args, want in (([runs[0], "-o", out, "--label", "a", "--label", "b"], "tptt: plot: 2 --label for 1 metrics file"),
                       ([runs[0], "-o", out, "--label"], "tptt: plot: --label needs a value"),
                       (runs[:1] * 17 + ["-o", out], "tptt: plot: more than 16 metrics files")):
        p = kit.run([TPTT, "plot"] + args)
        e = err_text(p).splitlines()
        handled(p.returncode == 2 and len(e) == 2 and e[0].startswith(want) and e[1].startswith("usage: tptt plot"),
                "plot: usage error " + want, "exit %d: %s" % (p.returncode, e))
    with open(runs[2], "w") as f:
        f.write("".join(metrics_lines(4)).replace('"loss": 4.7', '"loss": "x"', 1))
    os.unlink(out)
    bad_input(kit.run([TPTT, "plot", runs[0], runs[2], "-o", out], env=env), "plot: a broken second file",
              [runs[2] + ":3"])
    handled(not os.path.exists(out), "plot: a broken second file: no PNG written")


def plot_names(tmp, names):
    for i, nm in enumerate(names):
        d = os.path.join(tmp, "plot%d" % i, nm)
        os.makedirs(d)
        with open(os.path.join(d, "metrics.jsonl"), "w") as f:
            f.writelines(metrics_lines())
        out = os.path.join(d, "lo'ss%d.png" % i)
        p = kit.run([TPTT, "plot", os.path.join(d, "metrics.jsonl"), "-o", out], timeout=60)
        pwned = [n for n in os.listdir(tmp) if n.startswith("PWNED")]
        handled(p.returncode == 0 and not pwned and os.path.getsize(out) > 0 if os.path.exists(out) else False,
                "plot: run dir named %r is data, not gnuplot code" % nm,
                "exit %d, pwned %s, stderr %s" % (p.returncode, pwned, err_text(p)[-400:]))


def plot_truncated(tmp):
    # class 6: truncated last line (disk full while appending) is skipped with a note
    d = os.path.join(tmp, "plot-trunc")
    os.makedirs(d)
    m = os.path.join(d, "metrics.jsonl")
    with open(m, "w") as f:
        f.write("".join(metrics_lines(6))[:-20])
    p = kit.run([TPTT, "plot", m, "-o", os.path.join(d, "a.png")])
    handled(p.returncode == 0 and "truncated" in err_text(p) and b"5 points" in p.stdout,
            "plot: a truncated last line is skipped with a note", err_text(p) + p.stdout.decode())
    # skipped steps (loss null) are not plotted and do not fail the plot
    with open(m, "w") as f:
        f.writelines(metrics_lines(6, skipped=(3,)))
    p = kit.run([TPTT, "plot", m, "-o", os.path.join(d, "b.png")])
    handled(p.returncode == 0 and b"5 points" in p.stdout, "plot: skipped steps (loss null) are left out",
            err_text(p) + p.stdout.decode())
    # a broken line in the middle is an error naming file and line
    lines = metrics_lines(6)
    lines[2] = lines[2][:10] + "\n"
    with open(m, "w") as f:
        f.writelines(lines)
    bad_input(kit.run([TPTT, "plot", m, "-o", os.path.join(d, "c.png")]), "plot: broken middle line",
              ["metrics.jsonl:3"])


# ------------------------------------------------------------------ setup for training cases

class Env:
    pass


def setup(tmp):
    E = Env()
    E.tmp = tmp
    E.model = os.path.join(tmp, "model")
    E.data = os.path.join(tmp, "data.tok")
    tu.make_model(E.model)
    tu.make_data(E.data)
    E.n = 0
    return E


def config(E, **over):
    E.n += 1
    run = os.path.join(E.tmp, "run%d" % E.n)
    cfg = os.path.join(E.tmp, "c%d.yaml" % E.n)
    tu.write_config(cfg, E.model, E.data, run, **over)
    return cfg, run


def all_finite_checkpoints(run):
    import numpy as np
    bad = []
    for c in ckpts(run):
        for f in ("adapter_model.safetensors", "liza_model.safetensors", "optimizer.safetensors"):
            t, _ = stnp.load(os.path.join(run, "checkpoints", c, f))
            for k, v in t.items():
                if not np.all(np.isfinite(v)) or (k.endswith("exp_avg_sq") and np.any(v < 0)):
                    bad.append("%s/%s:%s" % (c, f, k))
    return bad


# ------------------------------------------------------------------ class 2

def edit_tensor(path, name, fn):
    t, meta = stnp.load(path)
    import numpy as np
    out = {}
    for k, v in t.items():
        v = np.array(v, dtype=np.float32)
        if k == name:
            v = fn(v)
        out[k] = ("F32", v)
    stnp.save(path, out, meta)


def test_divergence(E):
    import numpy as np
    cfg, run = config(E, optimizer__lr=1e300, schedule__warmup_steps=0, checkpoint__every=1)
    p = train(cfg)
    bad_input(p, "lr=1e300: run fails", [("non-finite", "nan")])
    handled(not all_finite_checkpoints(run), "lr=1e300: no checkpoint holds non-finite state",
            all_finite_checkpoints(run))
    # loader: NaN weight / Inf moment / negative second moment / NaN MaG logit
    cfg, run = config(E, schedule__total_steps=2, checkpoint__every=2)
    p = train(cfg)
    if not kit.succeeds(p, "control run for loader cases"):
        return
    good = os.path.join(run, "checkpoints", "step-00000002")
    ad, _ = stnp.load(os.path.join(good, "adapter_model.safetensors"))
    lz, _ = stnp.load(os.path.join(good, "liza_model.safetensors"))
    a_name = sorted(ad)[0]
    l_name = sorted(lz)[0] if lz else None
    cases = [("adapter_model.safetensors", a_name, lambda v: np.where(np.arange(v.size).reshape(v.shape) == 1,
                                                                      np.nan, v), "NaN weight"),
             ("adapter_model.safetensors", a_name, lambda v: v * 0 + np.inf, "Inf weight"),
             ("optimizer.safetensors", a_name + ".exp_avg", lambda v: v * 0 - np.inf, "-Inf first moment"),
             ("optimizer.safetensors", a_name + ".exp_avg_sq", lambda v: v * 0 - 1e-3, "negative second moment"),
             ("optimizer.safetensors", a_name + ".exp_avg_sq", lambda v: v * 0 + np.nan, "NaN second moment")]
    if l_name:
        cases.append(("liza_model.safetensors", l_name, lambda v: v * 0 + np.nan, "NaN MaG logit"))
    for i, (f, name, fn, label) in enumerate(cases):
        ck = os.path.join(E.tmp, "nanck%d" % i, "step-00000002")
        shutil.copytree(good, ck)
        edit_tensor(os.path.join(ck, f), name, fn)
        rewrite_manifest(ck)
        cfg2, _ = config(E, schedule__total_steps=4, checkpoint__every=2)
        bad_input(train(cfg2, "--resume", ck), "loader: " + label, [f, name])
    # steps with no labelled tokens: counted apart, never "non-finite"
    jl = os.path.join(E.tmp, "masked.jsonl")
    with open(jl, "w") as f:
        for i in range(40):
            ids = [(3 * i + k) % 64 for k in range(20)]
            f.write(json.dumps({"ids": ids, "mask": [1 if i == 0 else 0] * len(ids)}) + "\n")
    masked = os.path.join(E.tmp, "masked.tok")
    subprocess.run([TPTT, "make-shard", "--jsonl", "-o", masked, jl], check=True, capture_output=True)
    cfg, run = config(E, data__path=masked, data__packing="pad", faults__max_bad_steps=1, schedule__total_steps=6)
    p = train(cfg)
    e = err_text(p)
    handled(p.returncode == 0 and "non-finite" not in e and "no labelled tokens" in e,
            "masked data: steps without labelled tokens do not abort the run and are reported",
            "exit %d: %s" % (p.returncode, e[-800:]))
    recs = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))] if os.path.exists(
        os.path.join(run, "metrics.jsonl")) else []
    handled(any(r.get("skipped") == "no_labels" or r.get("skip_reason") == "no labelled tokens" for r in recs),
            "masked data: metrics.jsonl marks empty steps", recs[:3])


# ------------------------------------------------------------------ class 3

def corrupt(ck):
    p = os.path.join(ck, "adapter_model.safetensors")
    b = bytearray(open(p, "rb").read())
    b[-1] ^= 0x55
    open(p, "wb").write(bytes(b))


def test_lost_checkpoints(E):
    cfg, run = config(E, schedule__total_steps=4, checkpoint__every=1, checkpoint__keep=10)
    if not kit.succeeds(train(cfg), "control run for checkpoint cases"):
        return
    handled(not os.path.exists(os.path.join(run, "LOCK")), "a finished run releases run.dir/LOCK")
    cfg_s, run_s = config(E, schedule__total_steps=4, checkpoint__every=10)
    p = train(cfg_s, env={"TPTT_TEST_STOP_AT_STEP": "2"})
    handled(p.returncode == 3 and not os.path.exists(os.path.join(run_s, "LOCK")),
            "a run stopped by a signal (exit 3) releases run.dir/LOCK", "exit %d" % p.returncode)
    kit.succeeds(train(cfg_s), "and the next run resumes at once")
    names = ckpts(run)
    for n in names:
        corrupt(os.path.join(run, "checkpoints", n))
    before = tree_bytes(os.path.join(run, "checkpoints"))
    p = train(cfg)
    ok = bad_input(p, "all checkpoints corrupt: --resume auto refuses", ["--resume none"])
    line = last_line(p)
    handled(all(n in line for n in names) and "checksum" in line, "refusal names every checkpoint and why", line)
    handled(tree_bytes(os.path.join(run, "checkpoints")) == before, "refusal leaves the checkpoints untouched")
    # --resume none: trains from 0 but deletes nothing it did not write
    p = train(cfg, "--resume", "none")
    kit.succeeds(p, "--resume none over corrupt checkpoints runs")
    after = tree_bytes(run)
    kept = sum(1 for k, v in before.items() if any(v == w and os.path.basename(k) == os.path.basename(k2)
                                                   for k2, w in after.items()))
    handled(kept == len(before), "--resume none keeps every old checkpoint file (%d of %d)" % (kept, len(before)))
    # the lock
    host = socket.gethostname()
    cfg, run = config(E, schedule__total_steps=2, checkpoint__every=2)
    os.makedirs(run)
    lock = os.path.join(run, "LOCK")

    def write_lock(h, pid, job=""):
        with open(lock, "w") as f:
            f.write(json.dumps({"host": h, "pid": pid, "slurm_job_id": job, "started": "x"}) + "\n")

    write_lock(host, os.getpid())
    bad_input(train(cfg), "lock held by a live process", ["LOCK", str(os.getpid()), host])
    write_lock("some-other-host", 4242, "777")
    bad_input(train(cfg), "lock held on another host", ["LOCK", "some-other-host", "4242", "777"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(host, dead.pid)
    p = train(cfg)
    handled(p.returncode == 0 and "stale" in err_text(p).lower() and not os.path.exists(lock),
            "stale lock of a dead process is taken over (and released at the end)",
            "exit %d: %s" % (p.returncode, err_text(p)[-600:]))
    write_lock("some-other-host", 4242, "778")
    p = train(cfg, env={"SLURM_JOB_ID": "778"})
    handled(p.returncode == 0, "lock of the same SLURM job (requeue) is taken over", err_text(p)[-600:])
    write_lock(host, 1e30)
    bad_input(train(cfg), "lock with a pid past any integer", ["LOCK", "pid"])
    with open(lock, "w") as f:
        f.write("garbage")
    bad_input(train(cfg), "unreadable lock file", ["LOCK"])
    os.unlink(lock)
    # two real runs at once: the second is refused while the first holds the lock
    cfg, run = config(E, schedule__total_steps=1000000, checkpoint__every=0, logging__every=100000)
    e = dict(os.environ)
    e.update(tu.MPI_ENV)
    first = subprocess.Popen([TPTT, "train", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=e)
    for _ in range(200):
        if os.path.exists(os.path.join(run, "LOCK")) or first.poll() is not None:
            break
        time.sleep(0.02)
    p = train(cfg)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=60)
    bad_input(p, "second concurrent run on the same run.dir", ["LOCK", str(first.pid)])


# ------------------------------------------------------------------ class 4

def test_trainer_state(E):
    cfg, run = config(E, schedule__total_steps=4, checkpoint__every=2, checkpoint__keep=5)
    if not kit.succeeds(train(cfg), "control run for trainer_state cases"):
        return
    good = os.path.join(run, "checkpoints", "step-00000002")
    st = json.load(open(os.path.join(good, "trainer_state.json")))

    def case(label, edit, keywords, raw=None):
        ck = os.path.join(E.tmp, "st%d" % counts["tried"], "step-00000002")
        shutil.copytree(good, ck)
        s = json.loads(json.dumps(st))
        if edit:
            edit(s)
        with open(os.path.join(ck, "trainer_state.json"), "w") as f:
            f.write(raw if raw is not None else json.dumps(s, indent=1))
        rewrite_manifest(ck)
        cfg2, _ = config(E, schedule__total_steps=6, checkpoint__every=2)
        bad_input(train(cfg2, "--resume", ck), "trainer_state: " + label, ["trainer_state.json"] + keywords)

    def setk(path, v):
        def f(s):
            o = s
            for k in path[:-1]:
                o = o[k]
            if v is KeyError:
                del o[path[-1]]
            else:
                o[path[-1]] = v
        return f

    case("step -5", setk(["step"], -5), ["step"])
    case("step 1e18", setk(["step"], 1e18), ["step"])
    case("step 2.5", setk(["step"], 2.5), ["step"])
    case("step as string", setk(["step"], "2"), ["step"])
    case("step missing", setk(["step"], KeyError), ["step"])
    case("step differs from directory", setk(["step"], 4), ["step", "step-00000002"])
    case("tokens_seen -1", setk(["tokens_seen"], -1), ["tokens_seen"])
    case("tokens_seen 1e300", setk(["tokens_seen"], 1e300), ["tokens_seen"])
    case("tokens_seen inconsistent", setk(["tokens_seen"], 12345), ["tokens_seen"])
    case("consecutive_bad_steps -1", setk(["consecutive_bad_steps"], -1), ["consecutive_bad_steps"])
    case("consecutive_bad_steps 1e18", setk(["consecutive_bad_steps"], 1e18), ["consecutive_bad_steps"])
    case("world_size 0", setk(["world_size"], 0), ["world_size"])
    case("data rows changed", setk(["data_cursor", "rows"], st["data_cursor"]["rows"] + 1), ["rows"])
    case("data seed changed", setk(["data_cursor", "seed"], 99), ["seed"])
    case("data_cursor next_step differs", setk(["data_cursor", "next_step"], 3), ["next_step"])
    # past int64: the fuzzer's find (a double-to-int64 conversion out of range)
    case("rng seed 1.4e19", setk(["rng", 0, "seed"], 13883100000000000000), ["rng", "seed"])
    case("data seed 2^64", setk(["data_cursor", "seed"], 2.0 ** 64), ["data_cursor.seed"])
    case("data_cursor not an object", setk(["data_cursor"], 5), ["data_cursor"])
    case("not a JSON object", None, [("object", "json")], raw="[1,2]")
    case("invalid JSON", None, ["json"], raw="{\"step\": 2,")
    case("duplicate key", None, [("duplicate", "step")], raw=json.dumps(st)[:-1] + ", \"step\": 2}")
    # the data file changed under the checkpoint (same path, other contents)
    data2 = os.path.join(E.tmp, "data-b.tok")
    tu.make_data(data2, seed=7)
    shutil.copy(E.data, data2 + ".orig")
    cfg3 = os.path.join(E.tmp, "swap.yaml")
    run3 = os.path.join(E.tmp, "swap-run")
    tu.write_config(cfg3, E.model, data2 + ".orig", run3, schedule__total_steps=2, checkpoint__every=2)
    if kit.succeeds(train(cfg3), "control run for the data-swap case"):
        shutil.copy(data2, data2 + ".orig")
        tu.write_config(cfg3, E.model, data2 + ".orig", run3, schedule__total_steps=4, checkpoint__every=2)
        bad_input(train(cfg3), "data file replaced under the run", [("digest", "changed")])
    # same rows, one token different: only the digest can tell
    run4 = os.path.join(E.tmp, "swap-run2")
    data4 = os.path.join(E.tmp, "data-c.tok")
    shutil.copy(E.data, data4)
    tu.write_config(cfg3, E.model, data4, run4, schedule__total_steps=2, checkpoint__every=2)
    if kit.succeeds(train(cfg3), "control run for the token-swap case"):
        b = bytearray(open(data4, "rb").read())
        b[48] ^= 1  # first token id, still inside the vocabulary
        open(data4, "wb").write(bytes(b))
        tu.write_config(cfg3, E.model, data4, run4, schedule__total_steps=4, checkpoint__every=2)
        bad_input(train(cfg3), "one token of the data file changed", ["digest", "data_cursor"])


# ------------------------------------------------------------------ class 5, 7

def test_fifo_and_dirs(E):
    # FIFOs where files are expected must not block
    m2 = os.path.join(E.tmp, "model-fifo")
    shutil.copytree(E.model, m2)
    os.unlink(os.path.join(m2, "config.json"))
    os.mkfifo(os.path.join(m2, "config.json"))
    try:
        p = kit.run([TPTT, "inspect", m2], timeout=20)
        bad_input(p, "FIFO as config.json", ["config.json", "regular"])
    except subprocess.TimeoutExpired:
        handled(False, "FIFO as config.json: no hang")
    cfg, run = config(E, schedule__total_steps=2, checkpoint__every=2)
    kit.succeeds(train(cfg), "control run for FIFO checkpoint")
    ck = os.path.join(run, "checkpoints", "step-00000002")
    os.unlink(os.path.join(ck, "trainer_state.json"))
    os.mkfifo(os.path.join(ck, "trainer_state.json"))
    try:
        cfg2, _ = config(E, schedule__total_steps=4)
        bad_input(train(cfg2, "--resume", ck, timeout=20), "FIFO in a checkpoint", ["trainer_state.json"])
    except subprocess.TimeoutExpired:
        handled(False, "FIFO in a checkpoint: no hang")
    # class 7: unwritable run.dir found before any step
    blocker = os.path.join(E.tmp, "afile")
    open(blocker, "w").write("x")
    for label, rd, kw in (("run.dir under a regular file", os.path.join(blocker, "run"), ["run"]),
                          ("run.dir/checkpoints is a file", None, ["checkpoints"])):
        cfg, run = config(E, schedule__total_steps=2, checkpoint__every=2)
        if rd is None:
            os.makedirs(run)
            open(os.path.join(run, "checkpoints"), "w").write("x")
        else:
            cfg, run = config(E, run__dir=rd, schedule__total_steps=2, checkpoint__every=2)
        p = train(cfg)
        ok = bad_input(p, label, kw)
        handled(ok and "step 1/" not in p.stdout, label + ": found before the first step", p.stdout[-300:])


def test_metrics_write(E):
    cfg, run = config(E, schedule__total_steps=3, checkpoint__every=3)
    os.makedirs(run)
    os.symlink("/dev/full", os.path.join(run, "metrics.jsonl"))
    p = train(cfg)
    e = err_text(p)
    handled(p.returncode == 0 and e.count("metrics.jsonl") == 1 and "space" in e.lower(),
            "metrics.jsonl on a full disk: warned once", "exit %d: %s" % (p.returncode, e[-800:]))
    cfg, run = config(E, schedule__total_steps=3, checkpoint__every=3)
    os.makedirs(os.path.join(run, "metrics.jsonl"))
    p = train(cfg)
    e = err_text(p)
    handled(p.returncode == 0 and e.count("metrics.jsonl") == 1, "metrics.jsonl cannot be opened: warned",
            "exit %d: %s" % (p.returncode, e[-800:]))


# ------------------------------------------------------------------ class 5, 8: model and tokenizer files

def tiny_tokenizer(d, vocab=None, added=None, cfg=None, raw=None):
    os.makedirs(d, exist_ok=True)
    tj = {"version": "1.0", "normalizer": None, "pre_tokenizer": None, "decoder": None, "post_processor": None,
          "added_tokens": added or [],
          "model": {"type": "BPE", "vocab": vocab or {"a": 0, "b": 1, "ab": 2, "<s>": 3}, "merges": ["a b"]}}
    with open(os.path.join(d, "tokenizer.json"), "wb") as f:
        f.write(raw if raw is not None else json.dumps(tj).encode())
    if cfg is not None:
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            f.write(json.dumps(cfg))
    return d


def tokenize(d):
    try:
        return kit.run([TPTT, "tokenize", "--tokenizer", d], input=b'{"text": "ab"}\n', timeout=60)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([TPTT, "tokenize"], -9, b"", b"tptt tokenize timed out")


def test_model_files(E):
    t = E.tmp
    ok = tiny_tokenizer(os.path.join(t, "tok-ok"))
    kit.succeeds(tokenize(ok), "control: tiny tokenizer")
    kit.succeeds(tokenize(tiny_tokenizer(os.path.join(t, "tok-ok-cfg"), cfg={"add_bos_token": False, "bos_token": "<s>",
                                                                            "eos_token": {"content": "<s>"}})),
                 "control: tiny tokenizer with tokenizer_config.json")
    # a byte-level piece with no token at all (found by fuzz_tokenizer_json: UBSan, memcpy from NULL)
    bl = json.dumps({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}, "decoder": {"type": "ByteLevel"},
                     "model": {"type": "BPE", "vocab": {"a": 0, "\u0120": 1}, "merges": []}}).encode()
    p = kit.run([TPTT, "tokenize", "--tokenizer", tiny_tokenizer(os.path.join(t, "tok-bl"), raw=bl)],
                input=b'{"text": "hello world ab"}\n', timeout=60)
    handled(p.returncode in (0, 1) and not testkit.crashed(p), "byte-level text with no token for it: no crash",
            err_text(p)[-400:])
    bad_input(tokenize(tiny_tokenizer(os.path.join(t, "tok-bomb"), vocab={"a": 0, "b": 2000000000})),
              "tokenizer.json vocab id 2e9 (memory bomb)", ["tokenizer.json", "model.vocab", "2000000000"])
    bad_input(tokenize(tiny_tokenizer(os.path.join(t, "tok-bomb2"),
                                      added=[{"id": 1999999999, "content": "<x>", "special": True}])),
              "tokenizer.json added token id 2e9", ["tokenizer.json", "added_tokens[0]"])
    good = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}})
    for label, bad in (("0xff byte", b"\xff"), ("truncated sequence", b"\xc3"), ("overlong '/'", b"\xc0\xaf"),
                       ("surrogate", b"\xed\xa0\x80"), ("above U+10FFFF", b"\xf4\x90\x80\x80")):
        raw = good.encode().replace(b'"ab"', b'"a' + bad + b'b"')
        bad_input(tokenize(tiny_tokenizer(os.path.join(t, "tok-utf8-%d" % counts["tried"]), raw=raw)),
                  "tokenizer.json invalid UTF-8 (%s)" % label, ["tokenizer.json", "utf-8"])
    for label, cfg, field in (("add_bos_token as a string", {"add_bos_token": "true"}, "add_bos_token"),
                              ("add_eos_token as a number", {"add_eos_token": 1}, "add_eos_token"),
                              ("eos_token as a number", {"eos_token": 5}, "eos_token"),
                              ("eos_token object without content", {"eos_token": {"text": "<s>"}}, "eos_token"),
                              ("bos_token content a list", {"bos_token": {"content": ["<s>"]}}, "bos_token")):
        bad_input(tokenize(tiny_tokenizer(os.path.join(t, "tok-cfg-%d" % counts["tried"]), cfg=cfg)),
                  "tokenizer_config.json " + label, ["tokenizer_config.json", field])
    # error paths that allocated before failing (leaks under ASan)
    for label, key, comp, where in (
            ("normalizer Replace with a bad regex", "normalizer",
             {"type": "Replace", "pattern": {"Regex": "(unclosed"}, "content": "x"}, "normalizer"),
            ("normalizer Replace with an empty pattern", "normalizer",
             {"type": "Replace", "pattern": {"String": ""}, "content": "x"}, "normalizer"),
            ("normalizer Sequence failing in its second step", "normalizer",
             {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "_"},
                                                  {"type": "Replace", "pattern": {"Regex": "[z-a]"}, "content": ""}]},
             "normalizer"),
            ("decoder Replace with a Regex", "decoder",
             {"type": "Replace", "pattern": {"Regex": "a"}, "content": "b"}, "decoder"),
            ("pre_tokenizer Split with a bad regex", "pre_tokenizer",
             {"type": "Split", "pattern": {"Regex": "(?<"}, "behavior": "Isolated"}, "pre_tokenizer")):
        tj = json.loads(good)
        tj[key] = comp
        bad_input(tokenize(tiny_tokenizer(os.path.join(t, "tok-err-%d" % counts["tried"]), raw=json.dumps(tj).encode())),
                  "tokenizer.json " + label, ["tokenizer.json", where])
    # YAML tags, also those equal to the default (documented as refused)
    for label, text_from, text_to in (("!!str on a number", "seed: 5", "seed: !!str 5"),
                                      ("!!str on a path", "path: " + E.model, "path: !!str " + E.model),
                                      ("!!int", "seed: 5", "seed: !!int 5"),
                                      ("!!map", "lora:", "lora: !!map")):
        cfg, _ = config(E, schedule__total_steps=2)
        y = open(cfg).read()
        open(cfg, "w").write(y.replace(text_from, text_to, 1))
        bad_input(train(cfg), "config YAML tag " + label, [os.path.basename(cfg), "tag"], code=2)
    cfg, _ = config(E, schedule__total_steps=2)
    p = train(cfg, "--set", "seed=!!str 5")
    bad_input(p, "--set with a YAML tag", ["seed", "tag"], code=2)
    # config.json
    base = json.load(open(os.path.join(E.model, "config.json")))

    def cfg_case(label, text, keywords, arch=None):
        d = os.path.join(t, "model-cfg-%d" % counts["tried"])
        shutil.copytree(E.model, d)
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write(text)
        bad_input(kit.run([TPTT, "inspect", d], timeout=60), "config.json " + label, ["config.json"] + keywords)

    txt = json.dumps(base, indent=1)
    cfg_case("duplicate key", txt[:-1].rstrip() + ', "num_hidden_layers": 3}', ["num_hidden_layers", ("twice", "duplicate")])
    for field, v in (("num_hidden_layers", 1e9), ("num_hidden_layers", 1000000), ("hidden_size", 1 << 30),
                     ("num_attention_heads", 1 << 20), ("vocab_size", 2000000000), ("intermediate_size", 1 << 30)):
        b = dict(base)
        b[field] = v
        cfg_case("%s %g" % (field, v), json.dumps(b), [field])
    m = dict(base)
    m["architectures"] = ["MistralForCausalLM"]
    m["model_type"] = "mistral"
    for v in (0, -4):
        m["sliding_window"] = v
        cfg_case("sliding_window %d" % v, json.dumps(m), ["sliding_window"])


def test_dump_positions(E):
    """dump names the out-of-vocabulary input id at its own position (not
    the label before it) and the batch file."""
    for what, batch, want in (
            ("dump: id out of vocabulary", {"input_ids": [[1, 2, 3, 4], [5, 6, 999, 7]]},
             ["b.json", "token id 999", "row 1", "position 2"]),
            ("dump: negative id", {"input_ids": [[-3, 2, 3, 4]]}, ["token id -3", "row 0", "position 0"]),
            ("dump: label out of vocabulary", {"input_ids": [[1, 2, 3, 4]], "labels": [[1, 2, 3, 999]]},
             ["label 999", "position 3"]),
            # numbers past int32 / int64: refused before any conversion (UBSan would report one)
            ("dump: id past int32", {"input_ids": [[1, 2, 1e10, 4]]}, ["b.json", "input_ids", "[0][2]", "32-bit"]),
            ("dump: doc_starts past int64", {"input_ids": [[1, 2, 3, 4]], "doc_starts": [[0, 1e30]]},
             ["b.json", "doc_starts", "[0][1]", "integer"])):
        b = os.path.join(E.tmp, "b.json")
        with open(b, "w") as f:
            json.dump(batch, f)
        p = kit.run([TPTT, "dump", "--model", E.model, "--batch", b, "--out", os.path.join(E.tmp, "o.st")], text=True)
        bad_input(p, what, want)


def main():
    tmp = tempfile.mkdtemp(prefix="tptt-hard-")
    only = sys.argv[1:]
    try:
        if not only or "plot" in only:
            kit.call(test_plot, tmp)
        E = setup(tmp)
        for name, fn in (("divergence", test_divergence), ("checkpoints", test_lost_checkpoints),
                         ("state", test_trainer_state), ("fifo", test_fifo_and_dirs), ("metrics", test_metrics_write),
                         ("files", test_model_files), ("dump", test_dump_positions)):
            if not only or name in only:
                kit.call(fn, E)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("bad inputs and faults: %d tried, %d handled" % (counts["tried"], counts["handled"]))
    return kit.report()


if __name__ == "__main__":
    sys.exit(main())
