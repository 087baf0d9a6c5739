"""Where W3's round trip spends CPU: per round trip, in each kind of process.

Usage::

    python bench/w3_cpu.py [-n 1500] [--runs 5] [--engines ppe,miniray]

Runs W3 (sequential ``submit(noop).result()``, after 50 warm-ups) ``--runs`` times per
engine, alternating engines, each run in a fresh interpreter. It prints the medians over the
runs of the p50 latency and of the CPU time (µs per round trip, from
``/proc/PID/task/*/schedstat``) of the client, the server, task processes and workers.

Latency on a small VM drifts between runs (the same code measured 430 and 700 µs minutes
apart); CPU per round trip drifts much less, so it is the better guide to whether a change
made a process do less. Linux only (``schedstat``).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))

_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import workloads

from proctree import cpu_by_kind as cpu, tree

engine, n = sys.argv[2], int(sys.argv[3])
if engine == "ppe":
    from concurrent.futures import ProcessPoolExecutor
    ex = ProcessPoolExecutor(2)
else:
    import miniray
    miniray.init(workers=2)
    ex = miniray.Executor()
for _ in range(50):
    ex.submit(workloads.noop).result()
pids = tree(os.getpid())
before, lat = cpu(pids), []
for _ in range(n):
    t0 = time.perf_counter()
    ex.submit(workloads.noop).result()
    lat.append(time.perf_counter() - t0)
after = cpu(pids)
lat.sort()
res = {"p50": lat[n // 2] * 1e6}
res.update({k: (after[k] - before.get(k, 0)) / n * 1e6 for k in after})
print(json.dumps(res))
ex.shutdown()
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=1500, help="round trips per run (default 1500)")
    p.add_argument("--runs", type=int, default=5, help="runs per engine (default 5)")
    p.add_argument("--engines", default="ppe,miniray")
    args = p.parse_args(argv)
    engines = args.engines.split(",")
    got = {e: [] for e in engines}
    for _ in range(args.runs):
        for e in engines:
            out = subprocess.run([sys.executable, "-c", _CHILD, BENCH_DIR, e, str(args.n)],
                                 capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                sys.exit(f"{e} failed:\n{out.stderr[-2000:]}")
            got[e].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"medians of {args.runs} runs of {args.n} round trips; CPU in us per round trip")
    for e in engines:
        keys = sorted({k for r in got[e] for k in r} - {"p50"})
        med = {k: statistics.median(r.get(k, 0.0) for r in got[e]) for k in ["p50", *keys]}
        total = sum(med[k] for k in keys)
        print(f"{e:8s} p50 {med['p50']:6.0f} us   CPU: " +
              "  ".join(f"{k} {med[k]:5.0f}" for k in keys) + f"  total {total:5.0f}")


if __name__ == "__main__":
    main()
