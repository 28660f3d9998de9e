#!/usr/bin/env python3
"""memsample.py - run a command and sample the memory of its tptt processes.

usage: memsample.py [--interval S] [--json FILE] [--name tptt] -- CMD [ARGS...]

Sample often (default 0.05 s): the trainer first writes its AdamW moments
and rollback copies in the optimizer update at the very end of a step, a
fraction of a second before a one-step run exits; a 1 s sampler missed them
(0.127 GiB of a 7B LoRA run's 0.92 GiB).

CMD runs without a shell (argv as given). Every second the sampler walks
/proc for the descendants of CMD whose argv[0] has the base name `--name`
(the training ranks under mpirun; tptt re-executes itself, so the kernel's
command name is "exe"), and every S seconds it reads, for each:
  /proc/PID/status         VmHWM, RssAnon, RssFile
  /proc/PID/smaps_rollup   Rss, Pss, Private_Clean + Private_Dirty, Anonymous
and keeps each rank's peak of every field. RssAnon is the rank's private
memory (heap, activations, trainables); the mapped weights show up in RssFile
and, when several ranks map the same files, are shared in the page cache
(Pss splits them). Private_* counts file pages only this rank maps, so with a
single rank it includes the whole weight mapping: compare `tptt inspect`'s
private bytes with RssAnon.

Prints one line per rank and writes a JSON summary (peaks in bytes, the
command's exit status, its wall time, the 1-minute load average at start and
end). Exit status: the command's.
"""
import json
import os
import subprocess
import sys
import time

FIELDS = ["VmHWM", "RssAnon", "RssFile", "Rss", "Pss", "Private", "Anonymous"]


def kb_fields(path, keys):
    out = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, rest = line.partition(":")
                if k in keys:
                    out[k] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            # the command name may hold spaces: the fields after the last ')' are fixed
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0].decode(errors="replace")
            comm = os.path.basename(argv0)
            ppid = int(s[s.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        kids.setdefault(ppid, []).append((int(d), comm))
    return kids


def descendants(root, name):
    kids = children_map()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        for c, comm in kids.get(p, []):
            if comm == name:
                out.append(c)
            todo.append(c)
    return out


def sample(pid):
    st = kb_fields(f"/proc/{pid}/status", {"VmHWM", "RssAnon", "RssFile"})
    sm = kb_fields(f"/proc/{pid}/smaps_rollup",
                   {"Rss", "Pss", "Private_Clean", "Private_Dirty", "Anonymous"})
    if not st or not sm:
        return None
    st.update(sm)
    st["Private"] = sm.get("Private_Clean", 0) + sm.get("Private_Dirty", 0)
    return st


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def main(argv):
    interval, out_json, name = 0.05, None, "tptt"
    i = 0
    while i < len(argv) and argv[i] != "--":
        if argv[i] == "--interval":
            interval = float(argv[i + 1])
        elif argv[i] == "--json":
            out_json = argv[i + 1]
        elif argv[i] == "--name":
            name = os.path.basename(argv[i + 1])
        else:
            sys.stderr.write(f"memsample: unknown option {argv[i]!r}\n")
            return 2
        i += 2
    cmd = argv[i + 1:]
    if not cmd:
        sys.stderr.write(__doc__)
        return 2
    load0, t0 = loadavg(), time.time()
    proc = subprocess.Popen(cmd)
    peaks = {}
    loads = []
    pids, found = [], 0.0
    while proc.poll() is None:
        # walking /proc costs more than reading a few status files: find the
        # ranks every second, sample them every `interval`
        if time.time() - found >= 1.0:
            pids = descendants(proc.pid, name)
            if os.path.basename(cmd[0]) == name:
                pids.append(proc.pid)
            found = time.time()
        for p in pids:
            s = sample(p)
            if s is None:
                continue
            pk = peaks.setdefault(p, {k: 0 for k in FIELDS})
            for k in FIELDS:
                pk[k] = max(pk[k], s.get(k, 0))
        loads.append(loadavg())
        time.sleep(interval)
    wall = time.time() - t0
    gib = 1 << 30
    ranks = [dict(pid=p, **pk) for p, pk in sorted(peaks.items())]
    for r, pk in enumerate(ranks):
        print(f"memsample: rank {r} (pid {pk['pid']}): peak RssAnon {pk['RssAnon'] / gib:.3f} GiB, "
              f"Rss {pk['Rss'] / gib:.3f} GiB (file {pk['RssFile'] / gib:.3f}), Pss {pk['Pss'] / gib:.3f} GiB, "
              f"Private {pk['Private'] / gib:.3f} GiB, VmHWM {pk['VmHWM'] / gib:.3f} GiB")
    summary = {"cmd": cmd, "rc": proc.returncode, "wall_s": wall, "load1_start": load0,
               "load1_end": loadavg(), "load1_mean": sum(loads) / len(loads) if loads else load0, "ranks": ranks}
    print(f"memsample: rc {proc.returncode}, wall {wall:.1f} s, load average {load0:.2f} -> "
          f"{summary['load1_end']:.2f} (mean {summary['load1_mean']:.2f})")
    if out_json:
        with open(out_json, "w") as f:
            json.dump(summary, f, indent=1)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
