"""Where W2's map spends CPU: per map of 200,000 ints, in each kind of miniray process.

Usage::

    python bench/w2_cpu.py [--chunksize 20000] [--maps 20] [-n 200000]

Starts the local cluster (2 workers), warms up, then runs ``--maps`` maps of
``workloads.inc`` and prints the wall time per map and the CPU time per map (ms, from
``/proc/PID/task/*/schedstat``) of the client, the server, the task processes and the
workers, summed per kind. W2's rate on a shared 2-core VM swings with the machine's other
load; the CPU a map costs each process swings much less, so it tells whether a change made
a process do less per item. Linux only (``schedstat``).
"""

import argparse
import glob
import os
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)


def _tree(root):
    kids = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = open(stat).read()
            pid, ppid = int(text.split()[0]), int(text.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def _kind(pid):
    if pid == os.getpid():
        return "client"
    if open(f"/proc/{pid}/comm").read().strip().endswith("-server"):
        return "server"  # valkey-server, redis-server
    argv = open(f"/proc/{pid}/cmdline").read().split("\0")
    return "taskproc" if argv[1:3] == ["-m", "miniray.taskproc"] else "worker"


def _cpu(pids):
    """Per kind, CPU seconds so far of ``pids`` (every thread)."""
    out = {}
    for pid in pids:
        try:
            k = _kind(pid)
            ns = sum(int(open(p).read().split()[0])
                     for p in glob.glob(f"/proc/{pid}/task/*/schedstat"))
        except (OSError, ValueError, IndexError):
            continue  # gone
        out[k] = out.get(k, 0.0) + ns / 1e9
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunksize", type=int, default=20000)
    ap.add_argument("--maps", type=int, default=20)
    ap.add_argument("-n", type=int, default=200_000)
    args = ap.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [BENCH_DIR, REPO] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    sys.path[:0] = [BENCH_DIR, REPO]
    import miniray
    import workloads

    miniray.init(workers=2)
    ex = miniray.Executor()
    try:
        for _ in range(3):
            list(ex.map(workloads.inc, range(args.n), chunksize=args.chunksize))
        pids = _tree(os.getpid())
        before = _cpu(pids)
        t0 = time.perf_counter()
        for _ in range(args.maps):
            out = list(ex.map(workloads.inc, range(args.n), chunksize=args.chunksize))
            assert out[-1] == args.n
        wall = (time.perf_counter() - t0) / args.maps
        after = _cpu(pids)
    finally:
        ex.shutdown()
        miniray.shutdown()
    print(f"W2 map of {args.n:,} x inc, chunksize {args.chunksize}, {args.maps} maps: "
          f"{wall * 1e3:.1f} ms per map ({args.n / wall / 1e6:.2f} M items/s), load average "
          f"{os.getloadavg()[0]:.1f}")
    for kind in ("client", "server", "taskproc", "worker"):
        ms = (after.get(kind, 0.0) - before.get(kind, 0.0)) / args.maps * 1e3
        print(f"  {kind:9s} {ms:6.1f} CPU ms per map")
    return 0


if __name__ == "__main__":
    sys.exit(main())
