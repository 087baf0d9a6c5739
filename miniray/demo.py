"""A short tour on the embedded local cluster: ``python -m miniray.demo``."""

from __future__ import annotations

import time
from concurrent.futures import as_completed


def slow_square(x):
    time.sleep(0.01)
    print(f"squaring {x}")
    return x * x


def fails(x):
    if x == 3:
        raise ValueError(f"item {x} is bad")
    return x


def main() -> None:
    import miniray

    t0 = time.perf_counter()
    with miniray.Executor(job_name="demo") as ex:
        first = ex.submit(abs, -1).result()
        print(f"local cluster up, first result {first} after {time.perf_counter() - t0:.2f} s",
              flush=True)  # (before the bar, which goes to stderr)
        total = sum(ex.map(lambda x: x * x, range(10_000), chunksize=100, progress="squares"))
        print(f"sum of squares below 10,000: {total}")
        futures = [ex.submit(slow_square, i) for i in range(8)]
        print("as completed:", sorted(f.result() for f in as_completed(futures)))
        print("a task's print() comes back as a log line:", next(iter(ex.logs())).text)
        try:
            list(ex.map(fails, range(5)))
        except ValueError as e:
            print(f"a task's error comes back as itself: ValueError({e})")
            print(f"  raised on: {e.__notes__[0] if getattr(e, '__notes__', None) else ''}")
        print("progress:", {k: v for k, v in ex.progress().items() if k in ("done", "failed")})
    miniray.shutdown()
    print(f"done in {time.perf_counter() - t0:.2f} s; the local cluster is gone")


if __name__ == "__main__":
    main()
