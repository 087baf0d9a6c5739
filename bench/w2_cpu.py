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
import os
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)


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
    from proctree import cpu_by_kind, tree

    miniray.init(workers=2)
    ex = miniray.Executor()
    try:
        for _ in range(3):
            list(ex.map(workloads.inc, range(args.n), chunksize=args.chunksize))
        pids = tree(os.getpid())
        before = cpu_by_kind(pids)
        t0 = time.perf_counter()
        for _ in range(args.maps):
            out = list(ex.map(workloads.inc, range(args.n), chunksize=args.chunksize))
            assert out[-1] == args.n
        wall = (time.perf_counter() - t0) / args.maps
        after = cpu_by_kind(pids)
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
