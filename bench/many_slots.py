"""Efficiency of many slots on one server: a map of sleeps on 400 slots.

Usage::

    python bench/many_slots.py [--workers 4] [--slots 100] [--tasks 4000] [--sleep 0.5]

Starts a private server and ``--workers`` x ``--slots`` idle slots (``miniray worker --slots N``),
waits until every slot is registered idle, then times ``list(ex.map(time.sleep, ...))`` of
``--tasks`` sleeps (chunksize 1). Efficiency = ideal time (tasks x sleep / slots) / measured
wall time. Beside it: the CPU seconds the server, the client, the workers and their task
processes used during the map (from /proc), so the engine's overhead shows apart from the
machine's own overload (400 task processes on a small machine compete for its cores). The
issue's target is at least 85%.
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from idle_slots import cpu_of, cpu_seconds, server_pid, tree, wait_idle  # noqa: E402
from procs import stop_all  # noqa: E402

from miniray.broker import connect  # noqa: E402
from miniray.keys import Keys  # noqa: E402
from miniray.cluster.server import ServerProcess  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--slots", type=int, default=100)
    p.add_argument("--tasks", type=int, default=4000)
    p.add_argument("--sleep", type=float, default=0.5)
    a = p.parse_args()
    srv = ServerProcess()
    ns = "manyslots"
    env = dict(os.environ, MINIRAY_REDIS_URL=srv.url, MINIRAY_NAMESPACE=ns,
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-m", "miniray.worker", "--slots",
                               str(a.slots), "--name", f"many{i}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(a.workers)]
    os.environ["MINIRAY_NAMESPACE"] = ns
    import miniray

    try:
        n = a.workers * a.slots
        r = connect(srv.url)
        got = wait_idle(r, Keys(ns), n, timeout=60 + n * 0.3)
        if got < n:
            print(f"only {got} of {n} slots registered idle; running anyway")
        time.sleep(2)
        spid = server_pid(srv)
        workers = [w.pid for w in procs]
        tasks = [pid for w in procs for pid in tree(w.pid) if pid != w.pid]
        with miniray.Executor(srv.url) as ex:
            s0, w0, c0 = cpu_seconds(spid), cpu_of(workers), time.process_time()
            k0 = cpu_of(tasks)
            t0 = time.monotonic()
            out = list(ex.map(time.sleep, [a.sleep] * a.tasks))
            wall = time.monotonic() - t0
            s1, w1, c1 = cpu_seconds(spid), cpu_of(workers), time.process_time()
            k1 = cpu_of(tasks)
        assert len(out) == a.tasks
        ideal = a.tasks * a.sleep / n
        print(f"{a.tasks} x sleep({a.sleep:g}) on {a.workers} workers x {a.slots} slots: "
              f"ideal {ideal:.2f} s, wall {wall:.2f} s, efficiency {100 * ideal / wall:.1f}% | "
              f"CPU s during the map: server {s1 - s0:.2f}, client {c1 - c0:.2f}, "
              f"workers {w1 - w0:.2f}, task processes {k1 - k0:.2f} ({os.cpu_count()} cores x "
              f"{wall:.1f} s = {os.cpu_count() * wall:.1f} available)")
    finally:
        stop_all(procs, 30)
        srv.close()


if __name__ == "__main__":
    main()
