"""How fast ``map_futures`` submits next to ``map`` (issue 17: "map_futures over 100,000 items
is about 10x slower to submit than map").

Usage::

    python bench/submit_speed.py [-n 100000] [--repeat 3] [--baseline /path/to/other/checkout]

Times the call itself (what the caller waits for before it has its futures or its results
iterator: pickling, task ids, futures, queueing for the flusher) of ``map(fn, range(n),
chunksize=c)`` and ``map_futures(fn, range(n), chunksize=c)`` for c = 1 and 100, against a
private server with no workers (the tasks stay queued and are cancelled after each round).
It prints the best of ``--repeat`` rounds and the ratio map_futures / map. With
``--baseline`` the same measurement then runs, in the same run and against the same server,
on another checkout
(e.g. ``git worktree add /tmp/main main``), so that before/after are compared side by side.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one(url: str, n: int, repeat: int) -> dict:
    import miniray

    os.environ["MINIRAY_NAMESPACE"] = f"bench{uuid.uuid4().hex[:8]}"
    out = {}
    with miniray.Executor(redis_url=url) as ex:
        for chunksize in (1, 100):
            for what in ("map", "map_futures"):
                best = float("inf")
                for _ in range(repeat):
                    t = time.perf_counter()
                    r = getattr(ex, what)(abs, range(n), chunksize=chunksize)
                    best = min(best, time.perf_counter() - t)
                    ex.cancel()
                    del r
                out[f"{what} c={chunksize}"] = best
    return out


def _measure(tree: str, url: str, n: int, repeat: int) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]);"
            "import submit_speed as s; print(json.dumps(s._one(sys.argv[3], int(sys.argv[4]),"
            " int(sys.argv[5]))))")
    env = {**os.environ, "PYTHONPATH": tree}
    res = subprocess.run([sys.executable, "-c", code, tree, os.path.join(HERE, "bench"), url,
                          str(n), str(repeat)], env=env, capture_output=True, text=True,
                         check=True, timeout=600)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--baseline", help="another checkout to measure in the same run")
    args = p.parse_args()
    from miniray.cluster.server import ServerProcess

    srv = ServerProcess(tcp=True)
    try:
        trees = [("this", HERE)] + ([("baseline", args.baseline)] if args.baseline else [])
        results = {name: _measure(tree, srv.url, args.n, args.repeat) for name, tree in trees}
    finally:
        srv.close()
    print(f"submit time, best of {args.repeat}, n={args.n} (seconds; ratio map_futures/map)")
    for name, r in results.items():
        for c in (1, 100):
            m, mf = r[f"map c={c}"], r[f"map_futures c={c}"]
            print(f"  {name:9s} chunksize={c:<4d} map {m:7.3f}  map_futures {mf:7.3f}  "
                  f"ratio {mf / m:5.2f}")
    if args.baseline:
        for c in (1, 100):
            before = results["baseline"][f"map_futures c={c}"]
            after = results["this"][f"map_futures c={c}"]
            print(f"  map_futures chunksize={c}: baseline/this {before / after:5.2f}x")


if __name__ == "__main__":
    main()
