"""Large values on one machine: shared memory (``miniray.values.shm``) against the way through the
server, and ProcessPoolExecutor (and Ray, when installed), in one run.

Usage::

    python bench/shm_values.py            # 100 MB values, best of 3 (about a minute)
    python bench/shm_values.py --mb 20    # smaller values

Rows, each engine in a fresh subprocess with 2 worker processes:

- W5  one task taking a ``--mb`` MB numpy array and returning its sum     MB/s, higher is better
- W6  ten tasks each returning a ``--mb`` MB array (``map``), each summed
      by the client as it arrives                                        seconds, lower is better

Engines: ``ppe`` (ProcessPoolExecutor(2)), ``miniray-server`` (``MINIRAY_SHM=0``: through the
server as before), ``miniray-shm`` (the default), ``ray`` (``ray.init(num_cpus=2)``; skipped
when not importable). The last columns are ratios to PPE measured in this run. Speed is reported
here, never asserted in a test.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ENGINES = ["ppe", "miniray-server", "miniray-shm", "ray"]


def array_sum(arr):
    return float(arr.sum())


def make_array(i, nbytes):
    import numpy as np

    return np.full(nbytes // 8, float(i))


def _engine(name):
    """``(submit, map, close)`` for ``name``."""
    if name == "ppe":
        from concurrent.futures import ProcessPoolExecutor

        ex = ProcessPoolExecutor(2)
        list(ex.map(abs, range(4)))  # workers up
        return ex.submit, ex.map, ex.shutdown
    if name.startswith("miniray"):
        os.environ["MINIRAY_SHM"] = "0" if name == "miniray-server" else "1"
        import miniray

        miniray.init(workers=2)
        ex = miniray.Executor()
        list(ex.map(abs, range(4)))
        return ex.submit, ex.map, lambda: (ex.shutdown(), miniray.shutdown())
    if name == "ray":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        rsum, rmake = ray.remote(array_sum), ray.remote(make_array)

        def submit(fn, *args):
            f = rsum if fn is array_sum else rmake
            ref = f.remote(*args)
            return type("F", (), {"result": lambda self: ray.get(ref)})()

        def rmap(fn, *its):
            refs = [rmake.remote(*a) for a in zip(*its)]
            for r in refs:
                yield ray.get(r)

        return submit, rmap, ray.shutdown
    raise ValueError(name)


def child(name, mb, reps):
    import numpy as np

    submit, map_, close = _engine(name)
    nbytes = mb * 10**6
    arr = np.ones(nbytes // 8)
    w5 = []
    for _ in range(reps):
        t0 = time.perf_counter()
        got = submit(array_sum, arr).result()
        w5.append(time.perf_counter() - t0)
        assert got == float(arr.size), got
    w6 = []
    for _ in range(reps):
        t0 = time.perf_counter()
        total = 0.0
        for i, a in enumerate(map_(make_array, range(10), [nbytes] * 10)):
            total += float(a[0]) * a.size
            del a
        w6.append(time.perf_counter() - t0)
        assert total == sum(range(10)) * (nbytes // 8), total
    close()
    return {"w5_mb_s": mb / min(w5), "w6_s": min(w6)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.mb, a.reps)))
        return
    rows = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")]))
    for name in a.engines.split(","):
        if name == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                rows[name] = "skipped: ray is not installed"
                continue
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name,
                            "--mb", str(a.mb), "--reps", str(a.reps)],
                           env=env, capture_output=True, text=True, timeout=600)
        try:
            rows[name] = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            rows[name] = "failed: " + (p.stderr.strip().splitlines() or ["?"])[-1]
    base = rows.get("ppe") if isinstance(rows.get("ppe"), dict) else None
    print(f"{a.mb} MB values, best of {a.reps}; 2 worker processes each")
    print(f"{'engine':<16}{'W5 MB/s':>10}{'W6 s':>9}{'W5 vs PPE':>11}{'W6 vs PPE':>11}")
    for name, r in rows.items():
        if not isinstance(r, dict):
            print(f"{name:<16}{r}")
            continue
        ratio5 = f"{r['w5_mb_s'] / base['w5_mb_s']:.2f}x" if base else "-"
        ratio6 = f"{r['w6_s'] / base['w6_s']:.2f}x" if base else "-"
        print(f"{name:<16}{r['w5_mb_s']:>10.0f}{r['w6_s']:>9.2f}{ratio5:>11}{ratio6:>11}")
    print("W5 vs PPE: above 1 is faster; W6 vs PPE: below 1 is faster")


if __name__ == "__main__":
    main()
