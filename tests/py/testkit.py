"""testkit - the shared harness of the Python tests.

Every Python test counts its checks, prints one line per failed check, runs
the binaries under test and treats a crash as a failure, and ends with the
line "<name>: N passed, N failed" and exit status 1 when any check failed.
This module holds that code once:

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "py"))
    import testkit  # noqa: E402

    kit = testkit.Checker("test_example")
    check = kit.check

    p = kit.run([TPTT, "inspect", model_dir])      # CompletedProcess, bytes out/err
    kit.succeeds(p, "inspect: succeeds")          # exit 0 and no crash
    check(b"tensors" in p.stdout, "inspect lists tensors")
    ...
    sys.exit(kit.report())                         # prints the final line

A crash is what the tests' sanitizer build (tests/CMakeLists.txt: ASan exit
code 99, UBSan 98) or a signal makes of a run: a negative exit code (killed
by a signal), an exit code other than 0, 1 (error) or 2 (usage error), or
"Sanitizer" / "runtime error" on stderr (a report that did not change the exit
code). crash_reason() says which; crashed() is its boolean form.
"""
import subprocess
import traceback

__all__ = ["Checker", "crash_reason", "crashed", "stderr_text"]


def stderr_text(p):
    """p.stderr as str (decoded as UTF-8 with replacement if it is bytes)."""
    err = p.stderr if p.stderr is not None else ""
    return err.decode("utf-8", "replace") if isinstance(err, bytes) else err


def crash_reason(p):
    """Why the finished process p counts as crashed, or None: "killed by signal
    N", "exit code N (98/99 = sanitizer)" for an exit code other than 0, 1, 2,
    "sanitizer report" for "Sanitizer" or "runtime error" on stderr. p.stderr
    may be bytes or str."""
    err = stderr_text(p)
    if p.returncode < 0:
        return "killed by signal %d" % -p.returncode
    if p.returncode not in (0, 1, 2):
        return "exit code %d (98/99 = sanitizer)" % p.returncode
    if "Sanitizer" in err or "runtime error" in err:
        return "sanitizer report"
    return None


def crashed(p):
    """True if p crashed (see crash_reason)."""
    return crash_reason(p) is not None


class Checker:
    """Counts checks for the test called `name`.

    check(cond, what, detail="") -> bool
        counts one check; on failure prints "FAIL: <what>" (": <detail>"
        appended when detail is not empty) and flushes stdout. Returns
        bool(cond), so `if not check(...): return` stops a dependent block.
    eq(got, want, what) -> bool
        check(got == want, what) with "got <got!r>, want <want!r>" as detail.
    run(cmd, input=None, env=None, timeout=60, text=False, what=None)
        runs cmd (each element passed through str()) with stdout and stderr
        captured and returns the subprocess.CompletedProcess (bytes unless
        text=True; timeout=None waits forever; a timeout raises
        subprocess.TimeoutExpired as subprocess.run does). It checks nothing
        unless `what` is given: then it also records no_crash(p, what).
    no_crash(p, what) -> bool
        one check "<what>: no crash"; the detail has the reason and stderr.
    succeeds(p, what, limit=1500) -> bool
        one check `what`: exit code 0 and no crash; the detail has the exit
        code, the crash reason if any, and the first `limit` characters of
        stderr (stripped).
    report() -> int
        prints "<name>: <passed> passed, <failed> failed" and returns the exit
        status: 0 when nothing failed, else 1.
    call(fn, *args) -> bool
        runs fn(*args); an exception is a failure of the test, not a crash
        of it: its traceback is printed and one failed check "<fn name>
        raised <exception type>" (detail: the message) is counted. Returns
        False if fn raised.
    abort(message) -> int
        for a test that cannot start (a binary missing, a reference run
        failed): prints message, counts one failure and returns report().
    passed, failed
        the counts so far.
    """

    def __init__(self, name):
        self.name = name
        self.passed = 0
        self.failed = 0

    def check(self, cond, what, detail=""):
        if cond:
            self.passed += 1
        else:
            self.failed += 1
            print("FAIL: %s%s" % (what, (": " + str(detail)) if detail else ""), flush=True)
        return bool(cond)

    def eq(self, got, want, what):
        return self.check(got == want, what, "got %r, want %r" % (got, want))

    def run(self, cmd, input=None, env=None, timeout=60, text=False, what=None):
        p = subprocess.run([str(a) for a in cmd], input=input, env=env, capture_output=True, timeout=timeout,
                           text=text)
        if what is not None:
            self.no_crash(p, what)
        return p

    def no_crash(self, p, what):
        c = crash_reason(p)
        return self.check(c is None, what + ": no crash", "%s; stderr: %s" % (c, stderr_text(p).strip()[:3000]))

    def succeeds(self, p, what, limit=1500):
        c = crash_reason(p)
        return self.check(p.returncode == 0 and c is None, what,
                          "exit %d%s, stderr: %s" % (p.returncode, " (%s)" % c if c else "",
                                                     stderr_text(p).strip()[:limit]))

    def call(self, fn, *args):
        try:
            fn(*args)
        except Exception as e:
            traceback.print_exc()
            return self.check(False, "%s raised %s" % (fn.__name__, type(e).__name__), str(e))
        return True

    def report(self):
        print("%s: %d passed, %d failed" % (self.name, self.passed, self.failed), flush=True)
        return 1 if self.failed else 0

    def abort(self, message):
        print(message, flush=True)
        self.failed += 1
        return self.report()
