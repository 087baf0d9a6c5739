"""Peak memory of a large argument and a large result, through the server and through shared
memory, in one run (issue 17's target: at most 1.5x the value's size above the baseline).

Usage::

    python bench/big_values.py            # 200 MB values, 3 runs per mode (about a minute)
    python bench/big_values.py --mb 50    # smaller values

Each mode runs in a fresh subprocess with one worker (one task process, so the task side is
measured too): the client already holds a ``--mb`` MB numpy array, resets its peak
(``/proc/self/clear_refs``), submits ``a + 1`` and waits for the result. Columns, per run:

- client: its peak RSS above what it held just before the submit (VmHWM), divided by the
  value's size. The result itself is 1.0 of it; the target is at most 1.5.
- task: the task process's peak above its own baseline (reset by a task just before), divided
  by the value's size. The argument and the result are 2.0 of it.
- s: the round trip's seconds, and the server mode's time over shared memory's.

Modes: ``server`` (``MINIRAY_SHM=0``: every byte through the server, as between hosts) and
``shm`` (the default on one machine). Speed is reported here, never asserted in a test.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return os.getpid(), _status("VmRSS")


def _peak() -> int:
    return os.getpid(), _status("VmHWM")


def _work(a):
    return a + 1


def child(mb: int, reps: int) -> dict:
    import numpy as np

    import miniray

    n = mb * 1024 * 1024
    miniray.init(workers=1)
    out = []
    with miniray.Executor() as ex:
        ex.submit(_work, np.zeros(10)).result(timeout=60)
        for _ in range(reps):
            a = np.ones(n // 8)
            pid0, task_base = ex.submit(_reset).result(timeout=60)
            _reset()
            base = _status("VmRSS")
            t = time.perf_counter()
            r = ex.submit(_work, a).result(timeout=300)
            took = time.perf_counter() - t
            client = (_status("VmHWM") - base) / n
            pid1, task_peak = ex.submit(_peak).result(timeout=60)
            assert r.nbytes == n and float(r[0]) == 2.0
            task = (task_peak - task_base) / n if pid0 == pid1 else None
            out.append({"client": client, "task": task, "s": took})
            del a, r
    miniray.shutdown()
    return {"runs": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--child", choices=["server", "shm"])
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.mb, args.reps)))
        return
    results = {}
    for mode in ("server", "shm"):
        env = dict(os.environ, MINIRAY_SHM="0" if mode == "server" else "1")
        got = subprocess.run([sys.executable, __file__, "--child", mode, "--mb", str(args.mb),
                              "--reps", str(args.reps)], env=env, capture_output=True,
                             text=True, timeout=900)
        if got.returncode:
            print(f"{mode}: failed\n{got.stderr[-2000:]}")
            continue
        results[mode] = json.loads(got.stdout.strip().splitlines()[-1])["runs"]
    print(f"{args.mb} MB argument -> {args.mb} MB result; peaks above baseline / value size")
    print(f"{'mode':<8}{'run':>4}{'client':>9}{'task':>8}{'s':>8}")
    for mode, runs in results.items():
        for i, r in enumerate(runs, 1):
            task = "" if r["task"] is None else f"{r['task']:.2f}"
            print(f"{mode:<8}{i:>4}{r['client']:>9.2f}{task:>8}{r['s']:>8.2f}")
    if len(results) == 2:
        best = {m: min(r["s"] for r in runs) for m, runs in results.items()}
        print(f"time server / shm (best of each): {best['server'] / best['shm']:.1f}x; "
              "client target: at most 1.50")


if __name__ == "__main__":
    main()
